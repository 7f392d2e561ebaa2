"""Model shapes, as plain data (no torch), so the config loader can use them.

The S/B/L shapes are those of open_clip's `ViT-S-16`, `ViT-B-16` and `ViT-L-16` model configs
(vision head width 64; text heads as open_clip states them). `tiny` is a CPU-sized model
for tests and the Fashion-MNIST demo. Only the keys given here differ from the schema's
defaults in `ds_linclip.config`.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "vit_s16": {
        "embed_dim": 384,
        "image": {"image_size": 224, "patch_size": 16, "width": 384, "layers": 12, "heads": 6},
        "text": {"context_length": 77, "vocab_size": 49408, "width": 384, "layers": 12, "heads": 6},
    },
    "vit_b16": {
        "embed_dim": 512,
        "image": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12, "heads": 8},
    },
    "vit_l16": {
        "embed_dim": 768,
        "image": {"image_size": 224, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16},
        "text": {"context_length": 77, "vocab_size": 49408, "width": 768, "layers": 12, "heads": 12},
    },
    # Fashion-MNIST demo scale: 28 px images resized to 32, patch 4 -> 64 patches + CLS.
    "tiny": {
        "embed_dim": 128,
        "image": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "heads": 4},
        "text": {"context_length": 32, "vocab_size": 49408, "width": 128, "layers": 4, "heads": 4},
    },
}

# open_clip's names for the presets that have an open_clip counterpart (parity tests, convert).
OPEN_CLIP_NAMES: dict[str, str] = {"vit_s16": "ViT-S-16", "vit_b16": "ViT-B-16", "vit_l16": "ViT-L-16"}
