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


class SnapshotWriteRunningError(EmbpsError):
    """A shard refused a snapshot of one step while its files of another step are still being
    written (gRPC FAILED_PRECONDITION; `step`, the step still written, also travels in the reply's
    trailing metadata, wire.WRITING_STEP_METADATA_KEY, for the coordinator to tell this refusal
    from the others). See ps/shard/snapshot_service.py for why it is refused and not waited for."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class NotPrimaryError(EmbpsError):
    """This process may not answer client calls now: it is a shard's standby, was deposed, or waits
    for its standby or its lease (gRPC UNAVAILABLE: the client tries the other address of the pair)."""


class ConfigTypeError(TypeError, ValueError):
    """A field of a job's TOML (or a flag) of the wrong type or shape; the message names the field.

    A TypeError, as Python would raise it, and a ValueError because every command ends with one
    line on a ValueError (embps.py `cli`): a value of the wrong type is a bad value of that field."""
