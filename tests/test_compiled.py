"""The compiled fast path on the tiny models, on the CPU: torch.compile with the "eager" backend
traces the same graphs a GPU compiles (with no compiler, so it runs anywhere); a backend that
raises stands for a compile that fails. GPU speed is measured by bench/bench_compile_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.domains.accelerate import bucket_split
from engine.registry import ModelRegistry
from tests.conftest import Installation
from tests.helpers import engine_process, query, run_until_idle, submit

SIZE = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.tinymodels import build_tiny_sd15

    folder = tmp_path_factory.mktemp("models") / "tiny15"
    build_tiny_sd15(folder)
    return folder


def studio(tmp_path, tiny, backend: str = "eager") -> Installation:
    install = Installation(tmp_path / "engine", settings={"handlers": {"modules": ["engine.domains"]},
                                                         "compile": {"backend": backend, "batch_sizes": [1, 2]}})
    registry = ModelRegistry(install.config.models_dir)
    registry.add(tiny, "plain")
    registry.add(tiny, "fast", compile_setting="on")
    return install


def pictures(install, session_id: str) -> list[np.ndarray]:
    result = json.loads((install.config.outbox / session_id / "result.json").read_text())
    return [np.asarray(Image.open(install.config.outbox / session_id / name), dtype=np.int16)
            for name in result["images"]]


def events(install, kind: str) -> list[dict]:
    return [json.loads(row[0]) for row in query(install, "SELECT data FROM event_log WHERE type = :t ORDER BY seq",
                                                t=kind)]


def test_calls_are_split_into_compiled_sizes_largest_first():
    assert bucket_split(7, [1, 2, 4, 8]) == [4, 2, 1]
    assert bucket_split(8, [1, 2, 4, 8]) == [8]
    assert bucket_split(3, [2]) == [2, 1], "below the smallest compiled size: as it is"
    assert bucket_split(0, [1]) == []


def test_the_compiled_path_makes_the_same_images_and_records_what_it_compiled(tmp_path, tiny):
    install = studio(tmp_path, tiny)
    job = {"workflow": "txt2img", "params": {**SIZE, "prompt": "a fox", "seed": 11, "num_images": 3}}
    plain = submit(install, {**job, "params": {**job["params"], "model": "plain"}}).target_id
    fast = submit(install, {**job, "params": {**job["params"], "model": "fast"}}).target_id
    run_until_idle(install)
    assert query(install, "SELECT status, error_message FROM sessions ORDER BY created_event") == [
        ("completed", None), ("completed", None)]
    for eager, compiled in zip(pictures(install, plain), pictures(install, fast)):
        assert np.abs(eager - compiled).max() <= 2, "the compiled path makes the same picture"
    compiled = events(install, "model.compiled")
    assert sorted(e["shape"][1] for e in compiled) == [1, 2], "three images: a compiled call of 2 and one of 1"
    assert all(e["model_id"] == "fast" and e["shape"][2:] == [64, 64] and e["seconds"] > 0 for e in compiled)
    data = json.loads((install.config.outbox / fast / "result.json").read_text())["steps"][2]["data"]
    assert data["group_images"] == 3 and data["call_images"] == 2
    assert not events(install, "model.compile_failed")
    listed = {m["id"]: m["compile"] for m in json.loads(engine_process(install, "models", "--json"))}
    assert listed == {"plain": "off (default)", "fast": "on"}


def test_a_compile_that_fails_falls_back_to_the_eager_call_and_the_image_is_made(tmp_path, tiny):
    import torch

    @torch._dynamo.register_backend(name="engine_test_broken")
    def broken(graph, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    install = studio(tmp_path, tiny, backend="engine_test_broken")
    first = submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "fast", "prompt": "owl", "seed": 5}})
    second = submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "plain", "prompt": "owl", "seed": 5}})
    run_until_idle(install)
    assert query(install, "SELECT status, error_message FROM sessions ORDER BY created_event") == [
        ("completed", None), ("completed", None)]
    assert np.abs(pictures(install, first.target_id)[0] - pictures(install, second.target_id)[0]).max() <= 2
    failed = events(install, "model.compile_failed")
    assert len(failed) == 1 and failed[0]["shape"][1] == 1 and "cannot compile" in failed[0]["error"]
    assert not events(install, "model.compiled")


def test_warmup_compiles_ahead_and_refuses_what_is_not_a_size(tmp_path, tiny):
    install = studio(tmp_path, tiny)
    out = engine_process(install, "warmup", "fast", "--sizes", "64x64", "--batch-sizes", "1,2", "--steps", "1",
                         "--json")
    report = json.loads(out.strip().splitlines()[-1])
    assert [(r["images"], r["width"], r["compiled"]) for r in report] == [(1, 64, True), (2, 64, True)]
    assert sorted(e["shape"][1] for e in events(install, "model.compiled")) == [1, 2]
    bad = subprocess.run([sys.executable, "-m", "engine", "warmup", "fast", "--sizes", "big"], env=install.env(),
                         capture_output=True, text=True, timeout=120, cwd=install.folder)
    assert bad.returncode == 2 and "VALIDATION_ERROR" in bad.stderr and "WIDTHxHEIGHT" in bad.stderr
