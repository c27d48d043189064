"""Decoded images read back from the device as 8-bit pictures.

diffusers hands a call's decoded images to the CPU as float32 (an 8-image 1024x1024 call: 100 MB)
and rounds them to 8 bits there, while the device waits for the next call. `round_on_device` makes
a pipeline's image processor round on the device instead and read back the 8-bit pixels (a quarter
of the bytes). The arithmetic is the same (float32 multiply by 255, round half to even), so every
pixel is the same as diffusers' own; only where it is computed differs.
"""

from __future__ import annotations

from typing import Any

MARK = "_engine_rounds_on_device"


def to_pictures(images: Any) -> list:
    """A batch of images in [0, 1] (B x C x H x W, on any device) as PIL images, rounded as
    diffusers rounds them (`VaeImageProcessor.numpy_to_pil`) but before they leave the device."""
    import torch
    from PIL import Image

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if pixels.shape[-1] == 1:
        return [Image.fromarray(pixel.squeeze(), mode="L") for pixel in pixels]
    return [Image.fromarray(pixel) for pixel in pixels]


def round_on_device(processor: Any) -> Any:
    """The pipeline's image processor, made to round "pil" outputs on the device (once; a
    processor without diffusers' conditional denormalization is left as it is)."""
    if processor is None or getattr(processor, MARK, False) or not hasattr(processor, "_denormalize_conditionally"):
        return processor
    original = processor.postprocess

    def postprocess(image, output_type: str = "pil", do_denormalize=None, **kwargs):
        import torch

        if output_type != "pil" or kwargs or not isinstance(image, torch.Tensor) or image.ndim != 4:
            return original(image, output_type=output_type, do_denormalize=do_denormalize, **kwargs)
        return to_pictures(processor._denormalize_conditionally(image, do_denormalize))

    processor.postprocess = postprocess
    setattr(processor, MARK, True)
    return processor
