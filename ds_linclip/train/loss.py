"""CLIP contrastive loss across data-parallel ranks.

The loss is the mean of the image->text and text->image cross-entropies over the
similarity matrix `logit_scale * image_features @ text_features.T`. Across ranks the
features of every rank are gathered so each rank contrasts against the global batch:

- `gather_with_grad=True`: an autograd-aware all-gather (`all_gather_with_grad`); the
  backward pass sums the incoming gradients over ranks, so after DeepSpeed averages
  parameter gradients the result is exactly the gradient of the global-batch loss.
- `gather_with_grad=False`: other ranks' features are constants; only this rank's own rows
  carry gradient (open_clip's cheaper default, an approximation).
- `local_loss=True`: each rank scores only its own rows (B x global B logits) instead of the
  full global square; the mean over ranks equals the full loss, at 1/world of the compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        batch = image_features.shape[0]
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed:
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


def _symmetric_ce(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # CE in fp32 whatever the compute precision: bf16 log-softmax over a wide row loses the signal
    return (
        F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)
    ) / 2
