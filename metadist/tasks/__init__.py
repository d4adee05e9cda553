"""Task families. Each yields `Episode` batches that are pure functions of their seeds."""

from metadist.tasks.episode import Episode
from metadist.tasks.noise import NoiseImageTasks
from metadist.tasks.sinusoid import SinusoidTasks

__all__ = ["Episode", "NoiseImageTasks", "SinusoidTasks", "build_tasks"]


def build_tasks(cfg):
    """The task source for `cfg.task.family`."""
    if cfg.task.family == "sinusoid":
        return SinusoidTasks.from_config(cfg)
    if cfg.task.family == "noise":
        return NoiseImageTasks.from_config(cfg)
    raise NotImplementedError(
        "task.family=fewshot needs the WebDataset episode reader, which is not built yet; "
        "use task.family=sinusoid")
