"""Tiny models with the real architectures, and probes run in ComfyUI's own process."""
