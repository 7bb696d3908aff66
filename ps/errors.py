"""Domain errors of the PS core. The server maps each to one gRPC status code in one place."""


class EmbpsError(Exception):
    """Base class of embps domain errors."""


class UnknownTableError(EmbpsError, KeyError):
    """A request named a table this process does not hold (gRPC NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CapacityError(EmbpsError):
    """A table is full and has no eviction policy (gRPC RESOURCE_EXHAUSTED)."""


class WrongShardError(EmbpsError):
    """Keys were sent to a shard that does not own them (gRPC FAILED_PRECONDITION)."""


class LogGapError(EmbpsError):
    """A subscriber asked for versions the update log no longer (or never) held (gRPC
    FAILED_PRECONDITION); it must resync from a full copy."""


class NotPrimaryError(EmbpsError):
    """This process may not answer client calls now: it is a shard's standby, was deposed, or waits
    for its standby or its lease (gRPC UNAVAILABLE: the client tries the other address of the pair)."""


class ConfigTypeError(TypeError, ValueError):
    """A field of a job's TOML (or a flag) of the wrong type or shape; the message names the field.

    A TypeError, as Python would raise it, and a ValueError because every command ends with one
    line on a ValueError (embps.py `cli`): a value of the wrong type is a bad value of that field."""
