"""Runs a function on several processes joined in a gloo group on the CPU (a file rendezvous, no
network), under a deadline: a hang fails the test and names the ranks still alive."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

requires_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                   reason="torch.distributed with gloo is not available")


def _rank_main(rank: int, world: int, tmp: str, function, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = function(rank, world, *args)
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        # Every rank leaves the group together: one tearing it down while another still uses it aborts.
        dist.barrier()
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's threads, destroyed there, aborted about one
    # process in 8 ("terminate called without an active exception") after its result was written.
    os._exit(0)


def run_ranks(function, world: int, tmp_path, *args, deadline_s: float = 240) -> list:
    """function(rank, world, *args) on `world` processes (a module-level function: they are spawned);
    returns each rank's JSON-able result, in rank order."""
    tmp = str(tmp_path)
    context = mp.start_processes(_rank_main, args=(world, tmp, function, args), nprocs=world, join=False,
                                 start_method="spawn")
    start = time.monotonic()
    while not context.join(timeout=2):
        if time.monotonic() - start > deadline_s:
            alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} processes did not finish in {deadline_s} s (ranks still alive: {alive})")
    results = []
    for rank in range(world):
        path = f"{tmp}/rank{rank}.json"
        assert os.path.exists(path), f"rank {rank} wrote no result"
        with open(path) as f:
            results.append(json.load(f))
    return results
