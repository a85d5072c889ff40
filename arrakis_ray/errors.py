"""Errors raised at the project's boundaries.

Every error a user can cause (bad config, bad data, unknown hook, bad SQL, a path that
is not a store) is an ``ArrakisError``: the CLI prints its message alone, without a
traceback, and exits non-zero. The message names what is wrong and where.
"""


class ArrakisError(Exception):
    """Base class of every user-facing error."""


class ConfigError(ArrakisError):
    """A pipeline file or a parameter is invalid (the message names the field)."""


class UnknownHookError(ArrakisError):
    """A hook name or pattern matches no hook point of the model."""


class ModelLoadError(ArrakisError):
    """A model could not be built or loaded (missing path, unknown architecture)."""


class DataError(ArrakisError):
    """Input data is missing, unreadable or lacks a required column."""


class StoreError(ArrakisError):
    """A store path is not a store, a run is missing, or a stored file is corrupt."""


class SchemaError(StoreError):
    """A stored table does not match the schema (or schema version) its reader expects."""


class QueryError(ArrakisError):
    """A SQL query is invalid or not allowed on the read-only query surface."""


class ToolError(ArrakisError):
    """An analysis tool is unknown, misconfigured, or lacks the inputs it needs."""


class ReportError(ArrakisError):
    """A report could not be written or rendered (bad chart spec, no browser, PNG export)."""


class HarvestError(ArrakisError):
    """A shard failed while being harvested (the message names the shard and the cause)."""


class RemoteTaskError(ArrakisError):
    """A Ray task failed with an exception that is not an ArrakisError (a bug, or a
    killed worker); the message names the task and the exception, the log file holds
    the traceback (``ray_session.log_file``)."""


class ClusterError(ArrakisError):
    """Ray could not be started, or the cluster at ``RAY_ADDRESS`` could not be reached."""
