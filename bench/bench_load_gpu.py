"""How long a diffusers pipeline takes to reach the GPU, each way in a process of its own (so the
page cache is the only thing shared), with the file's pages in memory ("warm") and, where the
machine lets us drop them, read from disk ("cold"):

    python bench/bench_load_gpu.py [--folder /tmp/engine-fast-gpu] [--cold]     # $OUT/load_gpu.json

raw: every .safetensors file of the folder read straight to the GPU (safetensors' load_file): what
the disk and the copy allow. to: `from_pretrained` to the CPU then `.to("cuda")` (what the engine
did). device_map: `from_pretrained(device_map="cuda")`, each tensor read straight to the GPU.
engine: the engine's own `load_pipeline`. Each reports its imports (torch and CUDA's start; then
diffusers' SDXL pipeline, apart), its load and the total.
The model is bench_gpu.build_sdxl's random-weight SDXL (fp16), made once in --folder/model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("raw", "to", "device_map", "engine")


def one(variant: str, folder: Path) -> dict:
    started = time.perf_counter()
    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    imported = time.perf_counter()
    imports: dict = {}
    if variant == "raw":
        from safetensors.torch import load_file

        tensors = [load_file(str(path), device="cuda") for path in sorted(folder.rglob("*.safetensors"))]
        size = sum(t.numel() * t.element_size() for group in tensors for t in group.values())
    else:
        from diffusers import DiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401 (its import is timed)

        diffusers_imported = time.perf_counter()
        imports["diffusers_import_s"] = round(diffusers_imported - imported, 2)
        imported = diffusers_imported
        if variant == "to":
            pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float16, use_safetensors=True,
                                                     local_files_only=True).to("cuda")
        elif variant == "device_map":
            pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float16, use_safetensors=True,
                                                     local_files_only=True, device_map="cuda")
        else:
            from engine.domains.catalogue import ModelEntry
            from engine.domains.device import discover
            from engine.domains.model import load_pipeline

            device = next(d for d in discover() if d.kind == "cuda")
            entry = ModelEntry(id="sdxl", kind="pipeline", family="sdxl", format="diffusers", path=str(folder))
            pipe = load_pipeline(entry, folder, device, torch.float16)
        size = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {"variant": variant, "imports_s": round(imported - started, 2), **imports, "load_s": round(done - imported, 2),
            "total_s": round(done - started, 2), "bytes": size}


def drop_page_cache() -> str | None:
    """Drop the machine's page cache (root only); why not, when it could not be."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return None
    except OSError as exc:
        return str(exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/engine-fast-gpu"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cold", action="store_true", help="also each variant with the page cache dropped first")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.folder / "model"
    if args.one:
        print(json.dumps(one(args.one, model)))
        return
    from bench_gpu import ensure_model, in_own_process

    ensure_model(args.folder)
    runs = []
    for cache in ("warm", "cold") if args.cold else ("warm",):
        for variant in args.variants.split(","):
            why = drop_page_cache() if cache == "cold" else None
            if why:
                runs.append({"variant": variant, "cache": cache, "error": f"could not drop the page cache: {why}"})
                continue
            runs.append({"cache": cache, **in_own_process(__file__, variant, ["--folder", str(args.folder)], 300)})
            print(json.dumps(runs[-1]), flush=True)
    out = Path(os.environ.get("OUT", args.folder))
    (out / "load_gpu.json").write_text(json.dumps({"runs": runs}, indent=1))


if __name__ == "__main__":
    main()
