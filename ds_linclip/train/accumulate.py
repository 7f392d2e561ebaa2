"""What one accumulation unit of the step loop does: its loss, then its backward and engine.step().

- `MicroStep` (train.accum_freq = 1): one micro-batch, its own loss, one backward. DeepSpeed's
  `gradient_accumulation_steps` (= train.grad_accum_steps) of them make an optimizer step, each
  loss seeing only its own micro-batch's negatives.
- `FeatureCachedStep` (train.accum_freq = N > 1): open_clip's `--accum-freq`. N micro-batches are
  encoded without autograd and their features kept; the contrastive loss over all N is the step's
  loss. Then each micro-batch is encoded again with autograd, its slice of the cached features is
  replaced by the live one, and that loss is back-propagated (into this micro-batch's activations
  only) before the next is encoded. Summed over the N backwards the gradient is the gradient of
  the loss over the N-times larger batch, while only one micro-batch's activations live at a time;
  the extra memory is the cached (N x B, embed_dim) features of each tower.

Under DeepSpeed the N re-encodings are its N accumulation micro-steps (`gradient_accumulation_steps`
= N, see engine.build_ds_config): `engine.backward` on each, `engine.step()` after each, the optimizer
steps at the N-th. Each backward is unscaled (`scale_wrt_gas=False`): the N losses are one loss's
pieces, not N losses to average. The logit scale and bias enter every one of the N losses, so each
carries 1/N of their gradient (open_clip lets each carry all of it, N times the true gradient).
A micro-batch's second encoding draws the same random numbers as its first (patch dropout keeps
the same patches): the random generators are rewound to where they stood before the first.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def model_outputs(engine, batch: Sequence, input_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The model on a (images, tokens, ...) batch -> (image_features (B, E), text_features (B, E),
    logit_scale[, logit_bias]) in fp32, the losses' precision."""
    images, tokens = batch[0], batch[1]
    outputs = engine(images.to(engine.device, input_dtype), tokens.to(engine.device))
    return tuple(t.float() for t in outputs)


class MicroStep:
    """One micro-batch per unit: `loss(batches)` with autograd, `backward_and_step(loss)`."""

    batches_per_unit = 1

    def __init__(self, engine, loss_fn: nn.Module, input_dtype: torch.dtype, objective=None):
        self.engine, self.loss_fn, self.input_dtype = engine, loss_fn, input_dtype
        self.objective = objective  # loss -> loss (train.linearize's), or None

    def loss(self, batches: Sequence[Sequence]) -> torch.Tensor:
        (batch,) = batches
        loss = self.loss_fn(*model_outputs(self.engine, batch, self.input_dtype))
        return self.objective(loss) if self.objective is not None else loss

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()


def _generators(module: nn.Module) -> list[torch.Generator]:
    """torch's default CPU generator and every torch.Generator a submodule holds (patch dropout's)."""
    held = [value for sub in module.modules() for value in vars(sub).values() if isinstance(value, torch.Generator)]
    return [torch.default_generator, *held]


def _gradient_share(tensor: torch.Tensor, parts: int) -> torch.Tensor:
    """`tensor`'s value, carrying 1/parts of the gradient that reaches it."""
    return tensor.detach() + (tensor - tensor.detach()) / parts


class FeatureCachedStep:
    """`batches_per_unit` (train.accum_freq) micro-batches per unit, one loss over all of them."""

    def __init__(self, engine, loss_fn: nn.Module, input_dtype: torch.dtype, accum_freq: int):
        if accum_freq < 2:
            raise ValueError(f"feature-cached accumulation needs accum_freq >= 2, got {accum_freq}")
        self.engine, self.loss_fn, self.input_dtype = engine, loss_fn, input_dtype
        self.batches_per_unit = int(accum_freq)
        self.batches: list[Sequence] = []
        self.generators: list[torch.Generator] = []  # _generators(), found once per unit by loss()
        self.cached: list[list[torch.Tensor]] = []  # per tower: N tensors (B, E), no autograd graph
        self.random_states: list[list[torch.Tensor]] = []  # per micro-batch: generator states before it
        # the last backward_and_step's N loss values (all = the loss), detached: no device sync per micro-step
        self.piece_losses: list[torch.Tensor] = []

    def loss(self, batches: Sequence[Sequence]) -> torch.Tensor:
        """The loss over all micro-batches' features (no autograd graph); caches the features."""
        if len(batches) != self.batches_per_unit:
            raise ValueError(f"expected {self.batches_per_unit} micro-batches, got {len(batches)}")
        self.batches = list(batches)
        self.generators = _generators(self.engine.module)  # the same ones for the re-encoding
        self.random_states, outputs = [], []
        with torch.no_grad():
            for batch in self.batches:
                self.random_states.append([g.get_state() for g in self.generators])
                outputs.append(model_outputs(self.engine, batch, self.input_dtype))
            self.cached = [[out[tower] for out in outputs] for tower in (0, 1)]
            return self.loss_fn(*(torch.cat(tower) for tower in self.cached), *outputs[-1][2:])

    def backward_and_step(self, loss: torch.Tensor | None = None) -> None:
        """Re-encode each micro-batch with autograd in the cached features' place; backward; engine.step()."""
        parts, generators = self.batches_per_unit, self.generators
        after_caching = [g.get_state() for g in generators]
        self.piece_losses = []
        for index, batch in enumerate(self.batches):
            for generator, state in zip(generators, self.random_states[index]):
                generator.set_state(state)
            image_features, text_features, *scalars = model_outputs(self.engine, batch, self.input_dtype)
            features = [
                torch.cat(cached[:index] + [live] + cached[index + 1:])
                for cached, live in zip(self.cached, (image_features, text_features))
            ]
            piece = self.loss_fn(*features, *(_gradient_share(s, parts) for s in scalars))
            self.engine.backward(piece, scale_wrt_gas=False)
            self.engine.step()
            self.piece_losses.append(piece.detach())
        for generator, state in zip(generators, after_caching):
            generator.set_state(state)
        self.batches, self.cached, self.random_states, self.generators = [], [], [], []
