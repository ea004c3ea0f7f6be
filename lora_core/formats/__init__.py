"""LoRA files: kohya/diffusers naming, metadata, the toolbox (resize, merge, extract) and block weights."""
