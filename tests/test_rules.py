"""The pure rules the runner leans on: which failures are retried, which runners are gone."""

from __future__ import annotations

import errno
import sqlite3

from engine.errors import StepFailed, UnsafePath, WillNotFit
from engine.run.failures import classify, is_oom
from engine.run.fleet import RunnerRow, dead_on_this_host
from engine.store.errors import translate


def test_failures_that_will_repeat_are_not_retried_and_transient_ones_are():
    permanent = [UnsafePath("x"), WillNotFit("too big"), TypeError("argument of type 'NoneType' is not iterable"),
                 FileNotFoundError(errno.ENOENT, "gone"),
                 RuntimeError("Error(s) in loading state_dict: size mismatch for lora_A.weight")]
    transient = [StepFailed("planned"), OSError(errno.ENOSPC, "No space left on device"),
                 translate(sqlite3.OperationalError("database is locked")), RuntimeError("CUDA out of memory. Tried to allocate"),
                 MemoryError(), RuntimeError("CUDA error: device lost"), RuntimeError("something nobody foresaw")]
    assert [classify(e).retryable for e in permanent] == [False] * len(permanent)
    assert [classify(e).retryable for e in transient] == [True] * len(transient)
    assert [classify(e).code for e in transient[3:6]] == ["OUT_OF_MEMORY", "OUT_OF_MEMORY", "DEVICE_UNAVAILABLE"]
    assert "No space left on device" in classify(transient[1]).message
    assert is_oom(RuntimeError("could not create a primitive")) and not is_oom(RuntimeError("shape"))


def test_a_runner_is_gone_when_its_process_is_gone_or_its_pid_was_reused():
    rows = [RunnerRow("alive", "h", 10, 1000.0, "running"), RunnerRow("dead", "h", 11, 1000.0, "running"),
            RunnerRow("reused", "h", 12, 1000.0, "running"), RunnerRow("elsewhere", "other", 11, 1000.0, "running"),
            RunnerRow("stopped", "h", 11, 1000.0, "stopped"), RunnerRow("me", "h", 11, 1000.0, "running")]
    started = {10: 1000.4, 11: None, 12: 5000.0}
    assert dead_on_this_host(rows, "h", started.get, me="me") == ["dead", "reused"]


def test_a_contact_sheet_uses_the_tiles_of_saved_images_and_never_a_replaced_files(tmp_path):
    """The tile cache is keyed by the file's identity: a saved image's tile is reused (also after
    a rename), and a file replaced since is read again."""
    from PIL import Image

    from engine.outbox.png import save_png
    from engine.outbox.sheets import contact_sheet, tiles

    saved = tmp_path / "a.png"
    save_png(Image.new("RGB", (256, 256), (250, 0, 0)), saved, "red")
    moved = tmp_path / "moved.png"
    saved.rename(moved)
    assert tiles.get(moved) is not None, "a rename keeps the tile"
    sheet = contact_sheet([(moved, "#0")], tmp_path / "sheet.png")
    assert Image.open(sheet).convert("RGB").getpixel((10, 10)) == (250, 0, 0)
    Image.new("RGB", (256, 256), (0, 0, 250)).save(tmp_path / "blue.png")
    (tmp_path / "blue.png").replace(moved)  # another file under the same name
    assert tiles.get(moved) is None
    sheet = contact_sheet([(moved, "#0")], tmp_path / "sheet.png")
    assert Image.open(sheet).convert("RGB").getpixel((10, 10)) == (0, 0, 250)


def test_every_device_kind_discovery_knows_has_an_estimate(install):
    """`engine workflows ID` on a ROCm or XPU machine: an estimate, not a KeyError."""
    from engine.domains.device import PREFERENCE, DeviceInfo
    from engine.domains.estimate import estimate
    from engine.ingest.jobs import validate_params
    from engine.workflows import load_workflows

    workflow = load_workflows(install.config.workflows_dir)["txt2img"]
    params = validate_params({"width": 512, "height": 512, "steps": 10}, "params")
    seconds = {}
    for kind in PREFERENCE:
        device = DeviceInfo(f"{kind}:0" if kind != "cpu" else "cpu", kind, 0, kind, 8 * 2**30, 8 * 2**30, True, True)
        guess = estimate(install.config, workflow, params, devices=[device])
        assert guess["device"] == device.id and guess["memory_bytes"] > 0, guess
        seconds[kind] = guess["seconds"]
    assert seconds["cuda"] < seconds["cpu"] and seconds["rocm"] < seconds["cpu"] and seconds["xpu"] < seconds["cpu"]
