"""Files in and out: atomic writes with normal modes, bounded and checked reads, content digests, and
output paths checked before any work is done.

A crash mid-write leaves the old file or none, never half a file; a written file gets the mode any other
program would give it (``0666`` less the umask), not the ``0600`` of a private temporary file. Every read
of a user-supplied file is bounded in size and decoded strictly, so a wrong file is one clear error.

Writes never follow a symlink at the file's own path: an atomic write renames over it (the link is replaced,
its target untouched), and a file opened in place (a log, a lock) is opened with ``O_NOFOLLOW``, so a link
planted in a run directory cannot send the run's writes elsewhere. Devices, FIFOs and sockets are neither
written nor read: a file is opened without blocking and checked before use, so a FIFO cannot hang a command.
Every OS error on a path becomes one line naming the path and the reason (exit 2).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ofbdeploy.errors import InputError

_CHUNK = 1 << 20
MAX_JSON_BYTES = 64 << 20  # arch.json, baselines, reports and latency tables are far smaller


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (no window for other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str | None:
    """What a special file is, for the message; None for a regular file or a directory."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def refuse_special(path: str | Path, what: str) -> None:
    """Refuse a device, FIFO or socket at ``path`` (or behind a symlink there) as one line; anything else passes."""
    for look in (os.lstat, os.stat):
        try:
            kind = _kind(look(path).st_mode)
        except (OSError, ValueError):  # missing, a dangling link, a NUL byte: the caller's own checks say so
            continue
        if kind is not None:
            raise InputError(f"{what}: {path} is {kind}; expected a regular file")


def open_fd(path: str | Path, flags: int, what: str, *, follow: bool = True, mode: int = 0o666) -> int:
    """``os.open`` for a regular file that never blocks on a FIFO and never touches a device: anything but a
    regular file is refused before opening it (stat) and after (fstat of a non-blocking open, so a swap in
    between is caught too), and every OS error is one line with the path and the reason. ``follow=False``
    refuses a symlink at ``path`` itself (for writes inside a run directory)."""
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    refuse_special(path, what)  # opening some devices acts on them (a watchdog, a tape): never get that far
    try:
        fd = os.open(path, flags, mode)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise InputError(f"{what} not found: {path}") from None
        if err.errno == errno.ELOOP and not follow:
            raise InputError(f"{what}: {path} is a symbolic link; refusing to write through it") from None
        raise InputError(f"{what}: cannot open it ({_reason(err)}): {path}") from None
    except ValueError as err:  # a NUL byte in the path
        raise InputError(f"{what}: cannot open it ({err}): {path!r}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _kind(info.st_mode) or "a directory"
        raise InputError(f"{what}: {path} is {kind}; expected a regular file")
    os.set_blocking(fd, True)
    return fd


def open_append(path: str | Path, what: str) -> IO[str]:
    """A text file opened for appending (created if missing) without following a symlink at ``path``."""
    fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, what, follow=False)
    return os.fdopen(fd, "a", encoding="utf-8")


class AppendLogHandler(logging.FileHandler):
    """``logging.FileHandler`` whose file is opened by :func:`open_append`: a run's log never leaves the run."""

    def __init__(self, path: str | Path, what: str = "log file") -> None:
        self._what = what
        super().__init__(path, mode="a", encoding="utf-8")

    def _open(self) -> IO[str]:
        return open_append(self.baseFilename, self._what)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, then rename it into place.

    The rename replaces a symlink at ``path`` rather than writing through it; a device, FIFO or socket there is
    refused. An OS error (no permission, disk full, a name too long) is one line naming ``path``.
    """
    path = Path(path)
    refuse_special(path, str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(f"cannot write ({_reason(err)}): {path}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"cannot write ({_reason(err)}): {path}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def is_temporary(path: Path) -> bool:
    """A leftover of :func:`atomic_write` (a process killed mid-write)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (hex), read in chunks; a special file is refused rather than read."""
    h = hashlib.sha256()
    with os.fdopen(open_fd(path, os.O_RDONLY, "file"), "rb") as f:
        try:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        except OSError as err:
            raise InputError(f"cannot read it ({_reason(err)}): {path}") from None
    return h.hexdigest()


def read_text(path: str | Path, what: str, max_bytes: int) -> str:
    """A user-supplied text file, refused with one line when missing, special, too large, unreadable or not
    UTF-8."""
    path = Path(path)
    with os.fdopen(open_fd(path, os.O_RDONLY, what), "rb") as f:
        try:
            raw = f.read(max_bytes + 1)  # bounded even where the size on record lies (/proc, a growing file)
        except OSError as err:
            raise InputError(f"{what}: cannot read it ({_reason(err)}): {path}") from None
    if len(raw) > max_bytes:
        raise InputError(f"{path}: too large (more than {max_bytes} bytes for {what})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                         f"expected {what}") from None


def read_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from a user-supplied file; anything else is one clear error naming the file."""
    text = read_text(path, what, max_bytes)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({what}: {err.msg} at line {err.lineno} column "
                         f"{err.colno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply ({what})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def check_output_dir(path: str | Path, what: str) -> Path:
    """Make sure ``path`` is (or can become) a directory this process can write into, before any work."""
    path = Path(path)
    try:
        is_other = path.exists() and not path.is_dir()
        if not is_other:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".ofbdeploy-write-check.", suffix=".tmp", dir=path)
            os.close(fd)
            os.unlink(probe)
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise InputError(f"{what}: cannot write there ({getattr(err, 'strerror', None) or err}): {path}") from None
    if is_other:
        raise InputError(f"{what}: {path} is {_kind(path.stat().st_mode) or 'a file'}; expected a directory")
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """Make sure a file can be written at ``path`` (its directory is writable; it is not a directory)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError(f"{what}: {path} is a directory; expected a file path")
    except OSError as err:  # a name too long, a path through a file
        raise InputError(f"{what}: cannot write there ({_reason(err)}): {path}") from None
    refuse_special(path, what)
    check_output_dir(path.parent, what)
    return path
