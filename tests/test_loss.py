"""ClipLoss on 2 gloo ranks equals the single-process loss on the concatenated batch; SigLipLoss
on 2 (and 3) gloo ranks equals open_clip's SigLipLoss, loss and gradients, for every dist."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ds_linclip.config import SIGLIP_DISTS
from ds_linclip.train.loss import ClipLoss, SigLipLoss

WORLD, BATCH, IN_DIM, EMBED = 2, 5, 12, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoders_and_data():
    gen = torch.Generator().manual_seed(0)
    image_encoder = torch.nn.Linear(IN_DIM, EMBED)
    text_encoder = torch.nn.Linear(IN_DIM, EMBED)
    with torch.no_grad():
        for p in list(image_encoder.parameters()) + list(text_encoder.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    images = torch.randn(WORLD * BATCH, IN_DIM, generator=gen)
    texts = torch.randn(WORLD * BATCH, IN_DIM, generator=gen)
    logit_scale = torch.tensor(2.3, requires_grad=True)
    return image_encoder, text_encoder, images, texts, logit_scale


def _loss_and_grads(loss_fn, image_encoder, text_encoder, images, texts, logit_scale):
    image_features = F.normalize(image_encoder(images), dim=-1)
    text_features = F.normalize(text_encoder(texts), dim=-1)
    loss = loss_fn(image_features, text_features, logit_scale.exp())
    params = [*image_encoder.parameters(), *text_encoder.parameters(), logit_scale]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), [g.detach() for g in grads]


LOCAL_LOSS = (True, False)


def _rank_main(rank: int, port: int, out_path: str):
    """Both local_loss settings in one process group (one spawn of the ranks for the two checks)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for local_loss in LOCAL_LOSS:
            image_encoder, text_encoder, images, texts, logit_scale = _encoders_and_data()
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            loss, grads = _loss_and_grads(
                ClipLoss(local_loss=local_loss, gather_with_grad=True),
                image_encoder, text_encoder, images[rows], texts[rows], logit_scale,
            )
            # what data parallelism does with them: average loss (for logging) and gradients
            dist.all_reduce(loss)
            for g in grads:
                dist.all_reduce(g)
            results[local_loss] = (loss / WORLD, [g / WORLD for g in grads])
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("loss") / "rank0.pt")
    mp.start_processes(_rank_main, args=(_free_port(), out_path), nprocs=WORLD, start_method="spawn")
    return torch.load(out_path)


@pytest.mark.parametrize("local_loss", LOCAL_LOSS)
def test_distributed_loss_and_grads_match_single_process(local_loss, distributed_results):
    reference_loss, reference_grads = _loss_and_grads(ClipLoss(), *_encoders_and_data())
    loss, grads = distributed_results[local_loss]
    assert torch.allclose(loss, reference_loss, atol=1e-5), (loss, reference_loss)
    assert len(grads) == len(reference_grads)
    for g, ref in zip(grads, reference_grads):
        assert torch.allclose(g, ref, atol=1e-5), (g - ref).abs().max()
    # the reference is not trivially zero: the check would catch a missing gather
    assert all(ref.abs().max() > 1e-3 for ref in reference_grads)


def test_single_process_loss_matches_cross_entropy_by_hand():
    image_features = F.normalize(torch.randn(4, 3), dim=-1)
    text_features = F.normalize(torch.randn(4, 3), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image_features @ text_features.T
    by_hand = 0.0
    for i in range(4):
        by_hand -= torch.log_softmax(logits[i], 0)[i] / 8 + torch.log_softmax(logits[:, i], 0)[i] / 8
    assert torch.allclose(ClipLoss()(image_features, text_features, scale), by_hand, atol=1e-6)


# ----------------------------------------------------------------------------- SigLIP vs open_clip
SIGLIP_BATCH, SIGLIP_DIM = 4, 6


def _siglip_inputs(rank: int):
    """This rank's leaves: image and text features (B, D), L2-normalised, and the raw logit scale
    and bias at a point where positives and negatives both carry gradient."""
    gen = torch.Generator().manual_seed(100 + rank)
    image = F.normalize(torch.randn(SIGLIP_BATCH, SIGLIP_DIM, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(SIGLIP_BATCH, SIGLIP_DIM, generator=gen), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(10.0) + 0.1 * rank, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    return image, text, log_scale, bias


def _siglip_loss_and_grads(loss_fn, rank: int):
    leaves = _siglip_inputs(rank)
    image, text, log_scale, bias = leaves
    loss = loss_fn(image, text, log_scale.exp(), bias)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def _siglip_rank_main(rank: int, world: int, port: int, out_path: str):
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

    from ds_linclip.train.loss import SigLipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for dist_impl in SIGLIP_DISTS:
            ours = _siglip_loss_and_grads(SigLipLoss(dist=dist_impl), rank)
            theirs = _siglip_loss_and_grads(OpenClipSigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl), rank)
            results[dist_impl] = (ours, theirs)
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_siglip_single_process_matches_open_clip():
    """One process (no exchange): loss and gradients equal open_clip's; the distributed cases below
    are slow (each spawned rank imports open_clip)."""
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

    ours, theirs = _siglip_loss_and_grads(SigLipLoss(), 0), _siglip_loss_and_grads(OpenClipSigLipLoss(), 0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(g.abs().max() > 1e-3 for g in ours[1:])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_siglip_loss_and_grads_match_open_clip(world, tmp_path):
    """Per rank: the loss and its gradients w.r.t. image features, text features, the (log) logit
    scale and the bias equal open_clip's SigLipLoss for every train.siglip_dist. World 2 exchanges
    once one way; world 3 runs a bidirectional round."""
    out_path = str(tmp_path / "siglip")
    mp.start_processes(_siglip_rank_main, args=(world, _free_port(), out_path), nprocs=world, start_method="spawn")
    names = ("loss", "image_features", "text_features", "logit_scale", "logit_bias")
    for rank in range(world):
        results = torch.load(f"{out_path}.{rank}")
        assert set(results) == set(SIGLIP_DISTS)
        for dist_impl, (ours, theirs) in results.items():
            for name, a, b in zip(names, ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{dist_impl} {name} rank {rank}: {m}")
        # the non-local chunks count: the text gradient differs from a loss over the local chunk alone
        local_only = _siglip_loss_and_grads(SigLipLoss(), rank)
        assert not torch.allclose(local_only[2], results["bidir"][0][2], atol=1e-4)
        assert all(g.abs().max() > 1e-3 for g in results["bidir"][0][1:])
