"""The driver of ``ofbdeploy run``: runs the stage table (:mod:`ofbdeploy.run.stages`) in a run directory.

It holds the directory's lock, checks every input before it writes anything, asks
:mod:`ofbdeploy.run.rundir` which stages are done (one is skipped only while its recipe sections, inputs
and artifacts are what they were when it finished), lets a stopped stage resume from its epoch checkpoint
with ``--resume`` when its settings allow, runs the rest in order, parts the torchrun processes after the
last collective stage, and writes every log line of rank 0 to run.log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from ofbdeploy import threads
from ofbdeploy.errors import OfbError, note_traceback
from ofbdeploy.io import AppendLogHandler, check_output_dir
from ofbdeploy.recipe import Recipe
from ofbdeploy.run import stages as table
from ofbdeploy.run.context import RunContext
from ofbdeploy.run.rundir import (
    RunLock,
    StageBook,
    check_run_dir,
    digest_of,
    on_main,
    read_json,
    remove_leftovers,
    resume_plan,
)
from ofbdeploy.run.stages import Stage, section_values, stage_sections, upto
from ofbdeploy.train.distributed import Dist

log = logging.getLogger("ofbdeploy.run")


class Run:
    """One run of a recipe in its directory; :meth:`execute` runs the stages that are not done yet."""

    def __init__(self, recipe: Recipe, resume: bool = False, progress: bool = True) -> None:
        self.recipe, self.resume = recipe, resume
        self.context = RunContext.start(recipe, resume=resume, progress=progress)
        self.paths = self.context.paths
        self.book = StageBook(self.paths.root)
        self._inputs: dict[str, dict[str, str]] = {}

    @property
    def stages(self) -> tuple[Stage, ...]:
        return table.STAGES  # read at run time, so a test can put a failing body in the table

    def inputs(self, stage: Stage) -> dict[str, str]:
        """Content identity of what a stage reads from outside the run directory (computed once)."""
        if stage.name not in self._inputs:
            self._inputs[stage.name] = stage.inputs(self.recipe)
        return self._inputs[stage.name]

    def _prepare_resume(self, stage: Stage, apply: bool = True) -> None:
        """Rank 0: may this stage continue its checkpoint (``--resume``)? Refuses in one line if not."""
        checkpoint = stage.checkpoint
        if checkpoint is None or not checkpoint.when(self.recipe):
            return
        before = upto(stage.name, self.stages)[:-1]
        records, _ = self.book.load()
        settings = {
            **section_values(self.recipe, stage.name, self.stages),
            "world_size": self.context.dist.world_size,
            "inputs": {s.name: self.inputs(s) for s in (*before, stage)},
            "upstream": {s.name: digest_of(records.get(s.name, {}).get("artifacts")) for s in before},
        }
        resume_plan(checkpoint.path(self.paths), settings, self.resume, f"{checkpoint.section}.epochs",
                    (f"{checkpoint.section}.warmup_epochs",), apply)

    def _plan(self) -> list[tuple[str, str | None]]:
        """Rank 0: per stage name, why it must run (None: done and intact); names, not records, so that the
        decision can be sent to the other ranks."""
        plan: list[tuple[str, str | None]] = []
        first = None
        for stage in self.stages:
            reason = f"after {first}" if first else self.book.why_not_done(
                stage.name, stage_sections(self.recipe, stage.name, self.stages), self.inputs(stage))
            first = first or (stage.name if reason else None)
            plan.append((stage.name, reason))
        return plan

    def execute(self) -> dict[str, Any] | None:
        """Lock the directory, check every input, then write recipe.yaml and run what is not done.

        Under torchrun rank 0 alone locks, decides and records; the others follow its decisions and return
        None when they part after the last collective stage (rank 0 writes the report).
        """
        run, root = self.context, self.paths.root
        lock = RunLock(root)
        last_collective = max((i for i, s in enumerate(self.stages) if s.collective), default=-1)
        name, handler = "input checks", None
        try:
            on_main(run.dist, lambda: check_run_dir(root))
            if root.exists():  # refuse a busy directory before spending time on checks
                on_main(run.dist, lock.acquire)
            run.check_inputs()
            decided = on_main(run.dist, lambda: self._open(lock))
            by_name = {s.name: s for s in self.stages}
            handler = _log_to_file(self.paths.log, run.dist)
            log.info("run %s in %s (device %s, %d process(es))", self.recipe.name, root, run.dist.device,
                     run.dist.world_size)
            log.info("%s", threads.current().describe())
            run.log_precision_and_batch()
            for index, (name, reason) in enumerate(decided):
                stage = by_name[name]
                if reason is None:
                    log.info("stage %s: done already, skipped", name)
                else:
                    self._run_stage(stage, reason)
                if index == last_collective and run.dist.enabled:
                    log.info("processes part after stage %s: %s run on rank 0 alone", name,
                             _and([s.name for s in self.stages[index + 1:]]))
                    if run.part():
                        return None
        except KeyboardInterrupt:
            _file_only(handler, logging.WARNING, f"interrupted during {name}; finished stages are kept, "
                                                 f"`--resume` continues a stopped pretrain, search or finetune")
            raise
        except OfbError as err:  # the console gets the one-line error from the CLI; the log keeps it too
            _file_only(handler, logging.ERROR, f"stopped during {name}: {err}")
            raise
        except Exception as err:
            if handler is not None:  # an internal error: its traceback goes into the run's log
                _file_only(handler, logging.ERROR, f"internal error during {name}", err)
                note_traceback(err, handler.baseFilename)
            raise
        finally:
            if run.dist.is_main:
                lock.release()
            if handler is not None:
                logging.getLogger("ofbdeploy").removeHandler(handler)
                handler.close()
        return read_json(self.paths.report) if self.paths.report.is_file() else {}

    def _run_stage(self, stage: Stage, reason: str) -> None:
        """One stage that must run: its checkpoint's resume decision, its body (every process for a collective
        stage, rank 0 for the others), its record in stages.json."""
        run = self.context
        log.info("stage %s: running (%s)", stage.name, reason)
        on_main(run.dist, lambda: self._prepare_resume(stage))
        t0 = time.perf_counter()
        torch.manual_seed(self.recipe.seed)  # a stage's result must not depend on what ran before it
        if stage.collective or run.dist.is_main:
            stage.body(run)
        on_main(run.dist, lambda: self.book.record(stage.name, stage_sections(self.recipe, stage.name, self.stages),
                                                   self.inputs(stage), stage.artifacts(self.paths)))
        log.info("stage %s: finished in %.1f s", stage.name, time.perf_counter() - t0)

    def _open(self, lock: RunLock) -> list[tuple[str, str | None]]:
        """Rank 0, every input checked: hold the lock, clear leftovers of killed writes, decide what runs
        (a refused ``--resume`` of the first stage to run is one more input check), and only then write
        recipe.yaml and unmark the stages that will run."""
        if not lock.held:
            check_run_dir(self.paths.root)
            check_output_dir(self.paths.root, "output directory")
            lock.acquire()
        for path in remove_leftovers(self.paths.root):
            log.info("removed %s, left by a write that was killed", path)
        plan = self._plan()
        first = next((i for i, (_, reason) in enumerate(plan) if reason), None)
        if first is not None and self.resume:
            self._prepare_resume(self.stages[first], apply=False)
        self.recipe.save(self.paths.recipe)
        if first is not None:
            self.book.forget([name for name, _ in plan[first:]])
        return plan


def _and(names: list[str]) -> str:
    """'a, b and c'."""
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def _file_only(handler: logging.Handler | None, level: int, message: str, error: BaseException | None = None) -> None:
    """A record for the run's log file only (the console already gets the CLI's one-line error)."""
    if handler is not None:
        exc_info = (type(error), error, error.__traceback__) if error is not None else None
        handler.handle(log.makeRecord(log.name, level, __file__, 0, message, (), exc_info))


def _log_to_file(path: Path, dist: Dist) -> logging.Handler | None:
    """Append every log line of rank 0 to the run's log file (grep-able: time level logger message) until
    the returned handler is removed."""
    if not dist.is_main:
        return None
    root = logging.getLogger("ofbdeploy")
    handler = AppendLogHandler(path, "run log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return handler
