"""Error types shared by the engine and both faces.

Every error says what was expected, what was found and where (file, key, tensor, node).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    INTERRUPT = 130


class TdpuError(Exception):
    """Base class of errors that are reported to the user as they are (no traceback)."""


class ConfigError(TdpuError):
    """A configuration problem: exit status 2. Names the file and the key."""

    def __init__(self, message: str, *, file: object = None, key: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if key:
            where.append(f"key '{key}'")
        self.file = file
        self.key = key
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class CheckpointError(TdpuError):
    """A checkpoint that cannot be read as BitNet b1.58 (names the file and the tensor)."""


class GraphError(TdpuError):
    """An ONNX graph (or its external data, or a selection file over it) that cannot be read
    or rewritten; the message names the file and the node or tensor."""


class StageFailed(TdpuError):
    """Raised inside a stage to end it as `failed` with a one-line message."""


class UsageError(StageFailed):
    """A stage failed because of how it was run, not because of the model, the graphs or
    Icraft: a stage run out of order (its input is missing or from an earlier run), a file the
    user named is missing. Reported, never drafted as a bug record."""


class Cancelled(TdpuError):
    """The run was cancelled (Ctrl-C in batch, `c` or quit in the app)."""
