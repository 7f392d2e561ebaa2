"""CLIP models with a per-tower attention kind (softmax or linear)."""
