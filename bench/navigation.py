"""The MAML paper's 2-D navigation table and figure from finished runs: MAML, the pretrained baseline,
and the random baseline (each MAML run's own initial policy, fine-tuned the same way), against the
figures of the authors' result files.

Each run folder is one `metadist train jobs/rl/{maml,pretrain}-navigation.yaml` run; its `eval.json`
holds its test evaluation. In place of a folder, a summary of `metadist eval <run> --summary-json F`
(a checkpoint scored at another test-time rate, say) gives that evaluation. The random row of a seed is
the evaluation of that run's initial policy (`eval_initial.json` when the run was recorded, else
computed here from its config: the same seed gives the same initial parameters). Prints a markdown
table (mean ± 95% CI over the test goals, per seed, and the median over seeds) and writes the
adaptation curves, with CI bands, to `--out`.

    python bench/navigation.py --maml runs/maml-navigation-A runs/maml-navigation-B \
        --pretrained runs/pretrain-navigation-C pretrain-D-eval.json [--out navigation.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metadist.config import from_dict, read_yaml  # noqa: E402
from metadist.runtime.driver import read_finished_run  # noqa: E402

PAPER = {"MAML": [-40.4, -11.7, -3.3, -3.2], "pretrained": [-40.8, -19.7, -11.7, -8.5],
         "random": [-82.7, -58.0, -53.8, -46.8]}
"""Mean return after 0..3 steps in the authors' result files (cbfinn/maml_rl, icml/icml_point_results_*)."""


def initial_report(run: Path, overrides: list[str] = ()) -> dict:
    """The evaluation of a run's initial policy: recorded beside the run, or computed from its config
    (always when `overrides`, eval.* settings to evaluate it with, are given)."""
    path = run / "eval_initial.json"
    if path.exists() and not overrides:
        return json.loads(path.read_text())
    from metadist.runtime.driver import Trainer

    cfg = from_dict(read_yaml(run / "config.yaml", "run config") | {"tracking": {"enabled": False}}, overrides)
    return Trainer(cfg, run_dir=run).report()


def rows(report: dict) -> list[tuple[float, float]]:
    return [(r["mean"], r["ci95"]) for r in report["rows"]]


def row_label(seed: int, report: dict) -> str:
    """A row's label: the seed, the test-time rate and the trajectories per update."""
    return f"seed {seed}, rate {report['lr']:g}, {report['shots']} trajectories"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maml", nargs="+", type=Path, required=True, help="MAML run folders, one per seed")
    parser.add_argument("--pretrained", nargs="*", type=Path, default=[], help="pretrain run folders")
    parser.add_argument("--out", type=Path, default=Path("navigation.png"), help="the figure's PNG file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                        help="evaluate the random rows with these eval.* settings (repeatable)")
    args = parser.parse_args(argv)
    if any(not o.startswith("eval.") for o in args.overrides):
        parser.error("--set takes eval.* keys only")
    finished = {}  # each run's (config, test evaluation), read once
    for run in [*args.maml, *args.pretrained]:
        try:
            finished[run] = read_finished_run(run)
        except ValueError as err:
            parser.error(str(err))

    results: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {"MAML": [], "pretrained": [], "random": []}
    for run in args.maml:
        cfg, report = finished[run]
        results["MAML"].append((row_label(cfg.seed, report), rows(report)))
        if run.is_dir():  # the random row: this run's initial policy
            initial = initial_report(run, args.overrides)
            results["random"].append((row_label(cfg.seed, initial), rows(initial)))
    for run in args.pretrained:
        cfg, report = finished[run]
        results["pretrained"].append((row_label(cfg.seed, report), rows(report)))

    print("| policy | run | after 0 | after 1 | after 2 | after 3 |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        for label, r in runs:
            print(f"| {name} | {label} | " + " | ".join(f"{m:.1f} ± {c:.1f}" for m, c in r) + " |")
        if len(runs) > 1:
            medians = [statistics.median(r[k][0] for _, r in runs) for k in range(len(runs[0][1]))]
            print(f"| {name} | median of {len(runs)} | " + " | ".join(f"{m:.1f}" for m in medians) + " |")
        if runs:
            print(f"| {name} | authors' result files | " + " | ".join(f"{m:.1f}" for m in PAPER[name]) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, runs), color in zip(results.items(), ("C0", "C1", "C2")):
        for i, (label, r) in enumerate(runs):
            steps = list(range(len(r)))
            means, cis = [m for m, _ in r], [c for _, c in r]
            ax.plot(steps, means, marker="o", color=color, label=name if i == 0 else None)
            ax.fill_between(steps, [m - c for m, c in r], [m + c for m, c in r], color=color, alpha=0.15)
        if runs:
            ax.plot(range(len(PAPER[name])), PAPER[name], ls="--", color=color, alpha=0.7,
                    label=f"{name} (authors' results)")
    ax.set(xlabel="gradient steps at test time", ylabel="mean return per trajectory",
           title="2-D navigation: 40 test goals, 95% CI bands")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
