"""DDP plumbing on two gloo processes: waiting for rank 0's solo work outlasts the collective timeout."""

import os
import socket
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ofbdeploy.train.distributed import init_distributed, leave, wait_for_main

TIMEOUT_MIN = 0.025  # 1.5 s: any ordinary collective waiting longer fails


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    ctx = init_distributed("cpu", timeout_min=TIMEOUT_MIN)
    began = time.perf_counter()
    if ctx.is_main:
        time.sleep(4)  # rank 0 alone measures something, more than twice the collective timeout
    wait_for_main(ctx)
    waited = time.perf_counter() - began
    dist.barrier()  # the ordinary group still works afterwards
    alone = leave(ctx)
    Path(out, f"{rank}.txt").write_text(f"{waited:.1f} {alone.world_size} {dist.is_initialized()}")


@pytest.mark.multiprocess
def test_the_others_wait_for_rank_0_longer_than_the_collective_timeout(tmp_path):
    # forked, not spawned: the workers only wait and talk, and start without importing torch again
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    waited, world, initialised = (tmp_path / "1.txt").read_text().split()
    assert float(waited) >= 3.5 and world == "2" and initialised == "False"  # rank 1 left the dissolved group
    assert (tmp_path / "0.txt").read_text().split()[1:] == ["1", "False"]  # rank 0 goes on alone
