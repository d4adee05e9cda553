"""Errors the runtime raises for the user to read (the CLI prints them as one line)."""

from metadist.errors import UserError


class TrainingDiverged(UserError, RuntimeError):
    """The meta-gradient became NaN or infinite."""


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot be reached or cannot host the workers asked for."""
