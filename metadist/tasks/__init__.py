"""Task families. Each yields `Episode` batches that are pure functions of their seeds."""

from metadist.tasks.noise import NoiseImageTasks
from metadist.tasks.sinusoid import SinusoidTasks

__all__ = ["NoiseImageTasks", "SinusoidTasks", "build_tasks"]


def build_tasks(cfg, rank: int = 0, world: int = 1):
    """The task source for `cfg.task.family`; `rank` of `world` workers picks a worker's shards."""
    if cfg.task.family == "sinusoid":
        return SinusoidTasks.from_config(cfg)
    if cfg.task.family == "navigation":
        from metadist.tasks.navigation import NavigationTasks
        return NavigationTasks.from_config(cfg)
    if cfg.task.family == "locomotion":
        from metadist.tasks.locomotion import LocomotionTasks  # gymnasium only when it runs
        return LocomotionTasks.from_config(cfg)
    if cfg.task.family == "noise":
        return NoiseImageTasks.from_config(cfg)
    if not cfg.data.path:
        from metadist.config import ConfigError
        raise ConfigError("data.path: task.family=fewshot needs a dataset directory of shards; write one "
                          "with `metadist data synth OUT` or `metadist data convert`")
    from metadist.tasks.fewshot import FewShotTasks  # webdataset and pyarrow only when images are used
    return FewShotTasks.from_config(cfg, rank, world)
