"""The training loop: one DeepSpeed engine, steps, logging, checkpoints, signals, final export.

Run dir R = {train.output_dir}/{train.run_name}:
    R/config.yaml  R/ds_config.json  R/tensorboard/  R/checkpoints/  R/final/  R/DONE
(see CONTRACT.md). A step is one optimizer step = `grad_accum_steps` x `accum_freq` micro-batches
per rank (one of the two is 1; see train/accumulate.py).

Exit codes: 0 done; REQUEUE_EXIT_CODE (75) after SIGTERM/SIGUSR1 -> checkpoint (Slurm
requeues on it), or no checkpoint when the signal came before the first step (nothing new to
save; `latest`, if any, is untouched); NONFINITE_EXIT_CODE (3) after `max_nonfinite_steps`
non-finite losses in a row (the last good checkpoint is left as `latest`).

Signals: the handlers are installed by the CLI before anything else is imported
(`signals.install()`); the ranks agree on a stop with an all-reduce right after the process
group exists, again once the engine and loader are built, and in every micro-step. Each of
these is a collective every rank reaches in the same order, so ranks that got the signal at
different moments (or only one of them) leave together and none waits for a departed one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ds_linclip.config import to_yaml
from ds_linclip.train import checkpoint as ckpt
from ds_linclip.train.accumulate import FeatureCachedStep, MicroStep
from ds_linclip.train.engine import (
    all_reduce_floats, build_ds_config, build_engine, dist_env, global_batch_size, init_distributed,
    micro_batches_per_step, param_groups, promote_scalar_parameters, write_ds_config,
)
from ds_linclip.train.linearize import Linearizer
from ds_linclip.train.loss import build_loss
from ds_linclip.train.phases import Phase, phase_at, plan_phases
from ds_linclip.train.lr_groups import describe_groups, lr_scales, scheduled_lr
from ds_linclip.train.signals import REQUEUE_EXIT_CODE, StopRequest, install as install_stop_handlers

NONFINITE_EXIT_CODE = 3
# CLIP's cap on the learned temperature: logit_scale <= ln(100)
MAX_LOGIT_SCALE = math.log(100.0)

log = logging.getLogger("ds_linclip.train")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.run_name


def agree_to_stop(stop: StopRequest) -> bool:
    """Collective (every rank, same order): True on every rank if any rank got a stop signal."""
    (signum,) = all_reduce_floats([float(stop.signum or 0)], op=dist.ReduceOp.MAX)
    if signum and not stop.requested:
        stop.signum = int(signum)  # another rank got it: leave together, under its signal's name
    return bool(signum)


def _stop_before_training(stop: StopRequest, is_main: bool, where: str) -> int:
    if is_main:
        log.info("stopped on %s %s, before any training step: nothing new to checkpoint; exit %d",
                 stop.name, where, REQUEUE_EXIT_CODE)
    return REQUEUE_EXIT_CODE


class NonFiniteGuard:
    """Counts non-finite losses; `limit` in a row raise `NonFiniteLossError`."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.in_a_row = 0
        self.total = 0

    def update(self, finite: bool, step: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"loss was NaN/Inf for {self.in_a_row} micro-batches in a row (train.max_nonfinite_steps="
                f"{self.limit}) at step {step}; stopping. The last good checkpoint is the one named in "
                "checkpoints/latest; lower train.lr, raise train.warmup_steps, or use fp32/bf16 instead of fp16."
            )


class NonFiniteLossError(RuntimeError):
    pass


def peak_memory_mb() -> float:
    """Peak memory of this process: accelerator allocations, or the CPU process's peak RSS."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    return accel.max_memory_allocated() / 2**20


def clamp_logit_scale(engine, max_value: float = MAX_LOGIT_SCALE) -> float:
    """Clamp logit_scale in DeepSpeed's fp32 master copy (ZeRO 1/2/3, bf16 optimizer) and in the
    module's working copy; clamping only the module copy would be undone by the next step.
    Collective under ZeRO: call on every rank. Returns the (clamped) value."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = engine.module.logit_scale
    master = safe_get_full_fp32_param(param)
    if master is None:  # no separate master copy: the parameter is the fp32 master
        with torch.no_grad():
            param.clamp_(max=max_value)
        return float(param.detach().float())
    value = float(master.float())
    if value > max_value:
        safe_set_full_fp32_param(param, master.clamp(max=max_value))
        if hasattr(param, "ds_id"):  # ZeRO-3: the working copy is partitioned
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.get_rank() == 0:
                    with torch.no_grad():
                        param.clamp_(max=max_value)
        else:
            with torch.no_grad():
                param.clamp_(max=max_value)
        value = max_value
    return value


def parameter_value(engine, name: str) -> float:
    """A scalar parameter's fp32 master value (ZeRO 1/2/3 or the module's own copy). Collective under
    ZeRO-3: call on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    param = engine.module.get_parameter(name)
    master = safe_get_full_fp32_param(param)
    return float((param.detach() if master is None else master).float())


def _loss_scale(engine) -> float | None:
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    for name in ("loss_scale", "cur_scale"):
        value = getattr(optimizer, name, None)
        if value is not None:
            return float(value)
    return None


def _grad_norm(engine) -> float | None:
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    step_time: float = 0.0
    data_wait: float = 0.0
    samples: int = 0
    grad_norm: float | None = None

    def reset(self) -> None:
        self.__init__()


@dataclass
class TrainState:
    step: int = 0
    nonfinite_total: int = 0
    samples_seen: int = 0  # this rank
    extra: dict[str, Any] = field(default_factory=dict)


def _batches(loader) -> Iterator:
    """Endless batches, epoch after epoch (the loader starts the next epoch on each iter())."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training loader produced no batches for an epoch")


class _KeyLog:
    """Per-rank log of the sample keys of each step (train.log_sample_keys)."""

    def __init__(self, path: Path | None):
        self.handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "a", buffering=1)

    def write(self, step: int, keys) -> None:
        if self.handle is not None:
            self.handle.write(f"{step}\t{' '.join(map(str, keys))}\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _patch_dropout_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a step's patch-dropout draws on a rank: each rank drops differently, and a resumed
    run draws what an uninterrupted one would have (the draw depends on the step, not on history)."""
    return ((int(seed) * 1_000_003 + rank) * 1_000_003 + step) % 2**63


def train(cfg: DictConfig, stop: StopRequest | None = None) -> int:
    """Train per `cfg` on this process's rank; returns the process exit code.

    Expects a config that passed `preflight.check_train` (the CLI runs it on every rank first).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    stop = stop or install_stop_handlers()  # before the loader's worker processes fork, so they inherit it
    env = dist_env()
    init_distributed(env, cfg.train.dist_timeout_minutes)
    rank, world = env.rank, env.world_size
    is_main = rank == 0
    if agree_to_stop(stop):  # a signal during start-up: leave before building anything
        return _stop_before_training(stop, is_main, "during start-up")
    tc = cfg.train
    root = run_dir(cfg)
    save_dir = root / "checkpoints"
    config_yaml = to_yaml(cfg)

    from ds_linclip.data.pipeline import build_train_loader, merge_rank_states
    from ds_linclip.models import build_model

    torch.manual_seed(int(tc.seed))  # the same initial weights on every rank
    model = build_model(cfg.model)  # model.<tower>.lock freezes here, after the pretrained weights
    model.set_grad_checkpointing(int(tc.grad_checkpointing))
    promote_scalar_parameters(model)  # before the groups take the parameter objects
    frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # train.linearize: frozen softmax teachers join the model before the engine (ZeRO partitions them too)
    linearizer = Linearizer(cfg, model) if tc.linearize.enabled else None
    scales = lr_scales(model, tc)
    groups = (linearizer.param_groups(tc.weight_decay, scales) if linearizer
              else param_groups(model, tc.weight_decay, lr_scales=scales))
    ds_config = build_ds_config(cfg, world)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.yaml").write_text(config_yaml)
        write_ds_config(ds_config, root)
        log.info("optimizer groups (peak lr before warmup/cosine):\n%s", describe_groups(groups, tc.lr, frozen_params))
    if tc.compile:
        # in place (nn.Module.compile): parameter and state-dict names stay those of the plain model
        model.compile()
    engine = build_engine(cfg, model, ds_config, groups)
    if linearizer is not None:
        linearizer.attach()
    loss_fn = build_loss(tc)
    input_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    # one unit of accumulation: a micro-batch with its own loss, or train.accum_freq sharing one
    unit = (FeatureCachedStep(engine, loss_fn, input_dtype, int(tc.accum_freq)) if tc.accum_freq > 1
            else MicroStep(engine, loss_fn, input_dtype, linearizer.objective if linearizer is not None else None))

    state = TrainState()
    data_state = None
    resume = ckpt.resolve_resume(str(tc.resume), save_dir)
    if resume is not None:
        client = ckpt.load(engine, *resume)
        state = TrainState(step=int(client["step"]), nonfinite_total=int(client.get("nonfinite_total", 0)),
                           samples_seen=int(client.get("samples_seen", 0)))
        data_state = client["data"]
        if linearizer is not None:
            linearizer.load_state_dict(client.get("linearize"))
        if is_main:
            log.info("resumed from %s at step %d", resume[0] / resume[1], state.step)
    loader = build_train_loader(cfg, rank, world, start_state=data_state, with_keys=bool(tc.log_sample_keys))
    if agree_to_stop(stop):  # a signal while the model, engine or loader were built
        return _stop_before_training(stop, is_main, "while the engine was built")
    phases = plan_phases(cfg)
    visual = engine.module.visual
    visual.patch_dropout_generator = torch.Generator()

    def enter_phase(phase: Phase) -> None:
        """The phase's resolution from the loader's next iter() on, and its patch dropout."""
        loader.set_image_size(phase.image_size)
        visual.patch_dropout = phase.patch_dropout
        if is_main and len(phases) > 1:
            log.info("step %d: %s", state.step + 1, phase.describe())

    phase = phase_at(phases, state.step + 1)
    enter_phase(phase)

    global_batch = global_batch_size(tc, world)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(root / "tensorboard"), flush_secs=30)
        log.info(
            "run %s: %d rank(s), micro batch %d x accumulation %d x %d ranks = global batch %d; "
            "%s loss, ZeRO %d, %s, %d steps (%.2f epochs of %d batches/rank)",
            root, world, tc.micro_batch_size, micro_batches_per_step(tc), world, global_batch, tc.loss, tc.zero_stage,
            tc.precision, tc.steps, tc.steps * micro_batches_per_step(tc) / max(1, loader.batches_per_epoch),
            loader.batches_per_epoch,
        )
        writer.add_text("config", "```\n" + config_yaml + "\n```", state.step)
        writer.add_scalar("train/global_batch_size", global_batch, state.step)
    key_log = _KeyLog(root / "sample_keys" / f"rank_{rank:05d}.txt" if tc.log_sample_keys else None)
    submissions = EvalSubmissions() if is_main and tc.eval_after_checkpoint else None

    def client_state() -> dict[str, Any]:
        # every rank's loader position in every rank's file: any one file resumes the whole job
        data_states = [None] * world
        if world > 1:
            dist.all_gather_object(data_states, loader.state_dict())
        else:
            data_states = [loader.state_dict()]
        return {
            "step": state.step, "epoch": int(loader.epoch), "data": merge_rank_states(data_states),
            "nonfinite_total": guard.total, "samples_seen": state.samples_seen, "config": config_yaml,
            **({"linearize": linearizer.state_dict()} if linearizer is not None else {}),
        }

    def save() -> str:
        tag = ckpt.save(engine, save_dir, state.step, client_state(), config_yaml, int(tc.keep_last),
                        keep_unscored=ckpt.unscored_cap(root, bool(tc.eval_after_checkpoint),
                                                        int(tc.keep_unscored_max)))
        if is_main:
            log.info("checkpoint %s", save_dir / tag)
            if submissions is not None:
                submissions.submit(save_dir / tag)
        return tag

    guard = NonFiniteGuard(int(tc.max_nonfinite_steps))
    guard.total = state.nonfinite_total
    window = Window()
    batches = _batches(loader)
    exit_code = 0
    last_saved = state.step if resume is not None else -1
    run_start, run_start_step = time.perf_counter(), state.step
    if linearizer is not None:
        linearizer.prepare(engine.optimizer, state.step + 1)
    try:
        while state.step < tc.steps:
            step_start = time.perf_counter()
            next_phase = phase_at(phases, state.step + 1)
            if next_phase != phase:
                # the running loader iterator's workers make the old size (and prefetch): end it; the
                # next iter() goes on from the last batch this rank trained on
                batches.close()
                phase = next_phase
                enter_phase(phase)
                batches = _batches(loader)
            visual.patch_dropout_generator.manual_seed(_patch_dropout_seed(tc.seed, rank, state.step + 1))
            accumulated, step_loss = 0, 0.0
            # decided only from the all-reduced flag: a signal landing on one rank after the
            # collective is picked up by the next step's, so every rank leaves at the same step
            stop_agreed = False
            while accumulated < tc.grad_accum_steps:
                wait_start = time.perf_counter()
                unit_batches = [next(batches) for _ in range(unit.batches_per_unit)]
                window.data_wait += time.perf_counter() - wait_start
                loss = unit.loss(unit_batches)
                state.samples_seen += sum(batch[0].shape[0] for batch in unit_batches)
                # one collective decides for all ranks: skip a non-finite micro-batch, stop on a signal
                nonfinite_any, stop_any = all_reduce_floats(
                    [0.0 if torch.isfinite(loss) else 1.0, 1.0 if stop.requested else 0.0], op=dist.ReduceOp.MAX
                )
                if stop_any:
                    stop_agreed = True
                    if not stop.requested:
                        stop.signum = signal.SIGTERM  # another rank got it: leave together
                guard.update(not nonfinite_any, state.step + 1)
                if nonfinite_any:
                    # no backward, no engine.step(): the gradient accumulation is untouched and the
                    # optimizer step is made of `grad_accum_steps` finite units
                    continue
                unit.backward_and_step(loss)
                accumulated += 1
                step_loss += float(loss.detach())
                if tc.log_sample_keys:
                    key_log.write(state.step + 1, [key for batch in unit_batches for key in batch[2]])
            state.step += 1
            if linearizer is not None and state.step < tc.steps:  # stage and lr of the next step, saved with it
                linearizer.prepare(engine.optimizer, state.step + 1)
            scale = clamp_logit_scale(engine)
            elapsed = time.perf_counter() - step_start
            window.steps += 1
            window.loss_sum += step_loss / tc.grad_accum_steps
            window.step_time += elapsed
            window.samples += tc.micro_batch_size * micro_batches_per_step(tc)
            window.grad_norm = _grad_norm(engine)

            if state.step % tc.log_every == 0 or state.step == tc.steps or stop_agreed:
                _log_window(engine, writer, loader, window, state, guard, scale, tc, world, global_batch,
                            run_start, run_start_step)
                if writer is not None:
                    for tag, value in (("train/phase", phase.index), ("train/image_size", phase.image_size),
                                       ("train/patch_dropout", phase.patch_dropout)):
                        writer.add_scalar(tag, value, state.step)
                if linearizer is not None:
                    summary = linearizer.log_window(writer, state.step)
                    if is_main:
                        print(summary, flush=True)
                window.reset()
            if stop_agreed:
                save()
                exit_code = REQUEUE_EXIT_CODE
                if is_main:
                    log.info("stopped at step %d on %s; exit %d for requeue", state.step, stop.name, exit_code)
                return exit_code
            if tc.checkpoint_every > 0 and state.step % tc.checkpoint_every == 0 and state.step < tc.steps:
                save()
                last_saved = state.step
        # the end: a final checkpoint, consolidated fp32 weights, DONE
        if last_saved != state.step:
            tag = save()
        else:
            tag = ckpt.tag_for_step(state.step)
        if is_main:
            from ds_linclip.train.export import export

            export(save_dir / tag, root / "final")
            done = {"final_tag": tag, "step": state.step}
            tmp = root / ".DONE.tmp"
            tmp.write_text(json.dumps(done) + "\n")
            os.replace(tmp, root / "DONE")
            log.info("done: %d steps; fp32 weights in %s", state.step, root / "final")
        if dist.is_initialized():
            dist.barrier()
        return 0
    except NonFiniteLossError as err:
        if is_main:
            log.error("%s", err)
        return NONFINITE_EXIT_CODE
    finally:
        key_log.close()
        if writer is not None:
            writer.close()
        if submissions is not None:
            # stopping for a requeue: the scheduler's grace period is short, so a submission gets 30 s
            submissions.close(30.0 if stop.requested else None)


class EvalSubmissions:
    """train.eval_after_checkpoint: hand each checkpoint to the eval job (submitit: Slurm or local) through
    its command line, `python -m ds_linclip.eval.submit --checkpoint TAG_DIR`: the eval layer sits above
    training, so the trainer knows its CLI only. The job reads the run's `eval` section from the tag's
    config.yaml.

    A submission runs beside training (rank 0 does not wait for it: the other ranks would stand at the
    next collective meanwhile); its output goes to RUN/eval/submit/TAG.log. Finished submissions are
    reported at the next checkpoint and at the end, where the trainer waits for the ones still running
    (at most `wait_s` in all). A failed submission is logged, never fatal: training goes on and `--watch`
    can catch up."""

    def __init__(self, wait_s: float = 600.0):
        self.wait_s = wait_s
        self.running: list[tuple[Path, Path, Any]] = []  # (tag dir, log file, Popen)

    def submit(self, tag_dir: Path) -> None:
        import subprocess
        import sys

        self.poll()
        log_file = tag_dir.parent.parent / "eval" / "submit" / f"{tag_dir.name}.log"
        command = [sys.executable, "-m", "ds_linclip.eval.submit", "--checkpoint", str(tag_dir)]
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "w") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as err:
            log.warning("could not submit the eval job for %s: %s", tag_dir, err)
            return
        self.running.append((tag_dir, log_file, process))

    def poll(self) -> None:
        """Report the submissions that have finished; keep the others."""
        still = []
        for tag_dir, log_file, process in self.running:
            if process.poll() is None:
                still.append((tag_dir, log_file, process))
            else:
                self._report(tag_dir, log_file, process.returncode)
        self.running = still

    def close(self, wait_s: float | None = None) -> None:
        """Wait for the submissions still running (`wait_s`, default the instance's, in all), report them;
        stop the ones left."""
        import subprocess
        import time

        wait_s = self.wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        for tag_dir, log_file, process in self.running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                log.warning("could not submit the eval job for %s: no answer after %g s (log %s)",
                            tag_dir, wait_s, log_file)
                continue
            self._report(tag_dir, log_file, process.returncode)
        self.running = []

    @staticmethod
    def _report(tag_dir: Path, log_file: Path, returncode: int) -> None:
        try:
            lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:  # the log is gone or unreadable: the exit code still says what happened
            lines = []
        if returncode == 0:  # its last line: "submitted eval job ID; logs: FOLDER"
            log.info("%s (checkpoint %s)", (lines or ["eval job submitted"])[-1].strip(), tag_dir)
        else:
            reason = lines[-1].strip() if lines else f"exit code {returncode}"
            log.warning("could not submit the eval job for %s: %s (log %s)", tag_dir, reason, log_file)


def _log_window(engine, writer, loader, window: Window, state: TrainState, guard: NonFiniteGuard, scale: float,
                tc, world: int, global_batch: int, run_start: float, run_start_step: int) -> None:
    """Reduce the window over ranks; rank 0 writes TensorBoard and the console line."""
    loss_sum, samples = all_reduce_floats([window.loss_sum, float(window.samples)])
    step_time_max, data_wait_max, peak_mb = all_reduce_floats(
        [window.step_time, window.data_wait, peak_memory_mb()], op=dist.ReduceOp.MAX
    )
    logit_bias = parameter_value(engine, "logit_bias") if getattr(engine.module, "logit_bias", None) is not None else None
    skipped_by_rank: list[dict] = [None] * world  # type: ignore[list-item]
    local_skipped = dict(loader.skipped)
    if world > 1:
        dist.all_gather_object(skipped_by_rank, local_skipped)
    else:
        skipped_by_rank = [local_skipped]
    skipped: Counter = Counter()
    for counts in skipped_by_rank:
        skipped.update(counts)
    if writer is None:
        return
    step, steps = state.step, window.steps
    loss = loss_sum / world / max(1, steps)
    lr = scheduled_lr(engine.optimizer.param_groups)  # train.lr's schedule; groups have their own scales
    images_per_s = samples / max(step_time_max, 1e-9)
    scalars = {
        "train/loss": loss,
        "train/lr": lr,
        "train/logit_scale": scale,
        "train/temperature_inverse": math.exp(scale),
        "train/epoch": float(loader.epoch),
        "train/nonfinite_skipped": float(guard.total),
        "perf/images_per_s": images_per_s,
        "perf/images_per_s_per_rank": images_per_s / world,
        "perf/step_time_s": step_time_max / steps,
        "perf/data_wait_s": data_wait_max / steps,
        "memory/peak_mb": peak_mb,
    }
    if logit_bias is not None:
        scalars["train/logit_bias"] = logit_bias
    if window.grad_norm is not None:
        scalars["train/grad_norm"] = window.grad_norm
    loss_scale = _loss_scale(engine)
    if loss_scale is not None:
        scalars["train/loss_scale"] = loss_scale
        # fp16: steps DeepSpeed's dynamic loss scaler skipped on gradient overflow
        scalars["train/overflow_skipped_steps"] = float(engine.skipped_steps)
    for reason, count in sorted(skipped.items()):
        scalars[f"data/skipped/{reason}"] = float(count)
    scalars["data/skipped_total"] = float(sum(skipped.values()))
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    elapsed = time.perf_counter() - run_start
    done_here = step - run_start_step
    eta = (tc.steps - step) * elapsed / done_here if done_here else float("inf")
    print(
        f"step {step}/{tc.steps} ({100.0 * step / tc.steps:.1f}%) | epoch {loader.epoch} | loss {loss:.4f} | "
        f"lr {lr:.3g} | logit_scale {scale:.3f}{'' if logit_bias is None else f' | logit_bias {logit_bias:.3f}'} | {images_per_s:,.0f} img/s ({images_per_s / world:,.0f}/rank) | "
        f"step {step_time_max / steps:.3f}s (data {data_wait_max / steps:.3f}s) | peak {peak_mb:,.0f} MiB"
        + (f" | skipped {sum(skipped.values())}" if skipped else "")
        + (f" | non-finite {guard.total}" if guard.total else "")
        + f" | ETA {_format_eta(eta)}",
        flush=True,
    )
