"""Layering rules from the design, read from every module's import statements and checked by importing.

Imports point down: cli, sweeps, runtime, tracking, algorithms, models, tasks, data, then the leaf modules
(errors.py, episode.py, config.py, net.py, store_uri.py). algorithms/ and models/ are pure torch; only runtime/ and the sweeps package talk
to Ray, only tracking.py to MLflow. Registries are plain dicts keyed by config strings, and the code that
builds a model or runs an algorithm looks its name up in them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import metadist
from metadist.algorithms import ALGORITHMS, init_meta_params, make_spec
from metadist.config import AlgorithmConfig, ModelConfig, from_dict
from metadist.models import MODELS, build_model
from metadist.models.mlp import MLP

PACKAGE = Path(metadist.__file__).resolve().parent


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """`metadist.data.sampler` for root/data/sampler.py (a package's __init__ is the package)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module named by an import statement anywhere in the file (functions included).

    `from a import b` counts as `a` and `a.b` (b may be a submodule: `from metadist import tasks`);
    relative imports are resolved against the file's package.
    """
    names: set[str] = set()
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Rule:
    """Files `applies` selects (by path relative to the package) must not import a module `bad` names."""
    name: str
    applies: Callable[[str], bool]
    bad: Callable[[str, Path], bool]
    """(imported module, package root) -> whether importing it breaks the rule."""
    example: tuple[str, str]
    """A file that breaks the rule, (path, source), for the test that the rule can fail."""


def _in(*folders: str) -> Callable[[str], bool]:
    return lambda rel: any(rel.startswith(f + "/") for f in folders)


def _model_modules(root: Path) -> set[str]:
    return {f"{root.name}.models.{f.stem}" for f in (root / "models").glob("*.py") if f.stem != "__init__"}


RULES = [
    Rule("only runtime/ and the sweeps package import ray",
         lambda rel: not _in("runtime", "sweeps")(rel), lambda m, root: under(m, ["ray"]),
         ("evaluation.py", "def f():\n    from ray import tune\n")),
    Rule("only tracking.py imports mlflow",
         lambda rel: rel != "tracking.py", lambda m, root: under(m, ["mlflow"]),
         ("runtime/submit.py", "import mlflow.tracking\n")),
    Rule("data/ never imports tasks/",
         _in("data"), lambda m, root: under(m, ["metadist.tasks"]),
         ("data/sampler.py", "from metadist import tasks\n")),
    Rule("algorithms/ and models/ are pure torch: no ray, mlflow, webdataset, data/, tasks/ or anything above",
         _in("algorithms", "models"),
         lambda m, root: under(m, ["ray", "mlflow", "webdataset", "metadist.data", "metadist.tasks",
                                   "metadist.runtime", "metadist.tracking", "metadist.sweeps", "metadist.cli"]),
         ("algorithms/maml.py", "from metadist.tasks.sinusoid import SinusoidTasks\n")),
    Rule("tracking.py imports nothing from runtime/",
         lambda rel: rel == "tracking.py", lambda m, root: under(m, ["metadist.runtime"]),
         ("tracking.py", "from metadist.runtime.net import probe\n")),
    Rule("runtime/ uses models only through the metadist.models package, never a model's own module",
         _in("runtime"), lambda m, root: under(m, _model_modules(root)),
         ("runtime/driver.py", "from metadist.models.conv4 import update_running_stats\n")),
    Rule("no module outside config.py imports a private name from metadist.config",
         lambda rel: rel != "config.py",
         lambda m, root: m.startswith("metadist.config.") and m.rsplit(".", 1)[-1].startswith("_"),
         ("sweeps/plan.py", "from metadist.config import Config, _STRICT\n")),
]


def _only(files: Callable[[str], bool], allowed: list[str], example: tuple[str, str], what: str) -> Rule:
    """`files` import from metadist only the modules under `allowed` (the layers below them)."""
    return Rule(f"{what} imports only from {', '.join(allowed) or 'no metadist module'}", files,
                lambda m, root: under(m, ["metadist"]) and not under(m, allowed), example)


# Below runtime/ and tracking.py, imports point down the order DESIGN draws.
LEAF_FILES = ("errors.py", "episode.py", "config.py", "net.py", "store_uri.py")
LEAVES = ["metadist.errors", "metadist.episode", "metadist.config"]
RULES += [
    _only(lambda rel: rel in LEAF_FILES, ["metadist.errors"], ("episode.py", "from metadist.config import Config\n"),
          f"a leaf module ({', '.join(LEAF_FILES)})"),
    _only(_in("data"), ["metadist.data", *LEAVES], ("data/writer.py", "from metadist.models import MODELS\n"),
          "data/"),
    _only(_in("tasks"), ["metadist.tasks", "metadist.data", *LEAVES],
          ("tasks/sinusoid.py", "from metadist.runtime.local import split_tasks\n"), "tasks/"),
    _only(_in("models"), ["metadist.models", *LEAVES], ("models/mlp.py", "from metadist.algorithms import maml\n"),
          "models/"),
    _only(_in("algorithms"), ["metadist.algorithms", "metadist.models", *LEAVES],
          ("algorithms/spec.py", "from metadist import evaluation\n"), "algorithms/"),
]


def violations(rule: Rule, root: Path = PACKAGE) -> dict[str, list[str]]:
    """file (relative to the package) -> the modules it imports against `rule`."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rule.applies(rel):
            bad = sorted(m for m in imported_modules(f, root) if rule.bad(m, root))
            if bad:
                out[rel] = bad
    return out


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_import_statements_follow_the_layers(rule):
    checked = [f for f in PACKAGE.rglob("*.py") if rule.applies(f.relative_to(PACKAGE).as_posix())]
    assert checked  # the rule really saw files
    assert violations(rule) == {}, rule.name


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_each_rule_fails_on_a_file_that_breaks_it(rule, tmp_path):
    root = tmp_path / "metadist"
    for sub in ("models", "data", "runtime"):  # the package skeleton the rules read
        (root / sub).mkdir(parents=True)
    (root / "models/conv4.py").write_text("")
    rel, source = rule.example
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(source)
    assert list(violations(rule, root)) == [rel]


def test_the_scanner_sees_every_import_form(tmp_path):
    root = tmp_path / "metadist"
    (root / "data").mkdir(parents=True)
    src = root / "data" / "x.py"
    src.write_text("import ray.util\nfrom mlflow import log_metric\n"
                   "def f():\n    import webdataset as wds\n    importlib.import_module('ray')\n"
                   "from metadist import tasks\nfrom ..runtime import net\nfrom . import sampler\n")
    assert {"ray.util", "mlflow", "webdataset", "ray", "metadist.tasks", "metadist.runtime.net",
            "metadist.data.sampler"} <= imported_modules(src, root)


# One interpreter imports what every layer shares (torch, numpy), then forks a fresh child per check:
# each check sees only what its own imports load, without paying for torch's import five times.
_FORKING_IMPORTER = """
import importlib, json, os, sys
import numpy, torch
out = {}
for name, imports in json.loads(sys.argv[1]).items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for m in imports:
            importlib.import_module(m)
        with os.fdopen(w, "w") as f:
            json.dump(sorted(sys.modules), f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    out[name] = json.loads(text) if status == 0 else None
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loaded_by() -> dict[str, set[str]]:
    """Check name -> the modules a fresh interpreter holds after that check's imports."""
    checks = {name: imports for name, imports, _ in LOADS}
    out = subprocess.run([sys.executable, "-c", _FORKING_IMPORTER, json.dumps(checks)], capture_output=True,
                         text=True, cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(result.values()), (result, out.stderr[-3000:])  # every child's imports succeeded
    return {name: set(mods) for name, mods in result.items()}


def _modules(*folders: str) -> list[str]:
    return sorted(module_name(f) for d in folders for f in (PACKAGE / d).rglob("*.py"))


LOADS = [
    ("algorithms/, models/ and the leaf types load nothing above them",
     ["metadist.episode", "metadist.config", *_modules("algorithms", "models")],
     ["ray", "mlflow", "webdataset", "metadist.data", "metadist.tasks", "metadist.runtime",
      "metadist.tracking"]),
    ("tasks/ loads no ray or mlflow (and webdataset only when images are used)",
     ["metadist.tasks"], ["ray", "mlflow", "webdataset"]),
    ("data/ loads no tasks/, ray or mlflow", _modules("data"), ["metadist.tasks", "ray", "mlflow"]),
    ("tracking loads nothing from runtime/", ["metadist.tracking"], ["metadist.runtime", "ray"]),
    ("metadist submit loads no MLflow", ["metadist.runtime.submit"], ["mlflow"]),
]


@pytest.mark.parametrize("name, imports, banned", LOADS, ids=[case[0] for case in LOADS])
def test_importing_a_layer_loads_nothing_above_it(name, imports, banned, loaded_by):
    loaded = loaded_by[name]
    assert set(imports) <= loaded  # the imports really ran
    bad = sorted(m for m in loaded if under(m, banned))
    assert not bad, f"{len(bad)} modules that must not load, first: {bad[:5]}"


def test_registries_are_keyed_by_config_strings():
    algo_names = typing.get_args(AlgorithmConfig.__pydantic_fields__["name"].annotation)
    model_names = typing.get_args(ModelConfig.__pydantic_fields__["name"].annotation)
    assert set(ALGORITHMS) == set(algo_names)
    assert set(MODELS) == set(model_names)
    assert all(callable(f) for f in [*ALGORITHMS.values(), *MODELS.values()])


def test_build_model_builds_what_MODELS_names(monkeypatch):
    cfg = from_dict({})
    assert isinstance(build_model(cfg), MLP)
    built = []

    def fake(c):
        built.append(c)
        return MLP(1, [3], 1)

    monkeypatch.setitem(MODELS, "mlp", fake)
    model = build_model(cfg)
    assert built == [cfg] and [p.shape for p in model.parameters()][0] == (3, 1)


def test_the_runtime_runs_the_algorithm_ALGORITHMS_names(monkeypatch):
    from metadist.runtime.local import TaskShard

    cfg = from_dict({"algorithm": {"task_parallel": "vmap"}, "task": {"shots": 2, "query": 3}})
    calls = []

    def fake(model, params, batch, spec):
        calls.append(batch.num_tasks)
        return {"w": 1}, {"loss": 2}

    monkeypatch.setitem(ALGORITHMS, "maml", fake)
    shard = TaskShard(cfg)
    out = shard.compute(init_meta_params(shard.model, cfg), 0, make_spec(cfg), range(4))
    assert out == ({"w": 1}, {"loss": 2}) and calls == [4]
