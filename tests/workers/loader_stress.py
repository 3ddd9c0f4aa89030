"""Run under torchrun: start and end a rank's training and validation loaders N times while another
thread of the rank keeps the process group busy, as gloo's and the trainer's threads do.

usage: loader_stress.py SHARDS N
Prints ``rank R: S worker starts`` when done; a hang is the failure (the caller's timeout).
"""
import sys
import threading

import torch
import torch.distributed as dist

from dist_lc import distributed
from dist_lc.data import eval_loader, train_loader
from shard_tools.manifest import load_manifest


def busy(stop: threading.Event, group) -> None:
    """All-reduces and allocations in a loop: locks taken and released all the time."""
    while True:
        t = torch.randn(4096)
        dist.all_reduce(t, group=group)
        flag = torch.tensor([float(stop.is_set())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)   # all ranks stop after the same round
        if flag.item():
            return


def main(shards: str, rounds: int) -> None:
    with distributed.process_group("cpu", timeout_s=120) as joined:
        stress(shards, rounds, joined.env)


def stress(shards: str, rounds: int, env) -> None:
    manifest = load_manifest(shards)
    stop = threading.Event()
    group = dist.new_group(backend="gloo")   # created by every rank in the same order, before the thread
    thread = threading.Thread(target=busy, args=(stop, group), daemon=True)
    thread.start()
    starts = 0
    try:
        for r in range(rounds):
            train, _ = train_loader(manifest, [1, 2, 3, 4], seed=0, world=env.world_size, rank=env.rank, micro=4,
                                    accum=1, workers=2, crop=16, shuffle_buffer=0, timeout_s=60)
            val = eval_loader(manifest, "train", [0], world=env.world_size, rank=env.rank, batch_size=8, workers=2,
                              timeout_s=60)
            with train, val:
                for loader, epoch in ((train, r), (val, None)):
                    with loader.batches(epoch) as batches:
                        for i, _ in enumerate(batches):
                            if i == 2 and loader is train and r % 2:
                                break   # a pass left early ends its workers at once
            starts += train.workers + val.workers
    finally:
        stop.set()
    # the busy thread may be inside an all-reduce: let it finish, then end together
    thread.join(timeout=60)
    dist.barrier()
    print(f"rank {env.rank}: {starts} worker starts", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
