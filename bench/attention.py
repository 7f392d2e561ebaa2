"""Forward+backward time and peak memory of attention against token count.

Compares, within one run and on one device:
  ours       kernels.linear_attention (backend auto: Triton on CUDA, the fast PyTorch path on CPU)
  sdpa       torch.nn.functional.scaled_dot_product_attention (softmax; flash on CUDA where it applies)
  reference  kernels.reference.linear_attention_reference (plain PyTorch linear attention)

Timing: methods are interleaved rep by rep (so load from other processes hits all alike); the
table reports the fastest rep on CPU (least disturbed) and the median on CUDA (events, synced).
Peak memory is the extra memory one fwd+bwd needs above its inputs (q, k, v, grad_out):
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated before.
  CPU:  torch.profiler with profile_memory=True: the maximum of the allocator's running
        "Total Allocated" over one fwd+bwd (torch tensors only; no allocator slack, no Python objects).
Cells whose estimated time per rep exceeds --max-seconds are skipped (marked "skip").

Example:  python bench/attention.py --quick
          python bench/attention.py --device cuda --dtype bf16 --heads 12 --out-dir bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `kernels` importable without installing
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import linear_attention  # noqa: E402
from ds_linclip.models.attention import SHORTHANDS, parse_attention_name  # noqa: E402
from kernels.reference import is_variant, linear_attention_reference, variant_attention_reference  # noqa: E402

METHODS = ("ours", "sdpa", "reference")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TOKENS = (197, 577, 1025, 4097, 16385)
QUICK_TOKENS = (197, 577, 1025)
# how time grows with N, to skip cells predicted to exceed --max-seconds
COST_EXPONENT = {"ours": 1.0, "sdpa": 2.0, "reference": 1.0}


def attention_fn(method: str, kind: str, causal: bool):
    """kind: a linear attention name (`linear-affine`, `linear-focused-count`, ...; no local branch)."""
    linear = parse_attention_name(kind, causal).linear
    if linear is None:
        raise ValueError(f"--kind must name a linear variant, got '{kind}'")

    def scale_for(q):  # the focused/pola map's s at its init, softplus(0), as the model starts
        if linear.feature_map not in ("focused", "pola"):
            return None
        return torch.full((q.shape[1], q.shape[3]), 0.6931471805599453, device=q.device, dtype=q.dtype)

    def kwargs_for(q):  # pola's power is a (heads, head_dim) tensor: 3 at its init
        kwargs = linear.kernel_kwargs()
        if linear.feature_map == "pola":
            kwargs["power"] = torch.full((q.shape[1], q.shape[3]), 3.0, device=q.device, dtype=q.dtype)
        return kwargs

    if method == "ours":
        return lambda q, k, v: linear_attention(q, k, v, causal=causal, scale=scale_for(q), **kwargs_for(q))
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if method == "reference":
        if is_variant(linear.feature_map, linear.denominator):  # the quadratic oracle
            return lambda q, k, v: variant_attention_reference(q, k, v, causal=causal, scale=scale_for(q), **kwargs_for(q))
        return lambda q, k, v: linear_attention_reference(q, k, v, causal=causal, scale=scale_for(q),
                                                          **linear.kernel_kwargs())
    raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")


def make_inputs(args, tokens: int, device: torch.device, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (args.batch, args.heads, tokens, args.head_dim)
    q, k, v, grad_out = (torch.randn(shape, generator=generator).to(device=device, dtype=DTYPES[args.dtype]) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, grad_out


def fwd_bwd(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    out.backward(grad_out)
    q.grad = k.grad = v.grad = None


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, inputs, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd_bwd(fn, *inputs)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fwd_bwd(fn, *inputs)
    return time.perf_counter() - begin


def cuda_peak_bytes(fn, inputs, device: torch.device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fwd_bwd(fn, *inputs)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def cpu_peak_bytes(fn, inputs) -> int:
    """Peak of the torch CPU allocator's running total during one fwd+bwd, from the profiler.

    With profile_memory=True every allocation/free is a "[memory]" trace event carrying
    "Total Allocated": bytes allocated since profiling began, so its maximum is the extra peak.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(fn, *inputs)
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        events = json.loads(trace_path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    return max([0, *totals])


def run(args) -> list[dict]:
    device = torch.device(args.device)
    tokens_list = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    reps, min_time = (args.reps, args.min_time)
    rows: list[dict] = []
    last_time: dict[str, tuple[int, float]] = {}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements
        tqdm = None
    progress = tqdm(total=len(tokens_list), desc="attention bench", unit="N", file=sys.stderr) if tqdm else None
    for tokens in tokens_list:
        row: dict = {"tokens": tokens}
        active = []
        for method in METHODS:
            if method in last_time:
                prev_tokens, prev_seconds = last_time[method]
                estimate = prev_seconds * (tokens / prev_tokens) ** COST_EXPONENT[method]
                if estimate > args.max_seconds:
                    row[f"{method}_skipped_estimate_s"] = estimate
                    continue
            active.append(method)
        fns = {m: attention_fn(m, args.kind, args.causal) for m in active}
        inputs = make_inputs(args, tokens, device)
        samples: dict[str, list[float]] = {m: [] for m in active}
        for method in active:  # warm-up: first-call allocations, Triton compilation, CUDA lazy init
            for _ in range(args.warmup):
                fwd_bwd(fns[method], *inputs)
            sync(device)
        started = time.perf_counter()
        while True:
            for method in active:
                samples[method].append(time_once(fns[method], inputs, device))
            n = len(next(iter(samples.values()))) if samples else reps
            if n >= reps or (n >= 3 and time.perf_counter() - started > min_time):
                break
        for method in active:
            seconds = statistics.median(samples[method]) if device.type == "cuda" else min(samples[method])
            row[f"{method}_ms"] = seconds * 1e3
            row[f"{method}_reps"] = len(samples[method])
            last_time[method] = (tokens, seconds)
            if not args.no_memory:
                if device.type == "cuda":
                    row[f"{method}_mem_mb"] = cuda_peak_bytes(fns[method], inputs, device) / 2**20
                else:
                    row[f"{method}_mem_mb"] = cpu_peak_bytes(fns[method], inputs) / 2**20
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            progress.update(1)
    if progress:
        progress.close()
    return rows


def _fmt(value, spec: str) -> str:
    return "skip" if value is None else format(value, spec)


def format_table(rows: list[dict], header: str) -> str:
    cols = ["N", "ours ms", "sdpa ms", "ref ms", "ours/sdpa", "ref/sdpa", "ours MB", "sdpa MB", "ref MB"]
    lines = [header, " | ".join(f"{c:>9}" for c in cols), "-" * (12 * len(cols))]
    for row in rows:
        ours, sdpa, ref = (row.get(f"{m}_ms") for m in METHODS)
        cells = [
            f"{row['tokens']:>9d}",
            _fmt(ours, "9.2f"), _fmt(sdpa, "9.2f"), _fmt(ref, "9.2f"),
            _fmt(ours / sdpa if ours and sdpa else None, "9.3f"),
            _fmt(ref / sdpa if ref and sdpa else None, "9.3f"),
            *(_fmt(row.get(f"{m}_mem_mb"), "9.1f") for m in METHODS),
        ]
        lines.append(" | ".join(f"{c:>9}" for c in cells))
    lines.append("ratios: fwd+bwd time / SDPA's time in this run (< 1: faster than SDPA). "
                 "MB: extra peak memory of one fwd+bwd above its inputs. skip: estimated over --max-seconds.")
    return "\n".join(lines)


def plot(rows: list[dict], header: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"ours": "ours (linear)", "sdpa": "SDPA softmax", "reference": "plain PyTorch linear"}
    for method in METHODS:
        for ax, key in ((ax_time, "ms"), (ax_mem, "mem_mb")):
            points = [(r["tokens"], r[f"{method}_{key}"]) for r in rows if r.get(f"{method}_{key}") is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=labels[method])
    for ax, ylabel in ((ax_time, "fwd+bwd time (ms)"), (ax_mem, "extra peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark fwd+bwd time and peak memory of our linear attention vs SDPA softmax "
                    "and the plain PyTorch linear attention, against token count. Prints a table; "
                    "writes table (.txt), rows (.json) and a plot (.png) to --out-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {DEFAULT_TOKENS})")
    parser.add_argument("--kind", default="linear-affine",
                        help=f"linear variant: {', '.join(SHORTHANDS)}, optionally -count/-kernel/-mala (normaliser)")
    parser.add_argument("--causal", action="store_true", help="causal masks for all methods (text tower)")
    parser.add_argument("--reps", type=int, default=10, help="max timed reps per cell (at least 3)")
    parser.add_argument("--min-time", type=float, default=2.0, help="stop repeating after this many seconds (>= 3 reps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a cell whose estimated time per fwd+bwd (scaled from the previous N) exceeds this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--quick", action="store_true", help=f"small run: N in {QUICK_TOKENS}, 5 reps max, 1 s per cell")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.quick:
        args.reps, args.min_time = min(args.reps, 5), 1.0
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:  # other processes' load distorts CPU timings (OpenMP barriers stall on descheduled threads)
        where = (f"CPU, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f} "
                 f"on {os.cpu_count()} CPUs at start")
    header = (f"attention fwd+bwd on {where}: B={args.batch} H={args.heads} d={args.head_dim} {args.dtype} "
              f"{args.kind}{' causal' if args.causal else ''}, torch {torch.__version__}")
    rows = run(args)
    table = format_table(rows, header)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"attention_{device.type}_{args.dtype}{'_causal' if args.causal else ''}"
    (args.out_dir / f"{stem}.txt").write_text(table + "\n")
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    if not args.no_plot:
        plot(rows, header, args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / stem}.{{txt,json{'' if args.no_plot else ',png'}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
