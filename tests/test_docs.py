"""The manual is honest: its commands run, its links resolve, its numbers are the code's.

Every fenced shell command in README.md and docs/*.md (```bash / ```sh / ```console blocks; not
docs/results/, whose pages are study reports) is either

- cheap, and then run here as a subprocess (DS_ACCELERATOR=cpu) and checked: `python -m ds_linclip...`
  with `--help`, `--check` or `--print-config`, the model summary `python -m ds_linclip.models ...`,
  and the documented error examples (a ```console command whose shown output starts with `error:`,
  which must exit 2); a ```console block's shown output must be in the real output; or
- listed in EXPENSIVE below with the test (or the documented command) that covers it.

A new command that is neither fails `test_every_doc_command_is_run_or_covered`, naming the file and
the command. Every relative link (and #anchor) in README.md and docs/ must resolve, and the front
page's FLOPs and accuracy tables must be what `ds_linclip.models.flops` and docs/results/compare.json say.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MANUAL_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # commands checked here
LINKED_PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]  # links checked here
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

# Commands too costly to run here (training, Slurm jobs, full evaluations, the test suite itself):
# documented command (whitespace-normalised) -> what covers it: a path in the repository (a test
# file, `file::test_name`, or the script CI runs), then why.
EXPENSIVE: dict[str, str] = {
    # front page and demo
    "bash scripts/demo.sh": "tests/test_demo.py: the real script end to end, 50 steps",
    "bash scripts/demo.sh model.image.attention=linear-affine model.image.local_kernel=0 "
    "model.text.attention=linear-affine train.run_name=demo_affine":
        "tests/test_demo.py: the same script; the overrides are ordinary config keys",
    "bash scripts/test.sh": ".ci/run: CI runs exactly this",
    'bash scripts/test.sh -m "not slow"': ".ci/run: the same script with a pytest marker",
    "bash scripts/test.sh -k config": ".ci/run: the same script with a pytest filter",
    # training
    "deepspeed --num_gpus 8 --module ds_linclip.train --config configs/vit_b16_laion400m_focused.yaml "
    "data.train_shards='/data/laion400m/{00000..41455}.tar' train.micro_batch_size=128":
        "tests/test_train_signals.py: the deepspeed launcher on 2 CPU ranks (tiny preset)",
    "deepspeed --num_gpus 8 --module ds_linclip.train --config configs/vit_b16_laion400m.yaml "
    "data.train_shards='/data/laion400m/{00000..41455}.tar' train.micro_batch_size=128":
        "tests/test_train_signals.py: the deepspeed launcher on 2 CPU ranks (tiny preset)",
    "torchrun --nproc_per_node 8 -m ds_linclip.train --config configs/vit_b16_laion400m.yaml":
        "tests/test_train.py: ranks started as torchrun does (RANK/WORLD_SIZE/LOCAL_RANK)",
    "deepspeed --num_gpus 8 --module ds_linclip.train --config configs/vit_b16_laion400m.yaml "
    "model.pretrained=/ckpt/open_clip_vit_b16.pt model.image.attention=linear-focused "
    "model.text.attention=linear-focused train.linearize.enabled=true train.steps=2000 "
    "train.linearize.transfer_steps=1000 train.lr=1e-4":
        "tests/test_linearize.py::test_both_stages_through_the_deepspeed_launcher_zero2_from_open_clip",
    # scaling study
    "python -m ds_linclip.experiments.scaling --plan":
        "tests/test_scaling.py::test_plan_prints_the_grid_and_its_cost: the plan of a small grid at a given rate",
    "python -m ds_linclip.experiments.scaling --jobs 2 --max-cpu-minutes 480":
        "tests/test_scaling.py::test_quick_scaling_end_to_end: the same command on a tiny grid (real trainer and "
        "eval job); the budget refusal in test_a_grid_above_the_budget_is_refused_before_anything_runs",
    "python -m ds_linclip.experiments.scaling --no-train":
        "tests/test_scaling.py::test_quick_scaling_end_to_end: the --no-train report of the finished runs",
    # data
    "python -m ds_linclip.data.writer fashion-mnist --out data/fmnist":
        "tests/test_writer.py::test_fashion_mnist_shards_match_the_source",
    "python -m ds_linclip.data.writer imagefolder --images DIR --captions captions.csv --out shards/":
        "tests/test_writer.py::test_imagefolder_with_captions_tsv_via_cli",
    "python -m ds_linclip.data.writer img2dataset --input '/data/laion/{00000..00099}.tar' --out shards/":
        "tests/test_writer.py::test_img2dataset_reshard",
    # CLIP_benchmark's datasets
    "python -m ds_linclip.eval --checkpoint runs/demo/final eval.zeroshot_data=wds_fashion_mnist "
    "eval.classnames=dataset eval.templates=dataset":
        "tests/test_eval_clip_benchmark.py::test_zero_shot_equals_clip_benchmark",
    "python -m ds_linclip.eval --checkpoint runs/demo/final eval.retrieval_data=wds_fashion_mnist_captions":
        "tests/test_eval_clip_benchmark.py::test_retrieval_equals_clip_benchmark",
    "python -m ds_linclip.eval.clip_benchmark --checkpoint runs/demo/final --dataset-dir wds_fashion_mnist "
    "--task zeroshot_classification --output metrics.json":
        "tests/test_eval_clip_benchmark.py::test_adapter_cli_prints_clip_benchmark_metrics",
    # Slurm
    "mkdir -p logs": "tests/test_slurm.py: the batch jobs write their logs there",
    "sbatch slurm/train_vits.sh data.train_shards='/data/laion400m/{00000..41455}.tar'":
        "tests/test_slurm.py::test_headers_are_sized_for_real_runs",
    "sbatch slurm/train_vitb.sh data.train_shards='/data/laion400m/{00000..41455}.tar'":
        "tests/test_slurm.py::test_headers_are_sized_for_real_runs",
    "sbatch slurm/train_vitl.sh data.train_shards='/data/laion400m/{00000..41455}.tar'":
        "tests/test_slurm.py::test_train_job_exits_0_with_checkpoints_export_and_log",
    "sbatch slurm/eval.sh --checkpoint runs/vit_l16_linear_laion400m/final/model.safetensors":
        "tests/test_slurm.py::test_eval_sh_scores_the_deepspeed_checkpoint_like_the_export",
    "sbatch slurm/eval.sh --watch runs/vit_l16_linear_laion400m":
        "tests/test_eval_job.py::test_watcher_scores_each_checkpoint_once_across_a_restart",
    "python -m ds_linclip.eval.submit --checkpoint runs/vit_l16_linear_laion400m/checkpoints/step_00010000 "
    "eval.partition=gpu": "tests/test_slurm.py::test_eval_job_through_submitit_scores_the_checkpoint",
    'eval "$(python tests/slurm_cluster.py up)"': "tests/test_slurm.py: its fixture brings the cluster up",
    "python tests/slurm_cluster.py status": "tests/test_slurm.py: its fixture asks the cluster's status",
    "python tests/slurm_cluster.py down": "tests/slurm_cluster.py: the same CLI as `up`",
    # evaluation
    "python -m ds_linclip.eval --checkpoint runs/demo/final --config configs/demo_fmnist.yaml":
        "tests/test_demo.py: scripts/demo.sh's third step is this command",
    "python -m ds_linclip.eval --watch runs/demo --config configs/demo_fmnist.yaml":
        "tests/test_eval_job.py::test_watcher_scores_each_checkpoint_once_across_a_restart",
    "python -m ds_linclip.eval.submit --checkpoint runs/demo/final --config configs/demo_fmnist.yaml --wait":
        "tests/test_eval_job.py::test_submitit_local_executor_runs_the_eval_job",
    "python -m ds_linclip.eval --checkpoint R/checkpoints/step_00010000 --config configs/eval/imagenet1k.yaml":
        "tests/test_eval_reference.py: imagenet1k class names and templates against open_clip's",
    # the trainer against open_clip_train at many tokens
    "python bench/throughput.py --image-size 112 --patch-size 4 --batch-size 32 --steps 24 --skip-steps 4 "
    "--repeats 2 --threads 2 --runs softmax linear-focused-local3 linear-focused-local3:pd0.5 softmax:pd0.5":
        "tests/test_bench_throughput.py: the script through gpu_check.sh at tiny shapes (our runs; the open_clip baseline runs by hand, bench/results/throughput_cpu_*.json)",
    # the frontier study
    "python -m ds_linclip.data.writer fashion-mnist-canvas --out data/fmnist-canvas56 --canvas 56 --item-size 8":
        "tests/test_writer.py::test_fashion_mnist_canvas_draws_each_item_small_and_is_deterministic",
    "python -m ds_linclip.experiments.frontier --plan":
        "tests/test_frontier.py::test_plan_prints_every_run_with_its_flops_before_any_run",
    "python -m ds_linclip.experiments.frontier --jobs 2":
        "tests/test_frontier.py::test_quick_study_end_to_end",
}


@dataclass(frozen=True)
class DocCommand:
    page: Path
    line: int  # 1-based line of the command's first line
    text: str  # whitespace-normalised, comments and continuations removed
    shown_output: tuple[str, ...] = ()  # ```console only: the lines shown after `$ command`

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` at a word start, outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def _fenced_blocks(page: Path):
    """(language, first body line number, body lines) of each fenced block."""
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^\s*```(\w*)\s*$", lines[index])
        if match:
            end = index + 1
            while end < len(lines) and not lines[end].strip().startswith("```"):
                end += 1
            yield match.group(1), index + 2, lines[index + 1:end]
            index = end
        index += 1


def doc_commands(page: Path) -> list[DocCommand]:
    """The shell commands of `page`'s fenced blocks. In ```console blocks commands start with `$ ` and
    the lines after one (up to the next `$ `) are its shown output; in the others every line is code."""
    commands: list[DocCommand] = []
    for language, first_line, body in _fenced_blocks(page):
        if language not in SHELL_LANGUAGES:
            continue
        console = language == "console"
        block: list[list] = []  # [line, text, shown output lines]
        pending = None  # text of a command continued with a trailing backslash
        for offset, raw in enumerate(body):
            if console and pending is None:
                if not raw.startswith("$ "):
                    if block and raw.strip():
                        block[-1][2].append(raw)
                    continue
                raw = raw[2:]
            code = _strip_comment(raw).rstrip()
            if pending is None:
                if not code.strip():
                    continue
                pending = ""
                block.append([first_line + offset, "", []])
            if code.endswith("\\"):
                pending += code[:-1] + " "
                continue
            block[-1][1] = " ".join((pending + code).split())
            pending = None
        commands += [DocCommand(page, line, text, tuple(output)) for line, text, output in block]
    return commands


def _words(command: DocCommand) -> list[str]:
    words = shlex.split(command.text)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # leading VAR=value assignments
        words = words[1:]
    return words


def is_cheap(command: DocCommand) -> bool:
    """Runs in seconds: our CLIs' help, dry runs and model summary, or a documented config error."""
    words = _words(command)
    if words[:2] != ["python", "-m"] or len(words) < 3 or not words[2].startswith("ds_linclip"):
        return False
    return (
        bool({"--help", "--check", "--print-config"} & set(words))
        or words[2] == "ds_linclip.models"
        or (bool(command.shown_output) and command.shown_output[0].startswith("error:"))
    )


ALL_COMMANDS = [command for page in MANUAL_PAGES for command in doc_commands(page)]
CHEAP_COMMANDS = [command for command in ALL_COMMANDS if is_cheap(command)]


def test_the_manual_has_commands_of_both_kinds():
    # the parser works: the front page's own commands are found, split and classified
    texts = {command.text for command in ALL_COMMANDS}
    assert {"bash scripts/demo.sh", "bash scripts/test.sh", 'bash scripts/test.sh -m "not slow"'} <= texts
    assert any(c.text.startswith("python -m ds_linclip.models") for c in CHEAP_COMMANDS if c.page.name == "README.md")
    assert any(c.shown_output and c.shown_output[0].startswith("error:") for c in CHEAP_COMMANDS)
    assert len(CHEAP_COMMANDS) >= 8


def test_every_doc_command_is_run_or_covered():
    unclassified = [str(command) for command in ALL_COMMANDS if not is_cheap(command) and command.text not in EXPENSIVE]
    assert not unclassified, (
        "documented shell commands that tests/test_docs.py neither runs nor lists in EXPENSIVE with what "
        "covers them:\n  " + "\n  ".join(unclassified)
    )


def test_expensive_entries_are_documented_and_their_coverage_exists():
    documented = {command.text for command in ALL_COMMANDS}
    stale = [text for text in EXPENSIVE if text not in documented]
    assert not stale, f"EXPENSIVE lists commands no page documents any more: {stale}"
    for text, covered_by in EXPENSIVE.items():
        target = covered_by.split(":")[0]
        path = REPO / target
        assert path.is_file(), f"{text!r}: covered by {covered_by!r}, but {target} does not exist"
        if "::" in covered_by:
            test_name = covered_by.split("::", 1)[1].split(":")[0].strip()
            assert re.search(rf"^def {re.escape(test_name)}\(", path.read_text(), re.M), (
                f"{text!r}: {target} has no test {test_name}"
            )


# --------------------------------------------------------------------------- running the cheap ones
def _needs_data(command: DocCommand) -> bool:
    """`--check` looks at the shards; the documented error examples fail before any file is read."""
    return "--check" in _words(command)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A working directory like the repository root: configs/ (and data/ on demand), code on PYTHONPATH."""
    root = tmp_path_factory.mktemp("docs_cwd")
    (root / "configs").symlink_to(REPO / "configs")
    return root


def _normalised(line: str) -> str:
    return " ".join(line.split())


# `--check` needs the demo's shards: written once per machine by the fmnist_shards fixture (slow the first time)
@pytest.mark.parametrize("command", [
    pytest.param(command, id=f"{command.page.name}:{command.line}", marks=[pytest.mark.slow] if _needs_data(command) else [])
    for command in CHEAP_COMMANDS
])
def test_cheap_doc_command_runs(command, sandbox, request):
    if _needs_data(command) and not (sandbox / "data" / "fmnist").exists():
        # the demo's shards at the demo's path (data/fmnist), as after `bash scripts/demo.sh`
        (sandbox / "data").mkdir(exist_ok=True)
        (sandbox / "data" / "fmnist").symlink_to(request.getfixturevalue("fmnist_shards"))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(["bash", "-c", command.text], cwd=sandbox, env=env, capture_output=True, text=True,
                            timeout=300)
    words = _words(command)
    expected_error = bool(command.shown_output) and command.shown_output[0].startswith("error:")
    where = f"{command}\nexit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == (2 if expected_error else 0), where
    if expected_error:
        # the error is the one line on stderr, word for word as the page shows it
        assert [_normalised(line) for line in result.stderr.strip().splitlines()] == [
            _normalised(line) for line in command.shown_output], where
        return
    if "--help" in words:
        assert result.stdout.startswith("usage: "), where
    elif "--print-config" in words:
        import yaml

        resolved = yaml.safe_load(result.stdout)
        assert {"model", "data", "train"} <= set(resolved), where
    elif "--check" in words:
        assert "global batch" in result.stdout, where
    else:  # the model summary
        assert "image (per image)" in result.stdout and "total (1 image + 1 caption)" in result.stdout, where
    actual = {_normalised(line) for line in result.stdout.splitlines()}
    missing = [line for line in command.shown_output if _normalised(line) not in actual]
    assert not missing, f"output shown on the page but not printed: {missing}\n{where}"


# --------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(match) for match in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor do code spans
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_resolves():
    broken = []
    for page in LINKED_PAGES:
        for link in _links(page):
            if re.match(r"^[a-z]+:", link):  # http:, https:, mailto:
                continue
            target_text, _, anchor = link.partition("#")
            target = (page.parent / target_text).resolve() if target_text else page
            if not target.exists():
                broken.append(f"{page.relative_to(REPO)}: {link} (no such file)")
            elif anchor and target.is_file() and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.relative_to(REPO)}: {link} (no heading #{anchor} in {target.name})")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


# --------------------------------------------------------------------------- the front page's numbers
def _front_page_table(header_start: str) -> list[list[str]]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("*").strip() for cell in line.strip("|").split("|")])
    return rows


def test_front_page_flops_table_is_the_model_summary():
    from ds_linclip.config import load_config
    from ds_linclip.models.flops import model_cost

    rows = _front_page_table("| image tower, forward |")
    assert len(rows) >= 4
    for model, pixels, tokens, softmax_gflops, share, linear_gflops, saving in rows:
        preset = {"ViT-B/16": "vit_b16", "ViT-L/16": "vit_l16"}[model]
        cost = {}
        for kind in ("softmax", "linear-focused"):
            cfg = load_config([], [f"model.preset={preset}", f"model.image.image_size={pixels}",
                                   f"model.image.attention={kind}", f"model.text.attention={kind}"])
            cost[kind] = model_cost(cfg.model).image
        softmax, linear = cost["softmax"], cost["linear-focused"]
        assert int(tokens.replace(",", "")) == softmax.tokens
        assert softmax_gflops == f"{softmax.flops / 1e9:.1f}", (model, pixels)
        assert linear_gflops == f"{linear.flops / 1e9:.1f}", (model, pixels)
        assert share == f"{100 * softmax.attention_flops / softmax.flops:.1f}%", (model, pixels)
        assert saving == f"{100 * (1 - linear.flops / softmax.flops):.1f}%", (model, pixels)


def test_front_page_accuracy_table_is_the_comparison_report():
    """Each row is what a comparison report says: docs/results/compare.json, or for a variant compared later
    beside a new softmax baseline, its own report (docs/results/compare_<variant>/compare.json)."""
    by_key = {}
    for path in [REPO / "docs" / "results" / "compare.json", *sorted((REPO / "docs" / "results").glob("compare_*/compare.json"))]:
        for row in json.loads(path.read_text())["rows"]:
            by_key.setdefault((row["kind"], row["tokens"], row["steps"]), row["top1"])
    rows = _front_page_table("| attention | top-1 %")
    assert {row[0].split(" ")[0] for row in rows} >= {"softmax", "linear-affine", "linear-focused-local3"}
    for row in rows:
        kind = row[0].split(" ")[0]
        for cell, (tokens, steps) in zip(row[1:4], [(50, 150), (197, 150), (197, 600)]):
            top1 = by_key[(kind, tokens, steps)]
            assert cell == f"{100 * top1['mean']:.1f} ± {100 * top1['std']:.1f}", (kind, tokens, steps)
