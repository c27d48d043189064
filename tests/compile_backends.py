"""torch.compile backends for the compiled path's tests, registered through `handlers.modules`
(so a background compile's own `engine warmup` process has them too): "engine_test_slow" makes
the first graph of a process take ENGINE_TEST_COMPILE_SECONDS (3 by default), as a real compile
takes a while; "engine_test_broken" cannot compile anything."""

from __future__ import annotations

import os
import threading
import time

import torch

from engine.run.handlers import Registry

_first = threading.Lock()
_slowed: list[bool] = []


@torch._dynamo.register_backend(name="engine_test_slow")
def slow(graph, example_inputs):
    with _first:
        if not _slowed:
            _slowed.append(True)
            time.sleep(float(os.environ.get("ENGINE_TEST_COMPILE_SECONDS", "3")))
    return graph.forward


@torch._dynamo.register_backend(name="engine_test_broken")
def broken(graph, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def register(registry: Registry) -> None:
    """Nothing to register: importing this module registered the backends."""
