"""Exceptions raised by memdist: every user-facing check names the value and the rule."""


class MemdistError(Exception):
    """Base class of every error memdist raises on purpose."""


class ConfigError(MemdistError, ValueError):
    """A configuration value breaks a rule (unknown key, wrong type, inconsistent sizes)."""


class ShapeError(MemdistError, ValueError):
    """A tensor has the wrong shape, dtype or device for the operation."""


class IndexOutOfRangeError(MemdistError, IndexError):
    """A row index lies outside the value table."""


class DataError(MemdistError, ValueError):
    """Input data is missing, empty or not in the expected format."""


class CheckpointError(MemdistError):
    """A run folder or checkpoint is missing, incomplete or corrupt."""


class ShardError(MemdistError):
    """A memory shard died, failed or did not answer in time."""


class ShardTimeoutError(ShardError):
    """A memory shard did not answer within ``shards.timeout_s`` (dead, hung or overloaded)."""


class WorkerError(MemdistError):
    """A data-parallel worker failed; the run stopped (no step is left half-applied)."""


class BuildError(MemdistError):
    """A C++ extension could not be built or loaded in time (another build held it too long)."""


class SlowPathWarning(UserWarning):
    """A faster path that was asked for could not be had; memdist goes on with a slower
    one (the same results), and says which and why."""
