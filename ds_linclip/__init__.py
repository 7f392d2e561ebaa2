"""ds_linclip: DeepSpeed trainer for CLIP with linear attention (see README.md and DESIGN)."""

__version__ = "0.1.0"
