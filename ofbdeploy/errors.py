"""Error types and the exit-code contract: the one place that says which failure exits with which code.

Every command of the CLI ends through :func:`exit_code_of`, so a bug can never look like a missed budget
and a missed budget can never look like a bug:

====  ======================================================================================
code  meaning
====  ======================================================================================
0     ok: everything asked was done (measured, exported, checked)
1     a budget or regression limit was missed (:class:`LimitMissed`), and nothing else
2     bad input or usage (any other :class:`OfbError`; click's own usage errors), one line
3     an unexpected internal error: one line plus where the full traceback was written
130   interrupted (Ctrl-C, or SIGTERM as torchrun sends it to its workers)
====  ======================================================================================
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    LIMIT_MISSED = 1
    BAD_INPUT = 2
    INTERNAL = 3
    INTERRUPTED = 130


EXIT_CODE_HELP = (
    "Exit codes: 0 ok; 1 a budget or regression limit missed; 2 bad input or usage (one line naming the "
    "field, file or option); 3 internal error (one line and where the traceback was written); 130 interrupted."
)


class OfbError(Exception):
    """Base for every error ofbdeploy raises on purpose: bad input or usage unless a subclass says otherwise.

    The message is kept to one bounded line whatever went into it (file names, user values).
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0], 600),)
        super().__init__(*args)


class LimitMissed(OfbError):
    """A budget or regression limit was measured and missed (the only cause of exit code 1)."""

    exit_code = ExitCode.LIMIT_MISSED


class InputError(OfbError, ValueError):
    """A file, option or path given by the user that cannot be used as it is."""


class RunDirError(OfbError):
    """A run directory that is busy, unfinished, or whose artifacts do not match its records."""


class CheckpointError(OfbError, ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


class ModelError(OfbError, ValueError):
    """A model name is unknown or does not build a timm VisionTransformer."""


class ArchError(OfbError, ValueError):
    """An architecture record (arch.json) or a pruning request that is inconsistent."""


# OS errors that say a path the user gave cannot be used as given (not a bug of ofbdeploy): bad input.
_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                          errno.ELOOP, errno.EROFS, errno.ENXIO})


def is_path_error(error: BaseException) -> bool:
    """An OSError about a named path the caller chose (a name too long, no permission, not a directory, ...)."""
    return isinstance(error, OSError) and error.filename is not None and error.errno in _PATH_ERRNOS


def exit_code_of(error: BaseException) -> ExitCode:
    """The contract above, as a function: what a command that ended with ``error`` exits with."""
    if isinstance(error, OfbError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if is_path_error(error):
        return ExitCode.BAD_INPUT
    return ExitCode.INTERNAL


def note_traceback(error: BaseException, path: str) -> None:
    """Record that ``error``'s full traceback was written to ``path`` (the run log), for the one-line report."""
    error.ofbdeploy_traceback = path  # type: ignore[attr-defined]


def traceback_note(error: BaseException) -> str | None:
    return getattr(error, "ofbdeploy_traceback", None)


def one_line(text: str, limit: int = 400) -> str:
    """``text`` as a single bounded line: error messages never spill a traceback or echo a huge input."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
