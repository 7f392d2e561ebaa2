"""Timing and memory of training steps measured in this process, side by side: plain PyTorch + AdamW
on a synthetic batch of the training shape, the variants alternating with their order rotated each
round, medians over rounds (a shared machine's noise then lands on every variant alike)."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

from ds_linclip.experiments.runs import RunSpec

EOT_TOKEN = 49407  # the tokenizer's end-of-text id (its max id); the text tower pools there


def synthetic_batch(batch_size: int, image_size: int, context_length: int, seed: int = 0) -> tuple[Any, Any]:
    """(images (batch, 3, image_size, image_size) standard normal, tokens (batch, context_length) random ids
    with EOT last), from one generator seeded `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(1, 49000, (batch_size, context_length), generator=generator)
    tokens[:, -1] = EOT_TOKEN
    return images, tokens


def time_alternating(steps: dict[str, Callable[[], Any]], rounds: int,
                     after_each: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each named step over `rounds` rounds; every round runs each step once, the order
    rotated by one each round so no step always runs first (or right after the most expensive one).
    after_each(round_index) is called after every timed step."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            seconds[name].append(time.perf_counter() - start)
            if after_each is not None:
                after_each(round_index)
    return seconds


def saved_activation_bytes(step: Callable[[], Any], params: Iterable[Any]) -> tuple[int, Any]:
    """Bytes of the distinct tensor storages autograd saves for backward while `step()` builds the
    graph, parameters (and views of them) excluded. Returns (bytes, step's result)."""
    import torch

    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = step()
    return sum(saved.values()), out


def contrastive_loss(image_features, text_features, logit_scale):
    """CLIP's symmetric cross-entropy over the batch (what ds_linclip.train.loss computes on one rank)."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def interleaved_timing(specs: Sequence[RunSpec], rounds: int, batch_size: int, progress: bool = True) -> dict[str, dict]:
    """Median training-step images/s and activation memory per run spec (keyed by its shape_name:
    seed and steps do not change a step's cost), kinds alternating.

    Specs are grouped by (image size, width); inside a group every round times one step of each
    kind, the order rotated by one each round so no kind always runs first (or right after the
    most expensive one). One untimed warm-up step per kind measures the activation memory.
    """
    import torch
    from tqdm import tqdm

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model

    groups: dict[tuple[int, int], list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.image_size, spec.width), []).append(spec)
    results: dict[str, dict] = {}
    bar = tqdm(total=sum(len(g) * (rounds + 1) for g in groups.values()), desc="interleaved timing",
               disable=not progress, leave=False)
    for (image_size, _width), group in groups.items():
        states = {}
        images, tokens = synthetic_batch(batch_size, image_size, group[0].budget.context_length)
        for spec in group:
            torch.manual_seed(spec.budget.seed)
            model = build_model(load_config([], spec.model_overrides()).model)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            states[spec.shape_name] = (model, optimizer)

        def step(name: str, measure: bool = False) -> int:
            model, optimizer = states[name]
            optimizer.zero_grad(set_to_none=True)
            forward = lambda: contrastive_loss(*model(images, tokens))  # noqa: E731
            if measure:
                activation_bytes, loss = saved_activation_bytes(forward, model.parameters())
            else:
                activation_bytes, loss = 0, forward()
            loss.backward()
            optimizer.step()
            return activation_bytes

        for spec in group:  # warm-up (allocator, one-time kernels) + activation memory
            results[spec.shape_name] = {"activation_mib": step(spec.shape_name, measure=True) / 2**20, "seconds": []}
            bar.update()
        names = [s.shape_name for s in group]

        def advance(round_index: int) -> None:
            bar.update()
            bar.set_postfix_str(f"{image_size}px round {round_index + 1}/{rounds}")

        seconds = time_alternating({name: functools.partial(step, name) for name in names}, rounds, advance)
        for name in names:
            median = statistics.median(seconds[name]) if seconds[name] else None
            results[name].update(seconds=seconds[name], images_per_s=batch_size / median if median else None,
                                 batch_size=batch_size)
        del states
    bar.close()
    return results
