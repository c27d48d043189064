"""The float8 precision on the CPU (torch._scaled_mm runs there too): the attention layers swapped
for float8 ones (scales per row, or per tensor), pictures close to the bfloat16 pipeline's at the
same seeds, the precision said in the events, the result and `engine models`; what it cannot take
refused at submit. GPU speed and PSNR against fp16 are measured by bench/bench_fast_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.domains.catalogue import ModelRegistry
from engine.errors import ValidationError
from tests.conftest import Installation, write_config
from tests.helpers import engine_process, query, run_until_idle, submit

SIZE = {"width": 64, "height": 64, "steps": 4}
# The CPU, named: a DirectML stand-in another test imported must not be chosen (float8 is not for it).
CPU = {"handlers": {"modules": ["engine.domains"]}, "device": {"preferred": "cpu"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.domains.tinymodels import build_tiny_lora, build_tiny_sd15

    folder = tmp_path_factory.mktemp("models")
    build_tiny_sd15(folder / "tiny15")
    build_tiny_lora(folder / "lora.safetensors", folder / "tiny15")
    return folder


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    mse = ((first.astype(np.float64) - second.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def test_only_the_attention_blocks_linear_layers_are_swapped_and_they_compute_the_same_function():
    import torch
    from diffusers import UNet2DConditionModel

    from engine.domains.float8 import float8_linear, scaling_of, to_float8

    torch.manual_seed(3)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).to(torch.bfloat16).eval()
    linears = {name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
    inside = {name for name in linears if "attentions." in name}
    assert scaling_of(unet) is None
    swapped = to_float8(unet)
    assert swapped == len(inside) > 0
    assert scaling_of(unet) == "row", "what the compiled path's caches are keyed by, beside the dtype"
    assert {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)} == linears - inside, \
        "the time embedding's layers stay as they were"
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    for scaling in ("row", "tensor"):
        for trial in range(3):  # fresh inputs each time, three leading dimensions
            x = torch.randn(2, 5 + trial, 64, dtype=torch.bfloat16) * (10 ** trial)
            exact = layer(x).float()
            got = float8_linear(layer, scaling)(x).float()
            assert got.shape == exact.shape
            assert ((got - exact).norm() / exact.norm()).item() < 0.08, f"float8, scales per {scaling}: a few percent"
        kept = float8_linear(layer, scaling).weight.float()  # what code that reads a layer's weight sees
        assert ((kept - layer.weight.float()).norm() / layer.weight.float().norm()).item() < 0.05
    with pytest.raises(ValueError, match="scaling"):
        to_float8(unet, "column")


def test_a_float8_pipeline_makes_pictures_close_to_the_bfloat16_ones_and_says_its_precision(tmp_path, tiny):
    install = Installation(tmp_path / "engine", settings=CPU)
    registry = ModelRegistry(install.config.models_dir)
    registry.add(tiny / "tiny15", "b16", precision="bf16")
    registry.add(tiny / "tiny15", "f8", precision="fp8")
    job = {"workflow": "txt2img", "params": {**SIZE, "prompt": "a lantern", "seed": 21, "num_images": 2}}
    plain = submit(install, {**job, "params": {**job["params"], "model": "b16"}}).target_id
    fast = submit(install, {**job, "params": {**job["params"], "model": "f8"}}).target_id
    run_until_idle(install)
    assert query(install, "SELECT status FROM sessions") == [("completed",), ("completed",)]
    loaded = {json.loads(r[0])["model_id"]: json.loads(r[0])["precision"] for r in query(
        install, "SELECT data FROM event_log WHERE type = 'model.loaded'")}
    assert loaded == {"b16": "bfloat16", "f8": "fp8"}
    for session_id, precision in ((plain, "bfloat16"), (fast, "fp8")):
        steps = json.loads((install.config.outbox / session_id / "result.json").read_text())["steps"]
        data = next(s["data"] for s in steps if s["type"] == "inference_generation")
        assert data["precision"] == precision and data["dtype"] == "bfloat16"
    pictures = {}
    for session_id in (plain, fast):
        result = json.loads((install.config.outbox / session_id / "result.json").read_text())
        pictures[session_id] = [np.asarray(Image.open(install.config.outbox / session_id / name))
                                for name in result["images"]]
    for a, b in zip(pictures[plain], pictures[fast]):
        assert not np.array_equal(a, b), "float8 arithmetic ran: the pictures are not bfloat16's to the bit"
        assert psnr(a, b) > 20, "and they stay close to bfloat16's"
    listed = {m["id"]: m["precision"] for m in json.loads(engine_process(install, "models", "--json"))}
    assert listed == {"b16": "bf16", "f8": "fp8"}

    # One scale per tensor instead of per row: other float8 arithmetic, still close to bfloat16's.
    other = Installation(tmp_path / "tensor", settings={**CPU, "models": {"fp8_scaling": "tensor"}})
    ModelRegistry(other.config.models_dir).add(tiny / "tiny15", "f8", precision="fp8")
    per_tensor = submit(other, {**job, "params": {**job["params"], "model": "f8"}}).target_id
    run_until_idle(other)
    result = json.loads((other.config.outbox / per_tensor / "result.json").read_text())
    assert result["status"] == "completed"
    for name, row_scaled, plain_picture in zip(result["images"], pictures[fast], pictures[plain]):
        picture = np.asarray(Image.open(other.config.outbox / per_tensor / name))
        assert not np.array_equal(picture, row_scaled), "the scaling asked for is the one that ran"
        assert psnr(picture, plain_picture) > 20


def test_what_float8_cannot_take_is_refused_with_its_code(tmp_path, tiny):
    install = Installation(tmp_path / "engine", settings=CPU)
    registry = ModelRegistry(install.config.models_dir)
    registry.add(tiny / "tiny15", "f8", precision="fp8")
    registry.add(tiny / "lora.safetensors", "style")
    with pytest.raises(ValidationError, match="float8") as refused:
        submit(install, {"workflow": "txt2img", "params": {**SIZE, "model": "f8", "prompt": "x",
                                                           "loras": [{"model": "style"}]}})
    assert refused.value.code == "VALIDATION_ERROR"
    assert query(install, "SELECT count(*) FROM sessions") == [(0,)]
    bad = subprocess.run([sys.executable, "-m", "engine", "models", "add", str(tiny / "tiny15"), "--id", "x",
                          "--precision", "fp9"], env=install.env(), capture_output=True, text=True, timeout=120,
                         cwd=install.folder)
    assert bad.returncode == 2 and "VALIDATION_ERROR" in bad.stderr and "fp8" in bad.stderr
    lora = subprocess.run([sys.executable, "-m", "engine", "models", "add", str(tiny / "lora.safetensors"), "--id",
                           "y", "--precision", "fp8"], env=install.env(), capture_output=True, text=True, timeout=120,
                          cwd=install.folder)
    assert lora.returncode == 2 and "pipelines only" in lora.stderr
    config = write_config(tmp_path / "other", "", {"models": {"precision": "int4"}})
    listed = subprocess.run([sys.executable, "-m", "engine", "models"], capture_output=True, text=True, timeout=120,
                            env={**install.env(), "ENGINE_CONFIG": str(config)})
    assert listed.returncode == 2 and "models.precision" in listed.stderr
    config = write_config(tmp_path / "third", "", {"models": {"fp8_scaling": "column"}})
    listed = subprocess.run([sys.executable, "-m", "engine", "models"], capture_output=True, text=True, timeout=120,
                            env={**install.env(), "ENGINE_CONFIG": str(config)})
    assert listed.returncode == 2 and "models.fp8_scaling" in listed.stderr and "VALIDATION_ERROR" in listed.stderr
