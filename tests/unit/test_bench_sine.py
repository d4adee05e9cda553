"""bench/sine.py, the README's sinusoid table: median and range over seeds, the exploded and diverged
counts, the paper's figures, and one protocol for every run."""

from __future__ import annotations

import json
import sys

import pytest

from metadist.config import load_config, to_dict

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import sine  # noqa: E402


def summary(tmp_path, name: str, seed: int, after: list[float], *overrides: str, episodes: int = 600,
            exploded: int = 0) -> str:
    """A `--summary-json` file of a sinusoid run whose MSE after k steps is after[k]."""
    cfg = to_dict(load_config(ROOT / "jobs/sine/maml.yaml", [f"seed={seed}", *overrides]))
    rows = [{"steps": k, "mean": m, "ci95": 0.1, "median": m, "diverged": 0, "exploded": exploded if k else 0}
            for k, m in enumerate(after)]
    report = {"split": "test", "shots": 5, "episodes": episodes, "metric": "mse",
              "lr": cfg["eval"]["lr"] or cfg["inner"]["lr"], "rows": rows}
    path = tmp_path / f"{name}-{seed}.json"
    path.write_text(json.dumps({"config": cfg, "eval": report}))
    return str(path)


def curve(one: float, five: float, ten: float) -> list[float]:
    return [3.0, one, 0.9, 0.8, 0.7, five, 0.6, 0.5, 0.45, 0.4, ten]


def test_rows_give_median_and_range_over_seeds_and_the_papers_figures(tmp_path, capsys):
    maml = [summary(tmp_path, "maml", s, curve(*v), exploded=s)
            for s, v in enumerate([(0.6, 0.5, 0.4), (0.5, 0.3, 0.2), (0.7, 0.4, 2.3e6)])]
    pre = [summary(tmp_path, "pre", 0, curve(2.5, 2.2, 2.1), "algorithm.name=pretrain")]
    sine.main(["--row", "MAML", *maml, "--row", "pretrained", *pre])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("| MAML | 0, 1, 2 | 0.6 (0.5 to 0.7) | 0.4 (0.3 to 0.5) | 0.4 (0.2 to 2.3e+06) "
                        "| 0 / 0, 1 / 0, 2 / 0 | 0.67 / 0.38 / 0.35 |")
    assert lines[3] == "| pretrained | 0 | 2.5 | 2.2 | 2.1 | 0 / 0 | 2.41 / 2.23 / 2.19 |"


def test_runs_scored_differently_or_not_sinusoid_runs_are_one_error(tmp_path, capsys):
    a = summary(tmp_path, "a", 0, curve(0.6, 0.5, 0.4))
    b = summary(tmp_path, "b", 1, curve(0.6, 0.5, 0.4), episodes=100)
    with pytest.raises(SystemExit) as err:
        sine.main(["--row", "MAML", a, b])
    assert err.value.code == 2 and "different protocols" in capsys.readouterr().err
    # Another test-time rate is another protocol, unless the method learns its rates (Meta-SGD).
    faster = summary(tmp_path, "f", 0, curve(0.5, 0.3, 0.2), "eval.lr=0.05")
    with pytest.raises(SystemExit):
        sine.main(["--row", "MAML", a, "--row", "MAML at 0.05", faster])
    assert "different protocols" in capsys.readouterr().err
    learned = summary(tmp_path, "m", 0, curve(0.5, 0.3, 0.2), "algorithm.name=metasgd", "eval.lr=0.05")
    sine.main(["--row", "MAML", a, "--row", "Meta-SGD", learned])
    with pytest.raises(SystemExit):
        sine.main(["--row", "MAML", str(tmp_path)])
    assert "holds no finished run" in capsys.readouterr().err
