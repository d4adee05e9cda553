"""Errors the runtime raises for the user to read (the CLI prints them as one line)."""


class TrainingDiverged(RuntimeError):
    """The meta-gradient became NaN or infinite."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot host the workers asked for."""
