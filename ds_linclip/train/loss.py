"""The contrastive losses across data-parallel ranks: CLIP's softmax loss and SigLIP's sigmoid loss.

`build_loss(cfg.train)` picks one (`train.loss: clip | siglip`). Both take
`(image_features (B, D), text_features (B, D), logit_scale, logit_bias=None)` with L2-normalised
features and an exponentiated logit_scale, and return a scalar.

CLIP (`ClipLoss`): the mean of the image->text and text->image cross-entropies over the
similarity matrix `logit_scale * image_features @ text_features.T`. Across ranks the
features of every rank are gathered so each rank contrasts against the global batch:

- `gather_with_grad=True`: an autograd-aware all-gather (`all_gather_with_grad`); the
  backward pass sums the incoming gradients over ranks, so after DeepSpeed averages
  parameter gradients the result is exactly the gradient of the global-batch loss.
- `gather_with_grad=False`: other ranks' features are constants; only this rank's own rows
  carry gradient (open_clip's cheaper default, an approximation).
- `local_loss=True`: each rank scores only its own rows (B x global B logits) instead of the
  full global square; the mean over ranks equals the full loss, at 1/world of the compute.

SigLIP (`SigLipLoss`): every image-text pair is an independent binary classification,
`-log sigmoid(±(logit_scale * <i, t> + logit_bias))`, summed over pairs and divided by the local
batch. Each rank scores its own images against every rank's texts: its own chunk with the
positives on the diagonal, every other chunk as negatives only. `train.siglip_dist` says how the
other chunks arrive, both differentiable (gradients flow back to the rank that owns the texts):
- `bidir` (default): passed around the ring, to both neighbours at once (world - 1 exchanges of
  one chunk, half the rounds of a one-way ring; no rank ever holds more than two extra chunks).
- `gather`: one all-gather of every rank's texts (world chunks in memory at once).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_linclip.config import SIGLIP_DISTS


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the output gradients over ranks and returns this
    rank's slice (a reduce-scatter written as all_reduce + slice, which gloo supports)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, D) on each rank -> (world * B, D), rank-major, differentiable."""
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (world * B, D); this rank's rows stay the (differentiable) input."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the (optionally rank-gathered) batch.

    forward(image_features (B, D), text_features (B, D), logit_scale: scalar tensor, already
    exponentiated) -> scalar loss. Features are expected L2-normalised; B equal on all ranks.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logit_bias is not None:
            raise ValueError("the CLIP loss has no logit bias; a model with one trains with train.loss=siglip")
        batch = image_features.shape[0]
        if not _distributed():
            logits_per_image = logit_scale * image_features @ text_features.T
            labels = torch.arange(batch, device=image_features.device)
            return _symmetric_ce(logits_per_image, logits_per_image.T, labels)

        gather = all_gather_with_grad if self.gather_with_grad else all_gather_no_grad
        all_image, all_text = gather(image_features), gather(text_features)
        if self.local_loss:
            # this rank's rows against every rank's columns: (B, world * B)
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(batch, device=image_features.device) + dist.get_rank() * batch
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        return _symmetric_ce(logits_per_image, logits_per_text, labels)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _p2p(tensors: Sequence[torch.Tensor], send_to: Sequence[int], recv_from: Sequence[int]) -> list[torch.Tensor]:
    """Send tensors[i] to rank send_to[i] and receive, from rank recv_from[i], a tensor shaped like
    tensors[i]; all at once (one batch_isend_irecv)."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in zip(tensors, send_to)]
    ops += [dist.P2POp(dist.irecv, r, peer) for r, peer in zip(received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _Exchange(torch.autograd.Function):
    """`_p2p` whose backward sends each received tensor's gradient back to the rank it came from
    (and receives the gradients of what this rank sent)."""

    @staticmethod
    def forward(ctx, send_to: tuple[int, ...], recv_from: tuple[int, ...], *tensors: torch.Tensor):
        ctx.send_to, ctx.recv_from = send_to, recv_from
        return tuple(_p2p(tensors, send_to, recv_from))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None, None, *_p2p([g.contiguous() for g in grads], ctx.recv_from, ctx.send_to))


def ring_exchange(tensors: Sequence[torch.Tensor], send_to: Sequence[int], recv_from: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Differentiable point-to-point exchange: tensors[i] goes to send_to[i]; returns what
    recv_from[i] sent (same shapes)."""
    return _Exchange.apply(tuple(send_to), tuple(recv_from), *tensors)


def _sigmoid_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None, with_positives: bool,
) -> torch.Tensor:
    """Sum over the (B_image, B_text) pairs of -log sigmoid(sign * logit), / B_image; sign +1 on
    the diagonal when `with_positives` (the matching pairs), -1 everywhere else."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    signs = -torch.ones_like(logits)
    if with_positives:
        signs = signs + 2 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss (Zhai et al. 2023) over this rank's images x every rank's texts.

    forward(image_features (B, D), text_features (B, D), logit_scale: exponentiated scalar,
    logit_bias: scalar or None) -> scalar; B equal on all ranks. `dist`: bidir | gather (see the
    module docstring); one rank needs no communication.
    """

    def __init__(self, dist: str = "bidir"):
        super().__init__()
        if dist not in SIGLIP_DISTS:
            raise ValueError(f"SigLIP dist {dist!r} is not one of {', '.join(SIGLIP_DISTS)}")
        self.dist = dist

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = _sigmoid_loss(image_features, text_features, logit_scale, logit_bias, with_positives=True)
        for other_texts in self._other_ranks_texts(text_features):
            loss = loss + _sigmoid_loss(image_features, other_texts, logit_scale, logit_bias, with_positives=False)
        return loss

    def _other_ranks_texts(self, text_features: torch.Tensor):
        """Every other rank's (B, D) text chunk once, differentiably."""
        if not _distributed():
            return
        rank, world = dist.get_rank(), dist.get_world_size()
        if self.dist == "gather":
            for other, chunk in enumerate(all_gather_with_grad(text_features).chunk(world)):
                if other != rank:
                    yield chunk
            return
        left, right = (rank - 1) % world, (rank + 1) % world
        to_left = to_right = text_features
        rounds, one_more = divmod(world - 1, 2)
        for _ in range(rounds):  # chunks travel both ways round the ring: after k rounds, ranks ±k
            from_right, from_left = ring_exchange([to_left, to_right], [left, right], [right, left])
            yield from_right
            yield from_left
            to_left, to_right = from_right, from_left
        if one_more:  # an even world: the rank opposite, one step further to the right
            (from_left,) = ring_exchange([to_right], [right], [left])
            yield from_left


def build_loss(train_cfg) -> nn.Module:
    """The loss `train.loss` names, with its options (`train.local_loss`/`gather_with_grad` for
    clip, `train.siglip_dist` for siglip)."""
    if train_cfg.loss == "siglip":
        return SigLipLoss(dist=str(train_cfg.siglip_dist))
    return ClipLoss(local_loss=bool(train_cfg.local_loss), gather_with_grad=bool(train_cfg.gather_with_grad))


def _symmetric_ce(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # CE in fp32 whatever the compute precision: bf16 log-softmax over a wide row loses the signal
    return (
        F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)
    ) / 2
