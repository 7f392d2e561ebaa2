"""Reports: runs grouped over seeds (mean ± std (n)), markdown tables (and parsing them back), the
JSON file, and the note on where and when the numbers were measured (commit, machine, load average)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ds_linclip.experiments.runs import REPO_ROOT, RunResult, RunSpec, shape_name

# ----------------------------------------------------------------------------- seeds: rows of mean ± std


def fmt(value: float | None, spec: str) -> str:
    """`format(value, spec)`; '-' for None or NaN."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (n - 1 in the denominator; None below 2 values) and count."""

    mean: float | None
    std: float | None
    n: int

    def cell(self, spec: str = ".2f", scale: float = 1.0) -> str:
        """'mean ± std (n)'; 'mean (1)' for one value; '-' for none."""
        if not self.n or self.mean is None:
            return "-"
        text = format(scale * self.mean, spec)
        if self.std is not None:
            text += " ± " + format(scale * self.std, spec)
        return f"{text} ({self.n})"


def mean_std(values: Iterable[float | None]) -> Stat:
    """Stat of the values that are not None or NaN."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else None, len(kept))


@dataclass
class Row:
    """One table row: a RunSpec with its seed left out, over the seeds that finished.

    seeds_asked: every seed the grid asked for; runs: the results of those that finished, in the grid's
    seed order; spec: the first seed's spec (its overrides and label are the row's too)."""

    kind: str
    image_size: int
    tokens: int
    width: int
    steps: int
    seeds_asked: list[int]
    runs: list[RunResult]
    spec: RunSpec | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def shape_name(self) -> str:
        return shape_name(self.kind, self.image_size, self.width)

    def stat(self, field_name: str) -> Stat:
        """Stat of a RunResult field over the finished seeds."""
        return mean_std(getattr(r, field_name) for r in self.runs)

    def first(self, field_name: str) -> Any:
        return getattr(self.runs[0], field_name) if self.runs else None

    def seeds_cell(self) -> str:
        """'0,1,2'; '0,1 (2 of 3)' while seeds are missing; 'none (0 of 3)'."""
        text = ",".join(map(str, self.seeds)) or "none"
        return text + (f" ({self.n} of {len(self.seeds_asked)})" if self.n < len(self.seeds_asked) else "")

    def summary(self) -> dict[str, Any]:
        """The row for a JSON report: its keys, seeds and the mean/std/n of top1, top5, loss, images/s."""
        out = {"kind": self.kind, "image_size": self.image_size, "tokens": self.tokens, "width": self.width,
               "steps": self.steps, "seeds_asked": self.seeds_asked, "seeds": self.seeds, "n": self.n}
        for name in ("top1", "top5", "final_loss", "trainer_images_per_s"):
            out[name] = asdict(self.stat(name))
        return out


def aggregate(specs: Sequence[RunSpec], done: dict[RunSpec, RunResult]) -> list[Row]:
    """Rows in the order of `specs`, one per spec with its seed left out; each holds the runs of its seeds
    that are in `done` (a row whose seeds have not all finished has n < len(seeds_asked))."""
    rows: dict[RunSpec, Row] = {}
    for spec in specs:
        key = spec.with_seed(0)
        if key not in rows:
            rows[key] = Row(spec.kind, spec.image_size, spec.tokens, spec.width, spec.budget.steps, [], [], spec)
        row = rows[key]
        if spec.budget.seed not in row.seeds_asked:
            row.seeds_asked.append(spec.budget.seed)
            if spec in done:
                row.runs.append(done[spec])
    return list(rows.values())


# ----------------------------------------------------------------------------- markdown


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_table(text: str, first_header: str = "kind") -> list[dict[str, str]]:
    """Rows of the first markdown table whose first header cell is `first_header`, as dicts."""
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0] == first_header:
            rows = []
            for row_line in lines[index + 2:]:
                if not row_line.startswith("|"):
                    break
                rows.append(dict(zip(cells, [c.strip() for c in row_line.strip("|").split("|")])))
            return rows
    raise ValueError(f"no markdown table with first column '{first_header}'")


# ----------------------------------------------------------------------------- where and when


def load_average_1m() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_note() -> dict[str, Any]:
    import torch

    load = load_average_1m()
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "load_average_1m": float("nan") if load is None else load}


def git_commit() -> str | None:
    """Short commit of the repository ('+uncommitted changes' when tracked files differ), or None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO_ROOT, timeout=10).stdout.strip()
        return (commit + ("+uncommitted changes" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta() -> dict[str, Any]:
    """{"date" (UTC, ISO), "commit", "machine"}: the head of every study's JSON report."""
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "machine": machine_note()}


def machine_sentence(meta: dict[str, Any]) -> str:
    """One markdown line on when, where and under what load a report was measured (from `run_meta`,
    plus "load_average_end" when the study sets it)."""
    machine = meta["machine"]
    return (f"Date: {meta['date']}, commit {meta.get('commit') or '?'}; machine: {machine['cpus']} CPUs, "
            f"torch {machine['torch']} with {machine['torch_threads']} threads, "
            f"CUDA {'yes' if machine['cuda'] else 'no'}; 1-min load average {machine['load_average_1m']} "
            f"at start, {meta.get('load_average_end', '?')} at the end (the machine is shared).")


def write_json(path: Path, payload: dict[str, Any], indent: int = 1) -> Path:
    """The study's JSON report (every number), newline-terminated; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n")
    return path
