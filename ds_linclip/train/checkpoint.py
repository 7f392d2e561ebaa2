"""Checkpoints: DeepSpeed save/load plus our client state, a crash-safe `latest`, keep-last-K.

Layout under `R/checkpoints/` (DeepSpeed's save_dir):
    step_00000100/            DeepSpeed's files (model states, ZeRO optimizer shards)
        config.yaml           the resolved config of the run
        client_state/rank_00000.pt ...   per-rank state: step, epoch, data-loader state, counters
    latest                    name of the newest COMPLETE tag

`latest` is written by rank 0 only after a barrier that every rank reaches once its own files
are on disk, and atomically (temp file + rename): a crash at any point of a save leaves
`latest` naming the previous, complete checkpoint.

Pruning and the eval job: the eval job marks each checkpoint it is done with as
`R/eval/scored/<tag>` (`mark_scored`; the watcher's `R/eval/watch_state.json` counts too). When
the run is being evaluated (train.eval_after_checkpoint, or a watcher has been started on it:
its state file or lock exists), `prune` keeps unscored checkpoints beyond `keep_last`, up to
train.keep_unscored_max of them, so the watcher never finds a checkpoint gone that it has not
seen; at the cap the newer unscored ones go (the watcher works oldest first) and a warning says
which.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
LATEST = "latest"
CLIENT_STATE_DIR = "client_state"
# under R/eval: the eval job's markers and the watcher's state and lock (ds_linclip.eval.job)
EVAL_DIR = "eval"
SCORED_DIR = "scored"
WATCH_STATE = "watch_state.json"
WATCH_LOCK = ".watch.lock"

log = logging.getLogger("ds_linclip.train")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int:
    match = TAG_PATTERN.match(tag)
    if not match:
        raise ValueError(f"'{tag}' is not a checkpoint tag of the form step_00000100")
    return int(match.group(1))


def read_latest(save_dir: str | Path) -> str | None:
    path = Path(save_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


def write_latest(save_dir: str | Path, tag: str) -> None:
    path = Path(save_dir) / LATEST
    tmp = path.with_name(f".{LATEST}.tmp")
    with open(tmp, "w") as handle:
        handle.write(tag + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def list_tags(save_dir: str | Path) -> list[str]:
    """Tag directories under save_dir, oldest first (complete or not)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)), key=step_of_tag)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mark_scored(run_dir: str | Path, tag: str, status: str = "ok") -> None:
    """The eval job is done with checkpoint `tag` of run `run_dir` (scored, or failed for good):
    pruning may delete it now. Atomic; idempotent."""
    folder = Path(run_dir) / EVAL_DIR / SCORED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{tag}.tmp{os.getpid()}"
    tmp.write_text(status + "\n")
    os.replace(tmp, folder / tag)


def scored_tags(run_dir: str | Path) -> set[str]:
    """Tags the eval job is done with: its markers, and the watcher's state file."""
    eval_dir = Path(run_dir) / EVAL_DIR
    folder = eval_dir / SCORED_DIR
    tags = {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()
    try:
        tags |= set(json.loads((eval_dir / WATCH_STATE).read_text())["checkpoints"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return tags


def unscored_cap(run_dir: str | Path, eval_after_checkpoint: bool, keep_unscored_max: int) -> int | None:
    """How many unscored checkpoints pruning keeps beyond keep_last: `keep_unscored_max` when the
    run is being evaluated (eval_after_checkpoint, or a watcher's state or lock exists), else None."""
    if keep_unscored_max <= 0:
        return None
    eval_dir = Path(run_dir) / EVAL_DIR
    watched = (eval_dir / WATCH_STATE).exists() or (eval_dir / WATCH_LOCK).exists()
    return int(keep_unscored_max) if eval_after_checkpoint or watched else None


def prune(save_dir: str | Path, keep_last: int, keep_unscored: int | None = None) -> list[str]:
    """Delete all but the `keep_last` newest tags up to `latest`; tags newer than `latest` are
    leftovers of an abandoned (crashed, not resumed-from) save and go too. With `keep_unscored`
    (see `unscored_cap`), up to that many of the older tags the eval job has not marked scored
    (`R/eval/scored/<tag>`, R = save_dir's parent) are kept as well, the oldest first; the cap is
    logged when it is hit. Returns deleted tags."""
    latest = read_latest(save_dir)
    if latest is None:
        return []
    latest_step = step_of_tag(latest)
    tags = list_tags(save_dir)
    complete = [t for t in tags if step_of_tag(t) <= latest_step]
    kept = complete[-max(1, keep_last):]
    if keep_unscored is not None:
        scored = scored_tags(Path(save_dir).parent)
        unscored = [t for t in complete[:-max(1, keep_last)] if t not in scored]
        kept = unscored[:keep_unscored] + kept
        if len(unscored) > keep_unscored:
            log.warning(
                "train.keep_unscored_max=%d reached: keeping the oldest checkpoints the eval job has not scored "
                "yet (%s) and deleting the newer unscored %s so the disk cannot fill; the eval job is behind "
                "(give it more resources, checkpoint less often, or raise train.keep_unscored_max)",
                keep_unscored, ", ".join(unscored[:keep_unscored]) or "none", ", ".join(unscored[keep_unscored:]),
            )
    deleted = [t for t in tags if t not in kept]
    for tag in deleted:
        shutil.rmtree(Path(save_dir) / tag, ignore_errors=True)
    return deleted


def save(engine, save_dir: str | Path, step: int, client_state: dict[str, Any], config_yaml: str, keep_last: int,
         keep_unscored: int | None = None) -> str:
    """Save on ALL ranks; returns the tag. `client_state` is this rank's (data state differs by rank).
    `keep_last`, `keep_unscored`: see `prune` (rank 0, after `latest` names the new tag)."""
    rank, world = _rank_world()
    tag = tag_for_step(step)
    save_dir = Path(save_dir)
    # our per-rank state goes into DeepSpeed's file too (rank 0's), and into client_state/ for every rank
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"ds_linclip": client_state}, save_latest=False)
    tag_dir = save_dir / tag
    state_dir = tag_dir / CLIENT_STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.save({**client_state, "rank": rank, "world_size": world}, state_dir / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tag_dir / "config.yaml").write_text(config_yaml)
    _barrier()  # every rank's files are written
    if rank == 0:
        write_latest(save_dir, tag)
        prune(save_dir, keep_last, keep_unscored)
    _barrier()  # nobody moves on (or exits) before `latest` names the new tag
    return tag


def resolve_resume(resume: str, save_dir: str | Path) -> tuple[Path, str] | None:
    """`auto` -> (save_dir, latest) if there is a complete checkpoint, else None; `none` -> None;
    a path to a tag dir -> (its parent, its name)."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        tag = read_latest(save_dir)
        if tag is None:
            return None
        if not (Path(save_dir) / tag).is_dir():
            raise FileNotFoundError(f"{Path(save_dir) / LATEST} names '{tag}' but {Path(save_dir) / tag} does not exist")
        return Path(save_dir), tag
    path = Path(resume)
    if path.is_dir() and (path / LATEST).is_file():  # a save_dir: its latest
        return resolve_resume("auto", path)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint directory {path} does not exist (use auto | none | PATH)")
    return path.parent, path.name


def load(engine, load_dir: str | Path, tag: str) -> dict[str, Any]:
    """Restore engine (weights, optimizer, LR scheduler) on all ranks; return this rank's client state."""
    from ds_linclip.serialization import check_tag_dir, load_pt

    rank, world = _rank_world()
    check_tag_dir(Path(load_dir) / tag)  # DeepSpeed unpickles with weights_only=False: nothing but data first
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(load_dir) / tag}")
    state_file = Path(load_dir) / tag / CLIENT_STATE_DIR / f"rank_{rank:05d}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"missing per-rank client state {state_file}")
    state = load_pt(state_file)
    if state["world_size"] != world:
        raise RuntimeError(
            f"checkpoint {Path(load_dir) / tag} was written by {state['world_size']} ranks, this run has {world}; "
            "the data-loader position is per rank, so resume with the same world size"
        )
    return state
