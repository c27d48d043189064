"""What the first model load of a process spends, by part, and the eager call's seconds, on a GPU:
importing torch, CUDA's start, importing diffusers' SDXL pipeline, the weights to the GPU, then
three eager calls of 4 images and of 1 (1024x1024, 30 steps):

    python bench/probe_imports_gpu.py [FOLDER]      # FOLDER: bench_gpu.build_sdxl's model (/tmp/fg/model)
"""
import time, json, sys
t0 = time.perf_counter()
import torch
t1 = time.perf_counter(); torch.zeros(1, device="cuda"); t2 = time.perf_counter()
import diffusers; from diffusers import StableDiffusionXLPipeline; t3 = time.perf_counter()
import transformers; from transformers import CLIPTextModel; t4 = time.perf_counter()
pipe = StableDiffusionXLPipeline.from_pretrained((sys.argv[1] if len(sys.argv) > 1 else "/tmp/fg/model"), torch_dtype=torch.float16, use_safetensors=True).to("cuda"); torch.cuda.synchronize(); t5 = time.perf_counter()
pipe.set_progress_bar_config(disable=True)
out = {"import_torch": t1 - t0, "cuda_init": t2 - t1, "import_diffusers": t3 - t2, "import_transformers_clip": t4 - t3, "load_and_to": t5 - t4}
for n in (4, 1):
    times = []
    for _ in range(3):
        s = time.perf_counter(); pipe(prompt="x", num_images_per_prompt=n, num_inference_steps=30, width=1024, height=1024, output_type="np"); torch.cuda.synchronize(); times.append(round(time.perf_counter() - s, 3))
    out[f"eager_{n}"] = times
print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}))
