"""The README's sinusoid table from finished runs: for each method, its seeds' 5-shot MSE after 1 / 5 / 10
test-time steps as the median and the range over seeds, the tasks that exploded or diverged after 10
steps in each seed, and the MAML paper's figures beside them.

Each run is a `metadist train jobs/sine/<job>.yaml --set seed=S` run folder, or the summary JSON that
`metadist train`/`metadist eval` wrote with --summary-json. Every run of the table must have been scored
under one protocol (split, shots, tasks, test-time rate, unless the method learns its rates).

    python bench/sine.py --row "MAML (paper's settings)" runs/maml-A runs/maml-B runs/maml-C \\
        --row "pretrained, fine-tuned" runs/pretrain-A runs/pretrain-B runs/pretrain-C
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metadist.runtime.driver import read_finished_run  # noqa: E402

STEPS = (1, 5, 10)
PAPER = {"maml": (0.67, 0.38, 0.35), "pretrain": (2.41, 2.23, 2.19)}
"""The MAML paper's 5-shot MSE after 1 / 5 / 10 steps (its Figure 2, section 5.1): MAML (the figures every
MAML-family row is held to) and the pretrained baseline."""


def cell(values: list[float]) -> str:
    """Median and range of one column over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.median(values):.3g} ({min(values):.3g} to {max(values):.3g})"


def row(label: str, runs: list[Path]) -> tuple[str, dict]:
    """One markdown row of the table, and the protocol its runs were scored under."""
    seeds, means, counts, protocols = [], {s: [] for s in STEPS}, [], set()
    for run in runs:
        cfg, report = read_finished_run(run)
        if report["metric"] != "mse":
            raise ValueError(f"{run} is not a sinusoid run (its metric is {report['metric']})")
        by_step = {r["steps"]: r for r in report["rows"]}
        if not set(STEPS) <= by_step.keys():
            raise ValueError(f"{run} was evaluated after 0 to {max(by_step)} steps; the table needs 1, 5 and 10")
        seeds.append(cfg.seed)
        for s in STEPS:
            means[s].append(by_step[s]["mean"])
        last = by_step[10]
        counts.append(f"{last.get('exploded', '-')} / {last['diverged']}")
        learned = cfg.algorithm.name == "metasgd" or cfg.algorithm.lslr
        protocols.add((report["split"], report["shots"], report["episodes"], "learned" if learned else report["lr"]))
        family = "maml" if cfg.algorithm.name in ("maml", "fomaml", "metasgd", "anil") else cfg.algorithm.name
    paper = PAPER.get(family)
    text = (f"| {label} | {', '.join(map(str, seeds))} | " + " | ".join(cell(means[s]) for s in STEPS)
            + f" | {', '.join(counts)} | " + (" / ".join(f"{p:g}" for p in paper) if paper else "-") + " |")
    return text, protocols


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", nargs="+", action="append", required=True, metavar="LABEL RUN",
                        help="a row's label, then its runs (folders or summary JSON files), one per seed")
    args = parser.parse_args(argv)
    lines, protocols = [], set()
    for label, *runs in args.row:
        if not runs:
            parser.error(f"--row {label!r} names no runs")
        try:
            text, scored = row(label, [Path(r) for r in runs])
        except ValueError as err:
            parser.error(str(err))
        lines.append(text)
        protocols |= scored
    tasks = {p[:3] for p in protocols}
    rates = {p[3] for p in protocols} - {"learned"}
    if len(tasks) > 1 or len(rates) > 1:
        parser.error(f"the runs were scored under different protocols (split, shots, tasks, test-time rate): "
                     f"{sorted(map(str, protocols))}")
    print("| method | seeds | MSE after 1 step | after 5 steps | after 10 steps "
          "| exploded / diverged after 10, per seed | the paper, 1 / 5 / 10 |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
