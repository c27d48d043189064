"""engine: a local-first, crash-proof job orchestrator for Stable-Diffusion-class image generation."""

__version__ = "0.1.0"
