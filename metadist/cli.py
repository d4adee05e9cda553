"""The `metadist` command: train, tune, eval, submit, config and data.

Every user-facing failure (a bad config key, a missing checkpoint, a diverged run) ends as one line on
stderr and exit code 2, never a traceback: each layer raises a `metadist.errors.UserError`, and the one
handler in `_Commands.invoke` prints it, for every command.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional, get_args, get_type_hints

import typer
from rich.console import Console
from typer.core import TyperGroup

from metadist.config import RuntimeConfig, dump_config, field_docs, load_config
from metadist.errors import UserError

err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    # Not wrapped to the console's width: one line, whose paths and commands copy whole.
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _Commands(TyperGroup):
    """The command group: a UserError from any command (sub-commands included) is one line, exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail(str(e))


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Distributed meta-learning: MAML, FOMAML, Reptile, ANIL, Meta-SGD, MAML++.")

SetOpt = typer.Option(None, "--set", help="Override a config key: --set inner.lr=0.05 (repeatable).")
SummaryOpt = typer.Option(None, "--summary-json", help="Write the run summary as JSON to this path.")
# metadist.data.format.SHARD_BYTES in MB; not imported, so the CLI starts without numpy and PIL.
ShardMbOpt = typer.Option(64.0, min=0.001,
                          help="Target shard size in MB (at least as many train shards as workers are needed).")


# The choices of `data convert`: metadist.data.convert's FORMATS and FILTERS and ImageOptions.on_wrong_size,
# written out so the CLI starts without numpy and PIL (a test checks they agree).
class ConvertFormat(str, Enum):
    ravi_csv = "ravi-csv"
    pickle_cache = "pickle-cache"
    folders = "folders"
    torchmeta_hdf5 = "torchmeta-hdf5"
    omniglot = "omniglot"


class OmniglotSplit(str, Enum):  # metadist.data.omniglot.SPLIT_POLICIES
    maml = "maml"
    vinyals = "vinyals"


class ResizeFilter(str, Enum):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"
    lanczos = "lanczos"
    box = "box"


# runtime.executor's values, taken from the config's own type.
Executor = Enum("Executor", {v: v for v in get_args(get_type_hints(RuntimeConfig)["executor"])}, type=str)


class WrongSize(str, Enum):
    resize = "resize"
    error = "error"


def _write_summary(summary: dict, path: Optional[Path]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        err.print(f"summary written to {path}")


@app.command()
def train(job: Optional[Path] = typer.Argument(None, help="Job YAML, e.g. jobs/sine/maml.yaml."),
          set_: Optional[List[str]] = SetOpt, summary_json: Optional[Path] = SummaryOpt,
          resume: Optional[str] = typer.Option(
              None, "--resume", help="Continue a run from its last checkpoint: checkpoint.pt, its run "
                                     "folder, or the run's MLflow run id."),
          executor: Optional[Executor] = typer.Option(
              None, "--executor", help="With --resume: continue on this executor instead of the one that "
                                       "wrote the checkpoint."),
          progress: bool = typer.Option(True, help="Show the progress bar.")):
    """Meta-train a job, evaluate it on the fixed test tasks, and write a checkpoint."""
    from metadist.runtime.driver import Trainer, resume_trainer

    if (job is None) == (resume is None):
        _fail("give a job file, or --resume with a checkpoint, run folder or MLflow run id (not both)")
    if resume is not None and set_:
        _fail("--set cannot change a resumed run: it continues with the config in its checkpoint")
    if executor is not None and resume is None:
        _fail("--executor goes with --resume; a new run takes --set runtime.executor=...")
    if resume is not None:
        trainer = resume_trainer(resume, console=err, executor=executor.value if executor else None)
        err.print(f"resuming {trainer.run_dir} at step {trainer.step}")
    else:
        cfg = load_config(job, set_ or [])
        trainer = Trainer(cfg, console=err, tracker=_tracker(cfg))
        err.print(f"run folder: {trainer.run_dir}")
    summary = trainer.fit(progress=progress)
    _write_summary(summary, summary_json)
    t = summary["throughput"]
    rate = (f"steady-state {t['tasks_per_s']:.0f} tasks/s" if t["steps_timed"] else
            f"steady-state rate not measured (no step after train.warmup_steps={trainer.cfg.train.warmup_steps})")
    err.print(f"checkpoint: {summary['checkpoint']}   {rate} ({t['task_parallel']})")
    if trainer.tracker is not None:
        from metadist.tracking import review_links

        tracker = trainer.tracker
        err.print(f"MLflow run {tracker.run_id} in {tracker.uri}")
        local = not tracker.uri.startswith("http")
        if local:
            err.print(f"look at it with:  mlflow ui --backend-store-uri {tracker.uri} --host 127.0.0.1 --port 5000",
                      highlight=False, soft_wrap=True)
        for link in review_links(tracker.experiment_id, tracker.run_id,
                                 **({} if local else {"ui": tracker.uri.rstrip("/")})):
            err.print(f"  {link}", highlight=False, soft_wrap=True)


def _tracker(cfg):
    if not cfg.tracking.enabled:
        return None
    from metadist.tracking import Tracker
    return Tracker(cfg)  # asks the store at once: a bad URI fails before a run folder is made


@app.command()
def tune(sweep: Optional[Path] = typer.Argument(None, help="Sweep YAML, e.g. jobs/sweeps/sine-debug.yaml."),
         set_: Optional[List[str]] = typer.Option(
             None, "--set", help="Override a sweep key (samples=4, scheduler.name=none, "
                                 "'space.inner.lr={loguniform: [0.01, 0.1]}') or a base-job key (train.steps=500)."),
         resume: Optional[Path] = typer.Option(None, "--resume", help="Go on with an interrupted sweep: its folder.")):
    """Sweep a job's config with Ray Tune: every trial a distributed run, MLflow parent and child runs."""
    if (sweep is None) == (resume is None):
        _fail("give a sweep file, or --resume with the sweep folder (not both)")
    if resume is not None and set_:
        _fail("--set cannot change a resumed sweep: it goes on with the settings it started with")
    from metadist.sweeps.plan import load_sweep, plan_sweep, read_state

    # A bad sweep file or folder is one line before Ray and Tune are imported (about 9 s).
    state = read_state(resume) if resume is not None else None
    plan = plan_sweep(load_sweep(sweep, set_ or []), sweep) if sweep is not None else None
    from metadist.sweeps import driver

    driver.install_sigterm_as_interrupt()
    try:
        if resume is not None:
            driver.resume(resume, state, console=err)
        else:
            driver.start(plan, sweep, console=err)
    except driver.SweepInterrupted as e:
        err.print(f"[yellow]{e}[/]", highlight=False, soft_wrap=True)  # one line: the command is copied
        raise typer.Exit(130)
    except KeyboardInterrupt:  # before Tune took over Ctrl-C: nothing ran yet that needs resuming
        _fail("interrupted while starting the sweep", code=130)


@app.command()
def submit(job: Path = typer.Argument(..., help="Job or sweep YAML, e.g. jobs/sine/maml-debug.yaml."),
           address: str = typer.Option("http://127.0.0.1:8265", help="The cluster's dashboard / job server."),
           set_: Optional[List[str]] = SetOpt,
           wait: bool = typer.Option(True, help="Stream the logs and wait for the job to end."),
           working_dir: Path = typer.Option(Path("."), help="Uploaded as the job's working directory "
                                                           "(metadist sources and jobs/)."),
           tracking_uri: Optional[str] = typer.Option(
               None, help="MLflow store the job records to, over the cluster's own MLFLOW_TRACKING_URI. "
                          "Default: the cluster's, else this machine's.")):
    """Submit a job (or a sweep) to a Ray cluster through its job server; exit with the job's status."""
    from metadist.runtime.submit import submit_job
    from metadist.sweeps.plan import is_sweep_file, load_sweep, plan_sweep

    # A config error is reported here, not minutes later on the cluster.
    sweep = is_sweep_file(job)
    if sweep:
        plan_sweep(load_sweep(job, set_ or []), job)
    else:
        load_config(job, set_ or [])
    code = submit_job(job, address, set_ or [], wait=wait, working_dir=working_dir, console=err,
                      forced_tracking_uri=tracking_uri, sweep=sweep)
    raise typer.Exit(code)


@app.command("eval")
def eval_(checkpoint: Path = typer.Argument(..., help="checkpoint.pt or its run folder."),
          episodes: Optional[int] = typer.Option(None, min=1, help="Test tasks (default: eval.episodes)."),
          steps: Optional[int] = typer.Option(None, min=0, help="Test-time steps (default: eval.steps)."),
          set_: Optional[List[str]] = typer.Option(
              None, "--set", help="Change an eval.* key of the run's config for this evaluation: --set eval.lr=0.02, "
                                  "--set eval.split=val (repeatable)."),
          summary_json: Optional[Path] = SummaryOpt):
    """Evaluate a checkpoint on its config's fixed test tasks."""
    from metadist.runtime.driver import evaluate_checkpoint

    summary = evaluate_checkpoint(checkpoint, episodes=episodes, steps=steps, console=err, overrides=set_ or [])
    _write_summary(summary, summary_json)


@app.command()
def config(job: Path = typer.Argument(..., help="Job YAML."), set_: Optional[List[str]] = SetOpt,
           keys: bool = typer.Option(False, "--keys", help="List every key with its meaning instead.")):
    """Print the resolved config of a job (after overrides), or every key with its docstring."""
    if keys:
        for key, doc in field_docs().items():
            typer.echo(f"{key}: {' '.join(doc.split())}")
        return
    typer.echo(dump_config(load_config(job, set_ or [])), nl=False)


data_app = typer.Typer(no_args_is_help=True, help="Few-shot datasets: write, convert and check shards.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(out: Path = typer.Argument(..., help="Directory to write the shards and manifest into."),
               per_class: int = typer.Option(600, min=1, help="Images per class."),
               size: int = typer.Option(84, min=8, help="Image side in pixels."),
               seed: int = typer.Option(0, help="Seed of the class prototypes and augmentations."),
               channels: int = typer.Option(3, min=1, max=3, help="3 (RGB, JPEG) or 1 (grayscale, PNG, the Omniglot debug jobs' data)."),
               classes: Optional[str] = typer.Option(None, help="Classes per split as TRAIN,VAL,TEST (default 64,16,20; 20-way jobs need 20 in each)."),
               shard_mb: float = ShardMbOpt,
               workers: int = typer.Option(1, min=1, help="Encoding processes.")):
    """Write a synthetic dataset in the mini-ImageNet layout (64 / 16 / 20 learnable classes)."""
    from rich.progress import Progress

    from metadist.data.manifest import Manifest
    from metadist.data.synth import synth_dataset

    if (out / "manifest.parquet").exists():
        _fail(f"{out} already holds a dataset (manifest.parquet); choose an empty directory")
    if channels == 2:
        _fail("--channels: 1 (grayscale) or 3 (RGB)")
    counts = None
    if classes is not None:
        parts = classes.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            _fail(f"--classes {classes!r}: expected three positive counts TRAIN,VAL,TEST, such as 40,20,20")
        counts = dict(zip(("train", "val", "test"), map(int, parts)))
    with Progress(console=err) as progress:
        synth_dataset(out, per_class=per_class, size=size, seed=seed, workers=workers,
                      shard_bytes=shard_mb * 1e6, progress=progress, classes=counts,
                      fmt="png" if channels == 1 else "jpg", channels=channels)
    _print_counts(Manifest(out))


@data_app.command("convert")
def data_convert(src: Path = typer.Argument(..., help="The files you have (see --format)."),
                 out: Path = typer.Argument(..., help="Directory to write the shards and manifest into."),
                 format_: ConvertFormat = typer.Option(..., "--format", help="ravi-csv, pickle-cache, folders, torchmeta-hdf5 or omniglot."),
                 size: Optional[int] = typer.Option(None, min=8, help="Image side in pixels after resizing (default: 84; omniglot 28)."),
                 filter_: Optional[ResizeFilter] = typer.Option(None, "--filter", help="Resize filter: nearest, bilinear, bicubic, lanczos, box (default: bilinear; omniglot lanczos, the MAML reference code's)."),
                 grayscale: bool = typer.Option(False, help="Store single-channel images."),
                 on_wrong_size: WrongSize = typer.Option(WrongSize.resize, help="Images not size×size: 'resize' or 'error' (skip and count)."),
                 min_per_class: int = typer.Option(20, help="Report classes with fewer images than this."),
                 shard_mb: float = ShardMbOpt,
                 workers: int = typer.Option(1, min=1, help="Encoding processes."),
                 seed: int = typer.Option(0, help="Seed of the sample order within each split."),
                 split: OmniglotSplit = typer.Option(OmniglotSplit.maml, help="omniglot: 'maml' (1,100 / 100 / 423 shuffled characters, the MAML reference code's) or 'vinyals' (background alphabets train, evaluation test)."),
                 split_seed: int = typer.Option(1, help="omniglot: seed of the character shuffle (1: the MAML reference code's).")):
    """Convert mini-ImageNet-style or Omniglot files into WebDataset shards with a Parquet manifest."""
    from rich.progress import Progress

    from metadist.data.convert import ImageOptions, convert
    from metadist.data.manifest import Manifest
    from metadist.data.writer import check_counts

    with Progress(console=err) as progress:
        omniglot = format_ is ConvertFormat.omniglot
        size = size or (28 if omniglot else 84)
        filter_name = filter_.value if filter_ else ("lanczos" if omniglot else "bilinear")
        reports = convert(format_.value, src, out,
                          opts=ImageOptions(size, filter_name, grayscale, on_wrong_size.value),
                          shard_bytes=shard_mb * 1e6, workers=workers, seed=seed, progress=progress,
                          log=lambda m: err.print(m, highlight=False), split=split.value, split_seed=split_seed)
    for line in check_counts(reports, min_per_class):
        err.print(f"[yellow]note:[/] {line}", highlight=False)
    _print_counts(Manifest(out))


@data_app.command("verify")
def data_verify(path: str = typer.Argument(..., help="Dataset directory or URL."),
                hash_: bool = typer.Option(True, "--hash/--size-only", help="Check content hashes too.")):
    """Check every shard against the manifest (sizes, and content hashes unless --size-only)."""
    from metadist.data.manifest import Manifest

    m = Manifest(path)
    m.verify("hash" if hash_ else "size")
    _print_counts(m)
    err.print(f"{len(m.shards['shard'])} shards match the manifest")


def _print_counts(manifest) -> None:
    from rich.table import Table

    from metadist.config import SPLITS
    from metadist.data.format import DataError

    table = Table(title=f"{manifest.root}: {manifest.image_size} px, {manifest.channels} channel(s)")
    for col in ("split", "classes", "images", "min / max per class", "shards"):
        table.add_column(col, justify="right")
    for split in SPLITS:
        try:
            counts = manifest.class_counts(split)
        except DataError:  # a dataset without this split
            continue
        table.add_row(split, str(len(counts)), str(sum(counts.values())),
                      f"{min(counts.values())} / {max(counts.values())}", str(len(manifest.split_shards(split))))
    err.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
