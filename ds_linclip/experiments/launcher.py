"""Running the trainer and the eval job for a study: as subprocesses (one process group each, killed
when the study is stopped) or in this process; `run_specs` runs many specs, N at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

from ds_linclip.experiments.runs import REPO_ROOT, ExperimentError, MissingRun, RunResult, RunSpec, log, run_one


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    """Environment for the trainer/eval subprocesses: this repo importable, CPU accelerator without
    CUDA, and the same intra-op thread count as this process (see `prepare_process`)."""
    import torch

    env = dict(os.environ)
    threads = str(torch.get_num_threads())
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["MASTER_PORT"] = str(free_port())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def prepare_process(threads: int) -> None:
    """This process before any run: `threads` intra-op threads (0: torch's default), the CPU accelerator
    without CUDA (before DeepSpeed is imported by in-process runs) and a free rendezvous port."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


# trainer/eval subprocess groups in flight (run_specs runs them from threads): killed when we are stopped
_LIVE: set[int] = set()
_LIVE_LOCK = threading.Lock()


def kill_live_processes() -> None:
    with _LIVE_LOCK:
        groups = list(_LIVE)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def terminate_on_sigterm() -> None:
    """SIGTERM -> KeyboardInterrupt-like exit, so running trainer subprocess groups are killed too."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def failures_exit_code(failures: Sequence[str]) -> int:
    """A study's exit code: 1 (each failed run's first line on stderr) when runs failed, else 0."""
    if failures:
        print("error: some runs failed (left out of the tables):\n  " + "\n  ".join(f.splitlines()[0] for f in failures),
              file=sys.stderr)
        return 1
    return 0


def run_study(body: Callable[[], int]) -> int:
    """A study's main: `body()`'s exit code; an ExperimentError is printed as `error: ...` (exit 1);
    every trainer/eval process group still running is killed on the way out."""
    try:
        return body()
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        kill_live_processes()


def explicit_option(argv: Sequence[str], option: str) -> bool:
    """`option` (e.g. `--steps`) given on the command line, as `--steps N` or `--steps=N`."""
    return any(a == option or a.startswith(option + "=") for a in argv)


def parse_study_args(parser: Any, argv: Sequence[str] | None, quick: dict[str, Any]) -> tuple[Any, list[str]]:
    """A study CLI's (args, argv): argv (default sys.argv[1:]) parsed, SIGTERM turned into an exit that kills
    the runs, and with --quick every `quick` value whose option was not given explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    terminate_on_sigterm()
    if args.quick:
        for key, value in quick.items():
            if not explicit_option(argv, "--" + key.replace("_", "-")):
                setattr(args, key, value)
    return args, argv


class Launcher:
    """Runs the trainer and the eval job of a RunSpec, as subprocesses (default) or in this process.

    runs_dir: the run folders (RunSpec.name each); data_dir: the Fashion-MNIST shards (`ensure_shards`).
    reuse_any_finished: reuse every finished folder of a spec's name even when its saved config differs
    (e.g. schema keys a later commit added); by default only a run with the same resolved config is reused.
    """

    def __init__(self, mode: str, runs_dir: Path, data_dir: Path, reuse_any_finished: bool = False):
        self.mode = mode
        self.runs_dir = runs_dir
        self.data_dir = data_dir
        self.reuse_any_finished = reuse_any_finished

    def train(self, spec: RunSpec) -> float:
        """Train `spec` into runs_dir / spec.name; returns wall seconds."""
        overrides = spec.train_overrides(self.data_dir, self.runs_dir)
        run_dir = self.runs_dir / spec.name
        start = time.perf_counter()
        if self.mode == "inprocess":
            from ds_linclip.config import load_config
            from ds_linclip.train.loop import train

            code = train(load_config([], overrides))
            if code != 0:
                raise ExperimentError(f"training {spec.name} exited with code {code}")
        else:
            cmd = [sys.executable, "-m", "ds_linclip.train", *overrides]
            self._run(cmd, run_dir / "train.log", spec.name, "training", echo=lambda line: line.startswith("step "))
        return time.perf_counter() - start

    def evaluate(self, spec: RunSpec) -> dict[str, Any]:
        """Zero-shot record of runs_dir / spec.name / final (the eval job's final_zeroshot.json)."""
        run_dir = self.runs_dir / spec.name
        overrides = spec.eval_overrides(self.data_dir)
        if self.mode == "inprocess":
            from ds_linclip.eval.job import score_checkpoint

            records = score_checkpoint(run_dir / "final", overrides=overrides, progress=False)
            return next(r for r in records if r["task"] == "zeroshot")
        cmd = [sys.executable, "-m", "ds_linclip.eval", "--checkpoint", str(run_dir / "final"), "--no-progress",
               *overrides]
        self._run(cmd, run_dir / "eval.log", spec.name, "eval", echo=lambda line: "zeroshot:" in line)
        result = run_dir / "eval" / "final_zeroshot.json"
        if not result.is_file():
            raise ExperimentError(f"eval of {spec.name} finished but wrote no {result}")
        return json.loads(result.read_text())

    @staticmethod
    def _run(cmd: list[str], log_path: Path, name: str, what: str, echo: Callable[[str], bool]) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        with open(log_path, "w") as log_file:
            log_file.write("$ " + shlex.join(cmd) + "\n")
            log_file.flush()
            # its own process group: if we are stopped, the trainer and its loader workers go too, instead
            # of finishing (and checkpointing) into a run folder the next invocation is about to reuse
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=child_env(), cwd=str(REPO_ROOT), start_new_session=True)
            assert process.stdout is not None
            with _LIVE_LOCK:
                _LIVE.add(process.pid)
            try:
                for line in process.stdout:
                    log_file.write(line)
                    lines.append(line.rstrip())
                    lines = lines[-40:]
                    if echo(line):
                        log(f"  {name}: {line.strip()}")
                code = process.wait()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
            finally:
                with _LIVE_LOCK:
                    _LIVE.discard(process.pid)
        if code != 0:
            tail = "\n".join(lines[-25:])
            raise ExperimentError(f"{what} of {name} failed with exit code {code}; log {log_path}; last lines:\n{tail}")


def run_specs(specs: Sequence[RunSpec], launcher: Launcher, done: dict[RunSpec, RunResult], jobs: int = 1,
              train: bool = True, bar: Any = None, evaluate: bool = True) -> list[str]:
    """run_one for every spec not in `done` (at most `jobs` at a time, one thread each), filling `done`.
    A run that fails is logged and left out (its row shows fewer seeds); returns the failure messages.
    bar: a tqdm bar advanced once per spec (or None)."""
    todo = [s for s in dict.fromkeys(specs) if s not in done]
    failures: list[str] = []

    def settle(spec: RunSpec, call: Callable[[], RunResult]) -> None:
        try:
            done[spec] = call()
        except MissingRun as err:
            log(str(err))
        except ExperimentError as err:
            log(f"FAILED {spec.name}: {err}")
            failures.append(f"{spec.name}: {err}")
        if bar is not None:
            bar.update()

    if jobs <= 1:
        for spec in todo:
            if bar is not None:
                bar.set_postfix_str(spec.name)
            settle(spec, lambda: run_one(spec, launcher, train, evaluate))
        return failures
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(run_one, spec, launcher, train, evaluate): spec for spec in todo}
        for future in as_completed(futures):
            settle(futures[future], future.result)
    except BaseException:
        kill_live_processes()  # the threads' subprocesses end, so the threads do too
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return failures
