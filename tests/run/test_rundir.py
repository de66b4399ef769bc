"""Run-directory bookkeeping on its own: the lock, stages.json, resume decisions, atomic writes' modes."""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from ofbdeploy.errors import RunDirError
from ofbdeploy.io import atomic_write_text
from ofbdeploy.run.rundir import Holder, RunLock, StageBook, remove_leftovers, resume_plan, settings_path, to_json


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on .* since .*"):
            RunLock(tmp_path).acquire()
        assert RunLock.holder(tmp_path).pid == os.getpid()
    assert RunLock.holder(tmp_path) is None and not (tmp_path / "run.lock").exists()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "run.lock").write_text(json.dumps({"pid": pid, "host": "h", "started": "t", "command": "c"}))
    with RunLock(tmp_path):
        assert RunLock.holder(tmp_path).pid == os.getpid()
    assert f"took over the lock of pid {pid}" in caplog.text


def test_a_killed_holder_releases_the_lock(tmp_path):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: lock, say so, wait to be killed
        RunLock(tmp_path).acquire()
        os.write(write, b"locked")
        time.sleep(60)
        os._exit(0)
    assert os.read(read, 6) == b"locked"
    assert RunLock.holder(tmp_path).pid == pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with RunLock(tmp_path):  # the kernel dropped the dead holder's flock
        pass


def _book(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"0123456789")
    (tmp_path / "a" / ".w.bin.x.tmp").write_bytes(b"half")  # leftover of a killed write: never recorded
    book = StageBook(tmp_path)
    book.record("dense", {"model": "m1"}, {"model.checkpoint": "c1"}, [tmp_path / "a"])
    return book


def test_a_stage_is_done_only_while_sections_inputs_and_artifacts_are_unchanged(tmp_path):
    book = _book(tmp_path)
    assert book.why_not_done("dense", {"model": "m1"}, {"model.checkpoint": "c1"}) is None
    assert list(book.load()[0]["dense"]["artifacts"]) == ["a/w.bin"]
    assert book.why_not_done("dense", {"model": "m2"}, {"model.checkpoint": "c1"}) == "recipe changed: model"
    assert book.why_not_done("dense", {"model": "m1"}, {"model.checkpoint": "c2"}) == "input changed: model.checkpoint"
    (tmp_path / "a" / "w.bin").write_bytes(b"0123456780")  # same size, other content
    assert book.why_not_done("dense", {"model": "m1"}, {"model.checkpoint": "c1"}) == \
        "artifact a/w.bin changed (content)"
    (tmp_path / "a" / "w.bin").write_bytes(b"012")
    assert "changed (size)" in book.why_not_done("dense", {"model": "m1"}, {"model.checkpoint": "c1"})
    (tmp_path / "a" / "w.bin").unlink()
    assert book.why_not_done("dense", {"model": "m1"}, {"model.checkpoint": "c1"}) == "artifact a/w.bin missing"
    book.forget(["dense"])
    assert book.why_not_done("dense", {"model": "m1"}, {}) == "not run yet"
    assert remove_leftovers(tmp_path) == [tmp_path / "a" / ".w.bin.x.tmp"]


def test_an_old_or_broken_stages_file_reruns_everything(tmp_path):
    (tmp_path / "stages.json").write_text(json.dumps({"dense": "abcdef"}))
    assert "older ofbdeploy" in StageBook(tmp_path).why_not_done("dense", {}, {})
    (tmp_path / "stages.json").write_text("{not json")
    assert "unreadable" in StageBook(tmp_path).why_not_done("dense", {}, {})
    with pytest.raises(RunDirError, match="has not finished"):
        StageBook(tmp_path).verify("report", {})


def _checkpoint(path, epoch):
    torch.save({"epoch": epoch, "model": {"w": torch.zeros(2)}}, path)


def test_resume_continues_only_under_compatible_settings(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ofbdeploy")
    ckpt = tmp_path / "train.ckpt"
    settings = {"finetune": {"epochs": 4, "warmup_epochs": 1, "lr": 0.1}, "search": {"align": None}}
    _checkpoint(ckpt, 2)
    resume_plan(ckpt, settings, resume=False, epochs_key="finetune.epochs")  # a fresh start: old state goes
    assert not ckpt.exists() and settings_path(ckpt).is_file()
    _checkpoint(ckpt, 2)
    resume_plan(ckpt, settings, resume=True, epochs_key="finetune.epochs")  # unchanged: continue
    grown = {**settings, "finetune": {**settings["finetune"], "epochs": 6}}
    resume_plan(ckpt, grown, resume=True, epochs_key="finetune.epochs")
    assert "finetune.epochs changed from 4 to 6" in caplog.text and "schedule rebuilt" in caplog.text
    assert json.loads(settings_path(ckpt).read_text())["settings"]["finetune.epochs"] == 6
    _checkpoint(ckpt, 5)
    with pytest.raises(RunDirError, match=r"finetune\.epochs is now 4, but .*train\.ckpt already holds 5 epochs"):
        resume_plan(ckpt, settings, resume=True, epochs_key="finetune.epochs")
    aligned = {**grown, "search": {"align": 16}}
    with pytest.raises(RunDirError, match=r"search\.align changed from null to 16 .* run without --resume"):
        resume_plan(ckpt, aligned, resume=True, epochs_key="finetune.epochs")
    settings_path(ckpt).unlink()
    with pytest.raises(RunDirError, match="no readable settings record"):
        resume_plan(ckpt, grown, resume=True, epochs_key="finetune.epochs")


def test_written_files_get_normal_modes(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o664
    os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_json_records_never_hold_nan():
    text = to_json({"loss": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads(text) == {"loss": None, "rows": [None, 1.5]}


def test_holder_describes_itself():
    me = Holder.me()
    assert me.pid == os.getpid() and str(os.getpid()) in me.describe()
