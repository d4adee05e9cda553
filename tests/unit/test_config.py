"""The typed config: YAML round trip, `--set` overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from metadist.config import (Config, ConfigError, dump_config, field_docs, flatten, from_dict, load_config,
                             parse_override, to_dict)

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(fn, *args) -> str:
    """The message of the ConfigError `fn(*args)` raises; it must be ours, not pydantic's."""
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert not isinstance(info.value, ValidationError)
    assert info.value.__cause__ is None or not isinstance(info.value.__cause__, ValidationError)
    return str(info.value)


def test_defaults_are_the_maml_sinusoid_setup():
    cfg = from_dict({})
    assert cfg.task.family == "sinusoid" and cfg.model.name == "mlp" and cfg.model.hidden == [40, 40]
    assert cfg.algorithm.name == "maml" and cfg.inner.lr == 0.01 and cfg.inner.steps == 1
    assert cfg.task.amplitude == (0.1, 5.0) and cfg.task.x_range == (-5.0, 5.0)


def test_yaml_round_trip(tmp_path):
    cfg = from_dict({"name": "x", "seed": 3, "inner": {"lr": 0.4, "steps": 5},
                     "task": {"amplitude": [0.5, 2.0], "shots": 7},
                     "model": {"hidden": [16, 8]},
                     "algorithm": {"name": "metasgd", "msl": True, "first_order_until": 10},
                     "eval": {"lr": 0.2, "shots": 3}, "data": {"path": "/tmp/shards"}})
    text = dump_config(cfg)
    back = load_config(write(tmp_path, text, "other-name.yaml"))
    assert back == cfg
    assert back.name == "x"  # a name in the file wins over the file's stem
    assert to_dict(back) == to_dict(cfg) == yaml.safe_load(text)
    assert to_dict(cfg)["task"]["amplitude"] == [0.5, 2.0]  # plain YAML types, no tuples
    # The defaults round-trip too, with every float kept exactly.
    assert load_config(write(tmp_path, dump_config(Config()))) == Config()



def _key_orders(d, prefix=""):
    """Every section's keys in order, so a test can compare order and not just equality."""
    out = {prefix: list(d)}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_key_orders(v, f"{prefix}{k}."))
    return out


@pytest.mark.parametrize("job", sorted(str(p.relative_to(JOBS)) for p in JOBS.rglob("*.yaml")
                                        if p.parent.name != "sweeps") + [None])
def test_to_dict_is_what_the_yaml_round_trip_gave(job):
    """to_dict copies with asdict, no YAML round trip: same values, same types, same key order."""
    cfg = load_config(JOBS / job) if job else Config()
    reference = yaml.safe_load(yaml.dump(dataclasses.asdict(cfg), Dumper=_TupleDumper))
    plain = to_dict(cfg)
    assert plain == reference and _key_orders(plain) == _key_orders(reference)
    assert dump_config(cfg) == yaml.safe_dump(reference, sort_keys=False)
    leaves = [v for v in flatten(plain).values() for v in (v if isinstance(v, list) else [v])]
    assert all(type(v) in (str, int, float, bool, type(None)) for v in leaves)
    plain["inner"]["lr"] = -1.0  # a copy: changing it leaves the config alone
    assert cfg.inner.lr != -1.0


class _TupleDumper(yaml.SafeDumper):
    """The old to_dict's path: tuples written as YAML lists (safe_dump alone refuses tuples)."""


_TupleDumper.add_representer(tuple, yaml.SafeDumper.represent_list)


def test_from_dict_copies_the_callers_dict():
    data = {"inner": {"lr": 0.1}, "model": {"hidden": [4]}}
    cfg = from_dict(data, ["inner.lr=0.5", "model.hidden=[8]"])
    assert cfg.inner.lr == 0.5 and cfg.model.hidden == [8]
    assert data == {"inner": {"lr": 0.1}, "model": {"hidden": [4]}}


def test_run_configs_written_before_outer_schedule_still_load():
    # Run folders and checkpoints of earlier versions hold `outer.cosine`; it reads as the schedule it meant.
    old = {"outer": {"optimizer": "sgd", "cosine": True, "min_lr": 0.0}}
    assert from_dict(old).outer.schedule == "cosine" and old["outer"]["cosine"] is True
    assert from_dict({"outer": {"cosine": False}}).outer.schedule == "constant"
    with pytest.raises(ConfigError, match="outer.cosine: got 'yes'; allowed: true or false"):
        from_dict({"outer": {"cosine": "yes"}})
    with pytest.raises(ConfigError, match="unknown key 'outer.cosine'"):
        from_dict({"outer": {"cosine": True, "schedule": "linear"}})  # both: one of them is a mistake


def test_job_name_defaults_to_the_file_stem(tmp_path):
    assert load_config(write(tmp_path, "seed: 1\n", "sine-maml.yaml")).name == "sine-maml"
    assert load_config(write(tmp_path, "", "empty.yaml")) == dataclasses.replace(Config(), name="empty")


def test_overrides_with_type_conversion(tmp_path):
    path = write(tmp_path, "inner:\n  lr: 0.1\nmodel:\n  hidden: [4]\n")
    cfg = load_config(path, ["inner.lr=0.25", "inner.steps=3", "algorithm.msl=true", "model.hidden=[8, 8]",
                             "eval.shots=null", "eval.lr=1e-2", "name=abc", "task.x_range=[-1, 1]",
                             "algorithm.name=reptile", "train.out_dir=/tmp/a=b"])
    assert cfg.inner.lr == 0.25 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.steps == 3 and isinstance(cfg.inner.steps, int)
    assert cfg.algorithm.msl is True
    assert cfg.model.hidden == [8, 8]
    assert cfg.eval.shots is None and cfg.eval.lr == 0.01
    assert cfg.name == "abc" and cfg.algorithm.name == "reptile"
    assert cfg.task.x_range == (-1.0, 1.0)
    assert cfg.train.out_dir == "/tmp/a=b"  # split on the first '=' only
    # Later overrides win.
    assert load_config(path, ["inner.steps=2", "inner.steps=4"]).inner.steps == 4
    assert parse_override("a.b= 5") == ("a.b", 5)
    assert parse_override("a.b=") == ("a.b", "")


def test_bad_override_syntax():
    assert "key.path=value" in config_error(from_dict, {}, ["inner.lr"])
    assert "empty key" in config_error(from_dict, {}, ["=3"])


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    msg = config_error(load_config, write(tmp_path, "inner:\n  lr: 0.1\n  stepz: 3\n"))
    assert "inner.stepz" in msg and "lr" in msg and "steps" in msg
    msg = config_error(from_dict, {}, ["algorithm.nme=maml"])
    assert "algorithm.nme" in msg and "first_order_until" in msg and "reptile_optimizer" in msg
    msg = config_error(from_dict, {"trian": {"steps": 3}})
    assert "trian" in msg and "top level" in msg and "train" in msg and "algorithm" in msg
    msg = config_error(from_dict, {}, ["inner=3"])
    assert "inner" in msg and "mapping" in msg


def test_override_below_a_leaf_is_a_config_error(tmp_path):
    msg = config_error(load_config, write(tmp_path, "inner:\n  lr: 0.1\n"), ["inner.lr.x=1"])
    assert "inner.lr" in msg
    assert "name" in config_error(from_dict, {}, ["name.first=a"])


@pytest.mark.parametrize("override, key", [
    ("inner.steps=abc", "inner.steps"),
    ("inner.steps=1.5", "inner.steps"),
    ("inner.lr=fast", "inner.lr"),
    ("algorithm.msl=maybe", "algorithm.msl"),
    ("model.hidden=3", "model.hidden"),
    ("task.amplitude=[1, 2, 3]", "task.amplitude"),
])
def test_wrong_type(override, key):
    msg = config_error(from_dict, {}, [override])
    assert key in msg and "got" in msg


@pytest.mark.parametrize("override, key", [
    ("task.ways=1", "task.ways"),
    ("inner.lr=0", "inner.lr"),
    ("inner.lr=-1", "inner.lr"),
    ("inner.steps=0", "inner.steps"),
    ("model.hidden=[8, 0]", "model.hidden"),
    ("model.bn_momentum=1.5", "model.bn_momentum"),
    ("seed=-1", "seed"),
    ("outer.min_lr=-0.1", "outer.min_lr"),
])
def test_out_of_range(override, key):
    msg = config_error(from_dict, {}, [override])
    assert key in msg
    value = override.split("=", 1)[1]
    assert value.strip("[]").split(",")[-1].strip() in msg  # what was given is echoed


def test_cross_field_checks():
    assert "model.name" in config_error(from_dict, {"model": {"name": "conv4"}})
    assert "model.name" in config_error(from_dict, {"task": {"family": "fewshot"}})
    assert "task.amplitude" in config_error(from_dict, {"task": {"amplitude": [3.0, 1.0]}})
    assert "task.x_range" in config_error(from_dict, {"task": {"x_range": [1.0, 1.0]}})
    ok = from_dict({"task": {"family": "fewshot"}, "model": {"name": "conv4"}})
    assert ok.model.name == "conv4"
    msg = config_error(from_dict, {"train": {"select": "best_val"}})
    assert "train.select" in msg and "train.eval_every" in msg and "last" in msg
    assert from_dict({"train": {"select": "best_val", "eval_every": 5}}).train.select == "best_val"


NAV = {"task": {"family": "navigation"}, "model": {"name": "policy"}}


@pytest.mark.parametrize("change, key, allowed", [
    ({"model": {"name": "mlp"}}, "model.name", "policy for navigation"),
    ({"task": {"family": "sinusoid"}}, "model.name", "'policy' is for them only"),
    ({"algorithm": {"name": "reptile"}}, "algorithm.name", "maml, fomaml, anil, metasgd, pretrain"),
    ({"algorithm": {"name": "maml", "msl": True}}, "algorithm.msl", "allowed there: false"),
])
def test_navigation_checks_name_the_key_and_what_is_allowed(change, key, allowed):
    data = {k: {**NAV.get(k, {}), **change.get(k, {})} for k in {*NAV, *change}}
    msg = config_error(from_dict, data)
    assert key in msg and allowed in msg
    assert "outer.optimizer" in config_error(from_dict, {"outer": {"optimizer": "trpo"}})
    assert "task.goal_range" in config_error(from_dict, {**NAV, "task": {"family": "navigation", "goal_range": [1, 0]}})
    assert "eval.later_lr_scale" in config_error(from_dict, {"eval": {"later_lr_scale": 0.5}})
    ok = from_dict({**NAV, "outer": {"optimizer": "trpo"}, "eval": {"later_lr_scale": 0.5}})
    assert ok.rl.max_kl == 0.01 and ok.eval.later_lr_scale == 0.5


def test_literal_lists_the_allowed_values():
    msg = config_error(from_dict, {}, ["algorithm.name=mamll"])
    assert "algorithm.name" in msg and "mamll" in msg
    for name in ("maml", "fomaml", "reptile", "anil", "metasgd", "pretrain"):
        assert f"'{name}'" in msg
    msg = config_error(from_dict, {}, ["model.bn=running"])
    assert "'transductive'" in msg and "'per_step'" in msg


def test_all_errors_are_reported_at_once():
    msg = config_error(from_dict, {"inner": {"lr": -1, "steps": 0}})
    assert "inner.lr" in msg and "inner.steps" in msg


def test_file_errors(tmp_path):
    assert "does not exist" in config_error(load_config, tmp_path / "nope.yaml")
    assert "not valid YAML" in config_error(load_config, write(tmp_path, "inner: [unclosed\n"))
    assert "mapping" in config_error(load_config, write(tmp_path, "- a\n- b\n"))
    assert "mapping" in config_error(load_config, write(tmp_path, "3\n"))
    assert "inner" in config_error(load_config, write(tmp_path, "inner: [1, 2]\n"))


def test_every_field_has_a_docstring():
    docs = field_docs()
    assert len(docs) == len(flatten(to_dict(Config())))
    assert set(docs) == set(flatten(to_dict(Config())))
    empty = [k for k, v in docs.items() if not v]
    assert not empty
    assert "inner.lr" in docs and "alpha" in docs["inner.lr"]
    # Sections themselves are documented too.
    sections = {f.name: f for f in dataclasses.fields(Config)}
    assert all(Config.__pydantic_fields__[n].description for n in sections)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
