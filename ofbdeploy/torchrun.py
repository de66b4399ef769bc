"""``python -m ofbdeploy.torchrun ...``: torchrun with ofbdeploy's exit-code contract.

torchrun itself exits 1 for any failed worker and for Ctrl-C, which the contract reserves for a missed
budget. This launcher takes exactly torchrun's arguments and runs the same elastic launch, then exits
with the code of the worker that failed first (each worker already printed its one line: 2 bad input,
3 internal error, 1 limit missed), 130 when interrupted (Ctrl-C, or a worker stopped by SIGINT/SIGTERM),
and 3 when a worker died otherwise (killed, out of memory).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from ofbdeploy.errors import ExitCode
from ofbdeploy.threads import share_for_workers

_INTERRUPTS = {-signal.SIGINT, -signal.SIGTERM, int(ExitCode.INTERRUPTED)}


def worker_exit_code(exitcode: int) -> ExitCode:
    """The contract's code for a worker that ended with ``exitcode`` (negative: killed by that signal)."""
    if exitcode in _INTERRUPTS:
        return ExitCode.INTERRUPTED
    if exitcode in (ExitCode.LIMIT_MISSED, ExitCode.BAD_INPUT, ExitCode.INTERNAL):
        return ExitCode(exitcode)
    return ExitCode.INTERNAL


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch's elastic agent: only the workers' own lines
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    try:
        args = parse_args(argv)
        share_for_workers(determine_local_world_size(args.nproc_per_node))
        run(args)
    except (SignalException, KeyboardInterrupt):  # the workers were stopped and said so themselves
        sys.exit(int(ExitCode.INTERRUPTED))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = worker_exit_code(failure.exitcode)
        if code == ExitCode.INTERNAL and failure.exitcode != ExitCode.INTERNAL:  # it died without a word
            print(f"internal error: worker rank {rank} ended with exit code {failure.exitcode} (killed?); see "
                  f"the run's run.log", file=sys.stderr)
        sys.exit(int(code))


if __name__ == "__main__":
    main()
