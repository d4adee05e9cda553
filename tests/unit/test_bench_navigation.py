"""bench/navigation.py, the README's navigation table: per-seed rows, the median over seeds, the random
row from each MAML run's initial policy, the authors' figures, and the figure file."""

from __future__ import annotations

import json
import sys

import pytest

from metadist.config import dump_config, load_config

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import navigation  # noqa: E402


def report(means: list[float], lr: float = 0.1) -> dict:
    return {"split": "test", "shots": 40, "episodes": 40, "metric": "return", "lr": lr,
            "rows": [{"steps": k, "mean": m, "ci95": 2.0, "median": m, "diverged": 0, "exploded": 0}
                     for k, m in enumerate(means)]}


def run_folder(tmp_path, name: str, seed: int, after: list[float], initial: list[float] | None = None):
    """A finished run folder: its config, its test evaluation and (optionally) its initial policy's."""
    job = "maml" if name.startswith("maml") else "pretrain"
    folder = tmp_path / f"{name}-{seed}"
    folder.mkdir()
    cfg = load_config(ROOT / f"jobs/rl/{job}-navigation.yaml", [f"seed={seed}"])
    (folder / "config.yaml").write_text(dump_config(cfg))
    (folder / "eval.json").write_text(json.dumps(report(after)))
    if initial is not None:
        (folder / "eval_initial.json").write_text(json.dumps(report(initial)))
    return str(folder)


def test_table_has_seeds_medians_random_rows_and_the_authors_figures(tmp_path, capsys):
    maml = [run_folder(tmp_path, "maml", s, [-40.0 - s, -12.0 + s, -5.0, -4.0],
                       initial=[-80.0, -60.0, -55.0, -50.0 + s]) for s in range(3)]
    pre = [run_folder(tmp_path, "pretrain", 0, [-41.0, -20.0, -12.0, -9.0])]
    out = tmp_path / "nav.png"
    navigation.main(["--maml", *maml, "--pretrained", *pre, "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("| MAML | seed 0, rate 0.1, 40 trajectories | -40.0 ± 2.0 | -12.0 ± 2.0 | -5.0 ± 2.0 "
                        "| -4.0 ± 2.0 |")
    assert "| MAML | median of 3 | -41.0 | -11.0 | -5.0 | -4.0 |" in lines
    assert "| MAML | authors' result files | -40.4 | -11.7 | -3.3 | -3.2 |" in lines
    assert ("| pretrained | seed 0, rate 0.1, 40 trajectories | -41.0 ± 2.0 | -20.0 ± 2.0 | -12.0 ± 2.0 "
            "| -9.0 ± 2.0 |") in lines
    assert "| pretrained | median of 1 | " not in "\n".join(lines)  # one run: no median row
    random = [line for line in lines if line.startswith("| random | seed")]
    assert len(random) == 3 and random[2].endswith("| -48.0 ± 2.0 |")  # seed 2's initial policy
    assert "| random | median of 3 | -80.0 | -60.0 | -55.0 | -49.0 |" in lines
    assert out.stat().st_size > 0 and lines[-1] == f"figure: {out}"


def test_bad_runs_and_settings_are_one_error(tmp_path, capsys):
    maml = run_folder(tmp_path, "maml", 0, [-40.0, -12.0, -5.0, -4.0], initial=[-80.0] * 4)
    with pytest.raises(SystemExit) as err:
        navigation.main(["--maml", maml, "--set", "inner.lr=0.2"])
    assert err.value.code == 2 and "eval.* keys only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        navigation.main(["--maml", str(tmp_path)])
    assert err.value.code == 2 and "holds no finished run" in capsys.readouterr().err
