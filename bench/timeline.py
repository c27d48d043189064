"""Where a pipeline call's time goes on the GPU: CUDA events around each call of the pipeline class
and around each call of a compiled module inside it (the denoiser, the VAE decoder), recorded on
whichever thread makes the call. For each call: the GPU seconds in the denoiser and the decoder,
and the seconds the GPU spent elsewhere (or idle) before the first denoiser step, between steps,
between the last step and the decoder, and after the decoder (the images handed to the CPU).

    timeline = CallTimeline(); timeline.install(StableDiffusionXLPipeline)
    timeline.arm = "direct"; pipe(...); timeline.summary()
"""

from __future__ import annotations

import functools
import threading
import time


class CallTimeline:
    def __init__(self) -> None:
        self.arm = "warm-up"
        self.calls: list[dict] = []
        self._open = threading.local()

    def install(self, pipeline_class) -> None:
        import torch
        from torch._dynamo.eval_frame import OptimizedModule

        timeline = self
        original_call = pipeline_class.__call__
        original_module_call = OptimizedModule.__call__

        def event():
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
            return mark

        @functools.wraps(original_call)
        def timed_call(pipe, *args, **kwargs):
            marks = []
            timeline._open.marks = marks
            started, start = time.perf_counter(), event()
            try:
                return original_call(pipe, *args, **kwargs)
            finally:
                end = event()
                torch.cuda.synchronize()
                timeline._open.marks = None
                timeline.calls.append(timeline._summarise(start, end, marks, time.perf_counter() - started))

        def timed_module(module, *args, **kwargs):
            marks = getattr(timeline._open, "marks", None)
            if marks is None:
                return original_module_call(module, *args, **kwargs)
            name = type(getattr(module, "_orig_mod", module)).__name__
            before = event()
            try:
                return original_module_call(module, *args, **kwargs)
            finally:
                marks.append((name, before, event()))

        pipeline_class.__call__ = timed_call
        OptimizedModule.__call__ = timed_module

    def _summarise(self, start, end, marks, wall: float) -> dict:
        total = start.elapsed_time(end) / 1000
        summary = {"arm": self.arm, "wall_s": round(wall, 4), "gpu_span_s": round(total, 4), "modules": {},
                   "before_first_s": 0.0, "between_s": 0.0, "after_last_s": 0.0}
        previous_end = None
        for name, before, after in marks:
            busy = before.elapsed_time(after) / 1000
            summary["modules"][name] = round(summary["modules"].get(name, 0.0) + busy, 4)
            if previous_end is None:
                summary["before_first_s"] = round(start.elapsed_time(before) / 1000, 4)
            else:
                summary["between_s"] = round(summary["between_s"] + previous_end.elapsed_time(before) / 1000, 4)
            previous_end = after
        if previous_end is not None:
            summary["after_last_s"] = round(previous_end.elapsed_time(end) / 1000, 4)
        summary["module_calls"] = len(marks)
        return summary

    def summary(self) -> dict:
        """Per arm: calls, and the mean of each figure over its calls."""
        arms: dict[str, list[dict]] = {}
        for call in self.calls:
            arms.setdefault(call["arm"], []).append(call)
        out = {}
        for arm, calls in arms.items():
            keys = ("wall_s", "gpu_span_s", "before_first_s", "between_s", "after_last_s")
            mean = {key: round(sum(c[key] for c in calls) / len(calls), 4) for key in keys}
            names = {name for c in calls for name in c["modules"]}
            mean["modules"] = {name: round(sum(c["modules"].get(name, 0.0) for c in calls) / len(calls), 4)
                               for name in sorted(names)}
            out[arm] = {"calls": len(calls), **mean}
        return out
