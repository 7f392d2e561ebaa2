"""train.accum_freq: one feature-cached step over N micro-batches == one step on the N-times larger batch.

2 gloo ranks (spawned), real DeepSpeed engines built by our engine code (ZeRO 0, 2, 3, fp32) over a
small CLIP; the optimizer is plain SGD (lr 1) so the parameter update is the gradient itself (Adam's
first step is nearly sign(g) and would hide a wrong gradient scale). Each case builds two engines
from the same seed: `accum_freq=N, micro_batch_size=B` (FeatureCachedStep) and `accum_freq=1,
micro_batch_size=N*B` (MicroStep), feeds each rank the same N*B samples, and compares the loss and
every parameter's update. All cases run in one spawned job (DeepSpeed's start-up is the cost).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from trainer_launch import free_port

WORLD, ACCUM, MICRO = 2, 3, 2
SMALL_MODEL = [
    "model.preset=tiny", "model.embed_dim=32", "model.image.width=64", "model.image.layers=2",
    "model.text.width=64", "model.text.layers=2", "model.text.vocab_size=512", "model.text.context_length=16",
    "train.precision=fp32", "train.grad_clip=0",
]
# name -> overrides; every stage with both losses, clip's flag variants, and activation checkpointing
CASES = {
    "zero0-clip": ["train.zero_stage=0"],
    "zero0-clip-no-local-no-grad-gather": ["train.zero_stage=0", "train.local_loss=false", "train.gather_with_grad=false"],
    "zero0-siglip-bidir": ["train.zero_stage=0", "train.loss=siglip"],
    "zero2-clip": ["train.zero_stage=2"],
    "zero2-siglip-gather": ["train.zero_stage=2", "train.loss=siglip", "train.siglip_dist=gather"],
    "zero3-clip-global-loss": ["train.zero_stage=3", "train.local_loss=false"],
    "zero3-siglip-bidir": ["train.zero_stage=3", "train.loss=siglip"],
    "zero2-clip-grad-checkpointing": ["train.zero_stage=2", "train.grad_checkpointing=1"],
}


# patch dropout draws at random: the step is not the big batch's (other draws), but each micro-batch's
# second encoding must keep the patches of its first, or the pieces are not pieces of one loss
PATCH_DROPOUT_CASE = ["train.zero_stage=2", "model.image.patch_dropout=0.5"]


def _full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter whole, in fp32 (collective under ZeRO-3: all ranks, same order)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (param.detach() if full is None else full).float().clone()
    return out


def _one_step(overrides: list[str], batches: list[tuple[torch.Tensor, torch.Tensor]], measure: dict | None = None):
    """(loss, parameters before, parameters after) of one optimizer step with these overrides."""
    import deepspeed

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model
    from ds_linclip.train.accumulate import FeatureCachedStep, MicroStep
    from ds_linclip.train.engine import build_ds_config, promote_scalar_parameters
    from ds_linclip.train.loss import build_loss

    cfg = load_config(overrides=SMALL_MODEL + overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.set_grad_checkpointing(int(cfg.train.grad_checkpointing))
    model.visual.patch_dropout_generator = torch.Generator().manual_seed(1)  # as the step loop holds one
    promote_scalar_parameters(model)
    ds_config = build_ds_config(cfg, WORLD, device="cpu")
    assert ds_config["gradient_accumulation_steps"] == cfg.train.accum_freq
    ds_config.pop("optimizer"), ds_config.pop("scheduler")
    ds_config["zero_allow_untested_optimizer"] = True
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    before = _full_params(engine)
    loss_fn = build_loss(cfg.train)
    if cfg.train.accum_freq > 1:
        unit = FeatureCachedStep(engine, loss_fn, torch.float32, int(cfg.train.accum_freq))
    else:
        unit = MicroStep(engine, loss_fn, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = unit.loss(batches)
    if measure is not None:
        measure["saved_numel"] = sum(saved)
        measure["loss_has_graph"] = loss.grad_fn is not None
        if isinstance(unit, FeatureCachedStep):
            measure["cached_numel"] = sum(t.numel() for tower in unit.cached for t in tower)
            measure["cached_need_grad"] = any(t.requires_grad for tower in unit.cached for t in tower)
    assert engine.is_gradient_accumulation_boundary() == (cfg.train.accum_freq == 1)
    unit.backward_and_step(loss)
    if measure is not None and isinstance(unit, FeatureCachedStep):
        measure["piece_losses"] = [float(piece) for piece in unit.piece_losses]
    assert engine.global_steps == 1, "one optimizer step"
    after = _full_params(engine)
    engine.destroy()
    return float(loss.detach()), before, after


def _rank_main(rank: int, port: int, out_path: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from ds_linclip.train.engine import dist_env, init_distributed

    init_distributed(dist_env())
    gen = torch.Generator().manual_seed(rank)
    images = torch.randn(ACCUM * MICRO, 3, 32, 32, generator=gen)
    tokens = torch.randint(1, 512, (ACCUM * MICRO, 16), generator=gen)
    micro_batches = [(images[i * MICRO:(i + 1) * MICRO], tokens[i * MICRO:(i + 1) * MICRO]) for i in range(ACCUM)]
    results = {}
    for name, overrides in CASES.items():
        accum_measure, big_measure = {}, {}
        accum = _one_step(overrides + [f"train.accum_freq={ACCUM}", f"train.micro_batch_size={MICRO}"],
                          micro_batches, accum_measure)
        big = _one_step(overrides + [f"train.micro_batch_size={ACCUM * MICRO}"], [(images, tokens)], big_measure)
        results[name] = {"accum": accum, "big": big, "accum_measure": accum_measure, "big_measure": big_measure}
    dropout_measure = {}
    dropout_loss, *_ = _one_step(PATCH_DROPOUT_CASE + [f"train.accum_freq={ACCUM}", f"train.micro_batch_size={MICRO}"],
                                 micro_batches, dropout_measure)
    no_dropout_loss, *_ = _one_step(PATCH_DROPOUT_CASE[:1] + [f"train.accum_freq={ACCUM}", f"train.micro_batch_size={MICRO}"],
                                    micro_batches)
    results["patch_dropout"] = {"loss": dropout_loss, "no_dropout_loss": no_dropout_loss, **dropout_measure}
    torch.save(results, f"{out_path}.{rank}")


@pytest.fixture(scope="module")
def step_results(tmp_path_factory) -> list[dict]:
    out_path = str(tmp_path_factory.mktemp("accumulate") / "results")
    mp.start_processes(_rank_main, args=(free_port(), out_path), nprocs=WORLD, start_method="spawn")
    return [torch.load(f"{out_path}.{rank}", weights_only=False) for rank in range(WORLD)]


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", list(CASES))
def test_feature_cached_step_equals_one_big_batch_step(step_results, case):
    for rank, results in enumerate(step_results):
        (accum_loss, before, accum_after), (big_loss, big_before, big_after) = results[case]["accum"], results[case]["big"]
        assert accum_loss == pytest.approx(big_loss, rel=1e-5), (rank, accum_loss, big_loss)
        assert before.keys() == big_before.keys() == accum_after.keys()
        moved = 0
        for name in before:
            torch.testing.assert_close(before[name], big_before[name], rtol=0, atol=0)  # same start
            update, big_update = accum_after[name] - before[name], big_after[name] - before[name]
            torch.testing.assert_close(update, big_update, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")
            moved += int(big_update.abs().max() > 1e-4)
        assert moved > len(before) // 2, f"{case}: only {moved} of {len(before)} parameters moved"
        assert "logit_bias" in before if "siglip" in case else "logit_bias" not in before


def test_cached_forward_keeps_no_autograd_graph(step_results):
    """The caching forward saves no tensor for backward (only the features stay); a forward with
    autograd over the same samples saves activations."""
    for results in step_results:
        for case in CASES:
            result = results[case]
            accum, big = result["accum_measure"], result["big_measure"]
            assert accum["saved_numel"] == 0 and not accum["loss_has_graph"] and not accum["cached_need_grad"], case
            assert accum["cached_numel"] == 2 * ACCUM * MICRO * 32  # two towers x (N*B, embed_dim)
            assert big["loss_has_graph"] and big["saved_numel"] > accum["cached_numel"], case


def test_each_piece_is_the_loss_under_patch_dropout(step_results):
    """Every re-encoded micro-batch keeps its cached patches: each of the N losses back-propagated
    equals the step's loss (with other patches they would differ)."""
    for results in step_results:
        for case in CASES:
            assert results[case]["accum_measure"]["piece_losses"] == pytest.approx([results[case]["accum"][0]] * ACCUM, rel=1e-6)
        dropout = results["patch_dropout"]
        assert dropout["loss"] != pytest.approx(dropout["no_dropout_loss"], rel=1e-4)  # patches were dropped
        assert dropout["piece_losses"] == pytest.approx([dropout["loss"]] * ACCUM, rel=1e-6)
