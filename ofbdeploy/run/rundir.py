"""The run directory's bookkeeping, kept apart from the stages that fill it.

- :class:`RunLock`: one writer per run directory. A second run (or export/profile) into a busy directory
  is refused with the holder's pid, host, start time and command; the lock of a process that died (even
  by SIGKILL) is taken over, because the kernel drops an ``flock`` with its holder.
- :class:`StageBook` (``stages.json``): a stage counts as done only while the recipe sections it depends
  on, its inputs (checkpoint content, data identity, latency table) and its own artifacts (size and
  SHA-256 of every file it wrote) are what was recorded when it finished. Anything else names the reason,
  and that stage and every later one run again.
- :func:`resume_plan`: whether a stopped stage's epoch checkpoint may be continued under the current
  settings. Each checkpoint has a settings record beside it; ``--resume`` continues when nothing changed
  or only the epoch count grew past the checkpoint (the schedule is rebuilt), and refuses in one line
  naming the change otherwise.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import pickle
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from ofbdeploy.errors import InputError, RunDirError, one_line
from ofbdeploy.io import atomic_write_text, file_digest, is_temporary, open_fd

log = logging.getLogger("ofbdeploy.run")

LOCK_FILE = "run.lock"
STAGES_FILE = "stages.json"
STAGES_FORMAT = "ofbdeploy.stages/2"
RESUME_FORMAT = "ofbdeploy.resume/1"
# What marks a directory as a run directory (anything else non-empty is refused as an output).
RUN_MARKERS = ("recipe.yaml", STAGES_FILE, LOCK_FILE, "run.log")
T = TypeVar("T")


def to_json(data: Any) -> str:
    """JSON text with non-finite floats written as null (NaN is not JSON; other tools reject it)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=1, default=str, allow_nan=False) + "\n"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A run's JSON artifact, written atomically (see :func:`to_json`)."""
    atomic_write_text(path, to_json(data))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON artifact the run wrote itself (its digest in stages.json vouches for it)."""
    return json.loads(path.read_text())


def digest_of(value: Any) -> str:
    """SHA-256 of a JSON-able value (a recipe section), independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def on_main(ctx: Any, fn: Callable[[], T]) -> T:
    """Run ``fn`` (bookkeeping: locks, records, decisions) on rank 0 only; every rank returns its result
    or raises its error, so under torchrun all processes follow one decision and none waits forever."""
    if not ctx.enabled:
        return fn()
    import torch.distributed as dist

    outcome: tuple[bool, Any] = (True, None)
    if ctx.is_main:
        try:
            outcome = (True, fn())
        except BaseException as err:  # handed to every rank, then raised everywhere
            try:
                pickle.dumps(err)
            except Exception:
                err = RuntimeError(one_line(f"{type(err).__name__}: {err}"))
            outcome = (False, err)
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


# -- the directory itself ---------------------------------------------------------------------------
def check_run_dir(root: Path) -> None:
    """Refuse an output that is a file, below a file, or a non-empty directory that is not a run directory
    (a typo such as ``--output ~`` must not scatter artifacts through someone's files)."""
    if root.exists() and not root.is_dir():
        raise RunDirError(f"output directory: {root} is a file; expected a run directory")
    parent = root
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"output directory: {root} cannot be created ({parent} is a file)")
    try:
        foreign = root.is_dir() and any(not is_temporary(p) for p in root.iterdir()) \
            and not any((root / m).exists() for m in RUN_MARKERS)
    except OSError as err:
        raise RunDirError(f"output directory: cannot read {root} ({err.strerror or err})") from None
    if foreign:
        raise RunDirError(f"output directory: {root} is a non-empty directory that is not an ofbdeploy run "
                          f"directory; choose a new or empty one")


def remove_leftovers(root: Path) -> list[Path]:
    """Delete temporary files of writes that a killed process never finished (call with the lock held)."""
    found = [p for p in root.rglob(".*.tmp") if p.is_file() and is_temporary(p)]
    for path in found:
        path.unlink(missing_ok=True)
    return found


# -- the lock ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run directory's lock."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def me(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   one_line(" ".join(["ofbdeploy", *sys.argv[1:]]), 200))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started} ({self.command})"


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
    except (ValueError, KeyError, TypeError, OSError):
        return None


class RunLock:
    """An exclusive ``flock`` on ``<run>/run.lock`` that also records its holder for the error message."""

    def __init__(self, root: Path) -> None:
        self.root, self.path = root, root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = open_fd(self.path, os.O_RDWR | os.O_CREAT, "lock file", follow=False)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                who = holder.describe() if holder else "another process"
                raise RunDirError(f"{self.root}: in use by {who}; wait for it to finish or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its previous holder removed the file between our open and our lock: try again
                os.close(fd)
                continue
            break
        previous = _read_holder(fd)
        if previous is not None:
            log.warning("%s: took over the lock of %s, which is no longer running", self.root, previous.describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(Holder.me())).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def holder(root: Path) -> Holder | None:
        """The live holder of ``root``'s lock, or None; never takes or changes the lock (read-only dirs work)."""
        path = root / LOCK_FILE
        try:
            fd = open_fd(path, os.O_RDONLY, "lock file", follow=False)
        except InputError:  # none, or not a lock this project made (a link, a FIFO): no holder to name
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or Holder(0, "?", "?", "another process")
        finally:
            os.close(fd)
        return None


# -- stages.json ------------------------------------------------------------------------------------
def tree_identity(path: Path) -> str:
    """Identity of a dataset file or folder: every file's relative path, size and modification time (a
    replaced or added image changes it; reading every byte of ImageNet on each run would not be sensible)."""
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        st = file.stat()
        h.update(f"{file.relative_to(path) if file != path else file.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _artifact_files(root: Path, paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not is_temporary(p))
        elif path.is_file():
            files.append(path)
    return files


class StageBook:
    """``stages.json``: per stage, the section digests, input digests and artifacts it finished with."""

    def __init__(self, root: Path) -> None:
        self.root, self.path = root, root / STAGES_FILE

    def load(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        """The records, and why there are none when the file exists but cannot be used."""
        if not self.path.is_file():
            return {}, None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}, f"{STAGES_FILE} is unreadable"
        if not isinstance(data, dict) or data.get("format") != STAGES_FORMAT or not isinstance(data.get("stages"),
                                                                                               dict):
            return {}, f"{STAGES_FILE} was written by an older ofbdeploy (no artifact digests)"
        return {k: v for k, v in data["stages"].items() if isinstance(v, dict)}, None

    def _save(self, stages: dict[str, dict[str, Any]]) -> None:
        atomic_write_text(self.path, to_json({"format": STAGES_FORMAT, "stages": stages}))

    def why_not_done(self, stage: str, sections: dict[str, str], inputs: dict[str, str]) -> str | None:
        """None when ``stage`` is done and intact; else the first reason it must run (for the log)."""
        stages, problem = self.load()
        record = stages.get(stage)
        if record is None:
            return problem or "not run yet"
        old_sections = record.get("sections", {})
        changed = [name for name in sections if old_sections.get(name) != sections[name]]
        changed += [name for name in old_sections if name not in sections]
        if changed:
            return f"recipe changed: {', '.join(changed)}"
        old_inputs = record.get("inputs", {})
        changed = [name for name in set(inputs) | set(old_inputs) if old_inputs.get(name) != inputs.get(name)]
        if changed:
            return f"input changed: {', '.join(sorted(changed))}"
        return self._artifact_problem(record.get("artifacts"))

    def _artifact_problem(self, artifacts: Any) -> str | None:
        if not isinstance(artifacts, dict) or not artifacts:
            return "no artifacts recorded"
        for rel, meta in artifacts.items():
            path = self.root / rel
            if not path.is_file():
                return f"artifact {rel} missing"
            if not isinstance(meta, dict) or path.stat().st_size != meta.get("size"):
                return f"artifact {rel} changed (size)"
            if file_digest(path) != meta.get("sha256"):
                return f"artifact {rel} changed (content)"
        return None

    def record(self, stage: str, sections: dict[str, str], inputs: dict[str, str], artifacts: list[Path]) -> None:
        """Mark ``stage`` done with what it depended on and every file it wrote."""
        stages, _ = self.load()
        files = _artifact_files(self.root, artifacts)
        stages[stage] = {
            "sections": sections,
            "inputs": inputs,
            "artifacts": {str(f.relative_to(self.root)): {"size": f.stat().st_size, "sha256": file_digest(f)}
                          for f in files},
            "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        self._save(stages)

    def forget(self, names: list[str]) -> None:
        """Unmark stages before they run again, so a crash mid-way never leaves an old 'done' standing."""
        stages, _ = self.load()
        if any(n in stages for n in names) or not self.path.is_file():
            self._save({k: v for k, v in stages.items() if k not in names})

    def verify(self, stage: str, sections: dict[str, str]) -> None:
        """Raise unless ``stage`` finished under these recipe sections with its artifacts intact (``check``)."""
        stages, problem = self.load()
        record = stages.get(stage)
        if record is None:
            raise RunDirError(f"{self.root}: the {stage} stage has not finished ({problem or 'not run yet'}); "
                              f"finish the run with ofbdeploy run")
        if record.get("sections") != sections:
            changed = sorted(k for k in set(sections) | set(record.get("sections", {}))
                             if record.get("sections", {}).get(k) != sections.get(k))
            raise RunDirError(f"{self.root}: recipe.yaml changed ({', '.join(changed)}) since the {stage} stage ran; "
                              f"finish the run with ofbdeploy run")
        problem = self._artifact_problem(record.get("artifacts"))
        if problem:
            raise RunDirError(f"{self.root}: {problem} since the {stage} stage wrote it; run ofbdeploy run again")


# -- resuming a stage from its checkpoint ------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _describe(key: str, before: Any, after: Any) -> str:
    """One change of a checkpoint's settings, as the user would name it."""
    if key.startswith("upstream."):
        return f"the {key.removeprefix('upstream.')} stage's output changed (it ran again)"
    if key.startswith("inputs."):
        return f"input {key.split('.', 2)[-1]} changed"
    shown = [one_line(json.dumps(v, default=str), 60) for v in (before, after)]
    return f"{key} changed from {shown[0]} to {shown[1]}"


def settings_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".json")


def checkpoint_epoch(checkpoint: Path) -> int:
    """The epoch count a training or search checkpoint holds (memory-mapped: tensors are not read)."""
    import torch

    from ofbdeploy.errors import CheckpointError

    try:
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception as err:  # a truncated or foreign file fails in many ways
        raise CheckpointError(f"{checkpoint}: unreadable checkpoint ({type(err).__name__}); delete it or run "
                              f"without --resume") from None
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise CheckpointError(f"{checkpoint}: not a checkpoint of ofbdeploy (no epoch count)")
    return epoch


def resume_plan(checkpoint: Path, settings: dict[str, Any], resume: bool, epochs_key: str,
                may_change: tuple[str, ...] = (), apply: bool = True) -> None:
    """Decide, before a stage with an epoch checkpoint starts, whether it may continue that checkpoint.

    ``settings`` are the values the stage's result depends on (recipe sections, world size, digests of
    the weights it starts from). Without ``resume`` the old checkpoint is removed (a crash before the
    first new epoch must not leave it to a later ``--resume``). With ``resume``: nothing changed, or only
    ``epochs_key`` grew past the checkpoint's epoch (and the keys in ``may_change``, e.g. warm-up epochs):
    continue, the schedule rebuilt over the new length; anything else: refuse, naming the change. With
    ``apply`` False nothing is written (a check before the run directory is touched).
    """
    record_path = settings_path(checkpoint)
    flat = _flatten(settings)
    if not resume or not checkpoint.is_file():
        if not apply:
            return
        checkpoint.unlink(missing_ok=True)
        atomic_write_text(record_path, to_json({"format": RESUME_FORMAT, "settings": flat}))
        return
    name = checkpoint.relative_to(checkpoint.parents[1]) if len(checkpoint.parents) > 1 else checkpoint
    try:
        old = json.loads(record_path.read_text(encoding="utf-8"))
        old_flat = old["settings"] if old.get("format") == RESUME_FORMAT else None
    except (OSError, ValueError, AttributeError, KeyError):
        old_flat = None
    if not isinstance(old_flat, dict):
        raise RunDirError(f"--resume: {name} has no readable settings record (written by an older ofbdeploy or "
                          f"by hand); run without --resume to start the stage again")
    changes = [(key, old_flat.get(key, "<unset>"), flat.get(key, "<unset>"))
               for key in sorted(set(flat) | set(old_flat)) if old_flat.get(key, "<unset>") != flat.get(key, "<unset>")]
    refused = [c for c in changes if c[0] not in (epochs_key, *may_change)]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise RunDirError(one_line(f"--resume: {_describe(*refused[0])}{more} since {name} was written; it cannot "
                                   f"continue under other settings: run without --resume to start the stage "
                                   f"again"))
    if changes:
        done, wanted = checkpoint_epoch(checkpoint), flat.get(epochs_key)
        if isinstance(wanted, int) and done > wanted:
            raise RunDirError(f"--resume: {epochs_key} is now {wanted}, but {name} already holds {done} epochs; run "
                              f"without --resume to train {wanted} epochs from the start")
        if not apply:
            return
        log.info("--resume: %s; continuing %s at epoch %d of %s with the schedule rebuilt over the new length",
                 ", ".join(_describe(*c) for c in changes), name, done, wanted)
        atomic_write_text(record_path, to_json({"format": RESUME_FORMAT, "settings": flat}))
