"""The import graph follows the layers of DESIGN.md: kernels, data -> models -> train -> eval ->
experiments -> bench. A module imports only from its own layer or the layers below it; what two
layers both need lives below both. Every import counts, also the ones inside functions.

Shared modules sit beside the layers: `ds_linclip/config.py` (the schema every layer reads; it
builds on the models' attention grammar, so it may import models and below) and
`ds_linclip/serialization.py` (the safe checkpoint reader; it imports no project module).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# layer -> rank; kernels and data are both at the bottom and do not import each other
LAYERS = {
    "kernels": 0, "ds_linclip.data": 0, "ds_linclip.models": 1, "ds_linclip.train": 2, "ds_linclip.eval": 3,
    "ds_linclip.experiments": 4, "bench": 5,
}
# shared module -> the highest rank it may import from (None: no project module at all)
SHARED = {"ds_linclip": None, "ds_linclip.config": LAYERS["ds_linclip.models"], "ds_linclip.serialization": None}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer (or shared module) a dotted module name belongs to; None outside the project."""
    if module in SHARED:
        return module
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from ds_linclip import config, train` imports the modules ds_linclip.config, ds_linclip.train
            found += [(node.lineno, f"{module}.{alias.name}" if module == "ds_linclip" else module)
                      for alias in node.names]
    return found


def project_files() -> list[Path]:
    files = sorted((REPO / "ds_linclip").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py"))
    return files + sorted((REPO / "bench").rglob("*.py"))


def layer_violations() -> list[str]:
    problems = []
    for path in project_files():
        source = module_name(path)
        source_layer = layer_of(source)
        for line, target in imported_modules(path):
            target_layer = layer_of(target)
            if target_layer is None or target_layer == source_layer or target_layer in SHARED:
                continue
            target_rank = LAYERS[target_layer]
            if source_layer in SHARED:
                allowed = SHARED[source_layer] is not None and target_rank <= SHARED[source_layer]
            else:
                allowed = target_rank < LAYERS[source_layer]
            if not allowed:
                problems.append(f"{path.relative_to(REPO)}:{line}: {source} ({source_layer}) imports {target} "
                                f"({target_layer}), which is not below it")
    return problems


def test_every_import_points_down_the_layers():
    problems = layer_violations()
    assert not problems, (
        "imports against the layer order kernels, data -> models -> train -> eval -> experiments -> bench "
        "(move what both layers need below both):\n" + "\n".join(problems)
    )


def test_the_check_sees_nested_relative_and_from_imports(tmp_path, monkeypatch):
    """The checker itself: an upward import inside a function is found and named."""
    import test_layers

    fake_repo = tmp_path
    (fake_repo / "ds_linclip" / "train").mkdir(parents=True)
    (fake_repo / "ds_linclip" / "eval").mkdir(parents=True)
    (fake_repo / "ds_linclip" / "train" / "loop.py").write_text(
        "import os\n\ndef hook():\n    from ds_linclip.eval.submit import main\n    from ..data import shards\n")
    (fake_repo / "ds_linclip" / "eval" / "job.py").write_text("from ds_linclip.train import checkpoint\n")
    (fake_repo / "ds_linclip" / "config.py").write_text("from ds_linclip import train\n")
    monkeypatch.setattr(test_layers, "REPO", fake_repo)
    assert test_layers.layer_violations() == [
        "ds_linclip/config.py:1: ds_linclip.config (ds_linclip.config) imports ds_linclip.train (ds_linclip.train), "
        "which is not below it",
        "ds_linclip/train/loop.py:4: ds_linclip.train.loop (ds_linclip.train) imports ds_linclip.eval.submit "
        "(ds_linclip.eval), which is not below it",
    ]
