"""bench/memory.py, the README's memory table: both modes per row, their ratios, the slopes, the goal
lines, the JSON rows, and its one-line errors."""

from __future__ import annotations

import json
import sys

import pytest

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import memory as bench_memory  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_small_run_reports_rows_ratios_slopes_and_goals(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_memory.main(["--models", "conv4", "--steps", "1,3,10", "--image-size", "16", "--query", "2",
                              "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["steps"], r["checkpoint"]) for r in rows] == [(1, False), (1, True), (3, False), (3, True),
                                                              (10, False), (10, True)]
    assert all(r["peak_mb"] > 0 and r["time_s"] > 0 and r["finite"] for r in rows)
    plain = {r["steps"]: r["peak_mb"] for r in rows if not r["checkpoint"]}
    ckpt = {r["steps"]: r["peak_mb"] for r in rows if r["checkpoint"]}
    assert plain[10] > plain[1] and ckpt[10] < plain[10]
    table = [line for line in text.splitlines() if line.startswith("| conv4 |")]
    assert len(table) == 3 and table[2].startswith("| conv4 | 10 |")
    ratio = float(table[2].split("|")[5])
    assert ratio == pytest.approx(ckpt[10] / plain[10], abs=0.006)
    assert "conv4: slope" in text and "MB per inner step" in text
    assert "conv4, 10 steps: checkpointed peak" in text


def test_slope_is_the_least_squares_line():
    rows = [{"steps": 1, "peak_mb": 10.0}, {"steps": 5, "peak_mb": 18.0}, {"steps": 10, "peak_mb": 28.0}]
    assert bench_memory.slope(rows) == pytest.approx(2.0)


@pytest.mark.parametrize("args, message", [(["--models", "vgg"], "--models: unknown vgg"),
                                           (["--steps", "1,x"], "--steps:"),
                                           (["--repeats", "0"], "--repeats: at least 1")])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    assert bench_memory.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
