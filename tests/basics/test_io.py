"""Files in and out: no write through a symlink, no special file written or read, every OS error one line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ofbdeploy.errors import InputError
from ofbdeploy.io import (
    AppendLogHandler,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    file_digest,
    read_json,
    read_text,
)
from ofbdeploy.run.rundir import RunLock

ROOT = Path(__file__).parents[2]
LONG = "x" * 300  # longer than any file-system name (255 bytes)


@contextlib.contextmanager
def _no_hang(seconds: int = 10) -> Iterator[None]:
    """Fail instead of blocking forever (a FIFO opened for reading without a writer blocks)."""
    def fail(*_: object) -> None:
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside the run directory that a planted symlink points at."""
    path = tmp_path / "outside.txt"
    path.write_text("precious\n")
    return path


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


# -- symlinks ---------------------------------------------------------------------------------------------------------
def test_an_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path, outside):
    link = tmp_path / "run" / "report.json"
    link.parent.mkdir()
    link.symlink_to(outside)
    atomic_write_text(link, "{}\n")
    assert not link.is_symlink() and link.read_text() == "{}\n" and outside.read_text() == "precious\n"


def test_the_run_log_is_not_appended_through_a_symlink(tmp_path, outside):
    log = tmp_path / "run.log"
    log.symlink_to(outside)
    with pytest.raises(InputError, match=r"run log: .*run\.log is a symbolic link; refusing to write through it"):
        AppendLogHandler(log, "run log")
    assert outside.read_text() == "precious\n"
    log.unlink()
    handler = AppendLogHandler(log, "run log")
    try:
        handler.emit(logging.makeLogRecord({"msg": "hello", "levelno": logging.INFO}))
    finally:
        handler.close()
    assert log.read_text() == "hello\n"


def test_the_lock_file_is_not_created_or_truncated_through_a_symlink(tmp_path, outside):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(outside)
    with pytest.raises(InputError, match="is a symbolic link"):
        RunLock(run).acquire()
    assert outside.read_text() == "precious\n"
    assert RunLock.holder(run) is None


# -- special files ----------------------------------------------------------------------------------------------------
def test_special_files_are_refused_as_outputs(tmp_path, fifo):
    for path in (Path("/dev/null"), fifo):
        with pytest.raises(InputError, match=r"is a (character device|FIFO); expected a regular file"):
            check_output_file(path, "--write-baseline")
    with pytest.raises(InputError, match="is a FIFO; expected a regular file"):
        atomic_write_text(fifo, "x")
    assert fifo.exists() and not fifo.is_file()  # still the FIFO, not replaced by a file
    (tmp_path / "dev").symlink_to("/dev/null")
    with pytest.raises(InputError, match="is a character device"):
        check_output_file(tmp_path / "dev", "--write-baseline")
    with pytest.raises(InputError, match="is a FIFO; expected a directory"):
        check_output_dir(fifo, "--cache-dir")


def test_a_fifo_is_refused_without_blocking_where_a_file_is_read(tmp_path, fifo):
    with _no_hang():
        with pytest.raises(InputError, match="is a FIFO; expected a regular file"):
            read_text(fifo, "recipe", 1000)
        with pytest.raises(InputError, match="is a FIFO"):
            read_json(fifo, "baseline")
        with pytest.raises(InputError, match="is a FIFO"):
            file_digest(fifo)
        run = tmp_path / "run"
        run.mkdir()
        os.mkfifo(run / "run.lock")
        assert RunLock.holder(run) is None
    with pytest.raises(InputError, match="is a directory; expected a regular file"):
        read_text(tmp_path, "recipe", 1000)


# -- OS errors --------------------------------------------------------------------------------------------------------
def test_os_errors_on_a_path_are_one_line_naming_it(tmp_path):
    long = tmp_path / LONG
    for call in (lambda: read_text(long, "recipe", 1000), lambda: atomic_write_text(long, "x"),
                 lambda: check_output_dir(long / "d", "--cache-dir"), lambda: file_digest(long)):
        with pytest.raises(InputError, match="File name too long") as err:
            call()
        assert LONG in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"--write-baseline: cannot write there \(File name too long\)"):
        check_output_file(long, "--write-baseline")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"cannot write \(Not a directory\): .*file/below/out\.json"):
        atomic_write_text(tmp_path / "file" / "below" / "out.json", "x")
    with pytest.raises(InputError, match="recipe not found: "):
        read_text(tmp_path / "missing.yaml", "recipe", 1000)
    with pytest.raises(InputError, match=r"too large \(more than 0 bytes"):
        read_text(tmp_path / "file", "recipe", 0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_permission_denied_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "r.yaml").write_text("name: x\n")
    locked.chmod(0)
    try:
        with pytest.raises(InputError, match="Permission denied"):
            read_text(locked / "r.yaml", "recipe", 1000)
        with pytest.raises(InputError, match="Permission denied"):
            atomic_write_text(locked / "out.json", "x")
    finally:
        locked.chmod(0o755)


# -- through the CLI --------------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ofbdeploy", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return [line for line in proc.stderr.splitlines() if line.strip()][-1]


def test_a_run_refuses_a_planted_run_log_link_and_a_fifo_recipe(tmp_path, outside, tiny_recipe):
    """A rerun whose run.log is a link out of the run writes nothing there; a FIFO recipe does not hang."""
    tiny_recipe("io", limit_train=32)
    first = _cli("run", str(tmp_path / "r.yaml"), "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    (run / "metrics.json").unlink()  # so that the rerun has a stage to run
    (run / "run.log").unlink()
    (run / "run.log").symlink_to(outside)
    again = _cli("run", str(tmp_path / "r.yaml"), "--no-progress")
    assert again.returncode == 2 and "run.log is a symbolic link" in _last_line(again), again.stderr[-2000:]
    assert "Traceback" not in again.stderr and outside.read_text() == "precious\n"
    assert json.loads((run / "stages.json").read_text())["stages"]  # the run's records are still there
    os.mkfifo(tmp_path / "fifo.yaml")
    refused = _cli("run", str(tmp_path / "fifo.yaml"))
    assert refused.returncode == 2 and _last_line(refused).endswith("is a FIFO; expected a regular file")
