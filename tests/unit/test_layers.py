"""Layering rules from the design: algorithms/ and models/ are pure torch, registries are plain dicts."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import typing
from pathlib import Path

import metadist
from metadist.algorithms import ALGORITHMS
from metadist.config import AlgorithmConfig, ModelConfig
from metadist.models import MODELS

PACKAGE = Path(metadist.__file__).resolve().parent
PURE = ["algorithms", "models"]
FORBIDDEN = {"ray", "mlflow", "webdataset"}


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def test_pure_layers_have_no_forbidden_import_statements():
    files = [f for sub in PURE for f in sorted((PACKAGE / sub).rglob("*.py"))]
    assert len(files) >= 8  # the scan really saw the packages
    offenders = {str(f.relative_to(PACKAGE)): sorted(m for m in imported_modules(f)
                                                     if m.split(".")[0] in FORBIDDEN)
                 for f in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_scanner_sees_every_import_form(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import ray.util\nfrom mlflow import log_metric\n"
                   "def f():\n    import webdataset as wds\n    importlib.import_module('ray')\n")
    assert {"ray.util", "mlflow", "webdataset", "ray"} <= imported_modules(src)


def test_importing_pure_layers_loads_no_forbidden_module():
    code = ("import sys, json\n"
            "import metadist.algorithms, metadist.models, metadist.tasks, metadist.config\n"
            "from metadist.algorithms import adaptation, batching, evaluate, maml, reptile, spec\n"
            "from metadist.models import conv4, mlp\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
            "print(json.dumps({'bad': bad, 'n': len(sys.modules), 'torch': 'torch' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] and result["n"] > 100
    assert result["bad"] == []


def test_registries_are_keyed_by_config_strings():
    algo_names = typing.get_args(AlgorithmConfig.__pydantic_fields__["name"].annotation)
    model_names = typing.get_args(ModelConfig.__pydantic_fields__["name"].annotation)
    assert set(ALGORITHMS) == set(algo_names)
    assert set(MODELS) == set(model_names)
    assert type(ALGORITHMS) is dict and type(MODELS) is dict
    assert all(callable(f) for f in ALGORITHMS.values())
