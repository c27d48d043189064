"""Where a step is claimed and its handler runs: claims and leases (`claims`), which steps share
one call (`grouping`) and which worker prefers which (`affinity`), the runner and its lanes
(`runner`), the handler API (`handlers`), which failures are retried (`failures`), the runners'
registry (`fleet`), recovery after a crash (`recovery`) and compiling ahead (`warmup`)."""
