"""The one base class of the errors a user can fix (a leaf module: every layer may import it).

Each layer raises its own subclass (`ConfigError`, `DataError`, `CheckpointError`, `ClusterError`,
`TrainingDiverged`, `TrackingError`, `SubmitError`), phrased for the user. The CLI turns every
`UserError` of every command into one line on stderr and exit code 2, so a new error class of a new
layer needs no CLI change to get there.
"""


class UserError(Exception):
    """A problem with what the user gave (a file, a key, a cluster, a store), with a message that says it."""
