"""Files in and out: atomic writes with normal modes, bounded and checked reads, content digests, and
output paths checked before any work is done.

A crash mid-write leaves the old file or none, never half a file; a written file gets the mode any other
program would give it (``0666`` less the umask), not the ``0600`` of a private temporary file. Every read
of a user-supplied file is bounded in size and decoded strictly, so a wrong file is one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    """SHA-256 of a file's content (hex), read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: str | Path, what: str, max_bytes: int) -> str:
    """A user-supplied text file, refused with one line when missing, too large or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}" if not path.exists() else f"{path}: not a file ({what})")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"{path}: too large ({size} bytes; at most {max_bytes} for {what})")
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror or err}; {what})") from None
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
    if path.exists() and not path.is_dir():
        raise InputError(f"{what}: {path} is a file; expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ofbdeploy-write-check.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise InputError(f"{what}: cannot write to {path} ({getattr(err, 'strerror', None) or err})") from None
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """Make sure a file can be written at ``path`` (its directory is writable; it is not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what}: {path} is a directory; expected a file path")
    check_output_dir(path.parent, what)
    return path
