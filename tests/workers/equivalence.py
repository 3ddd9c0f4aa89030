"""Run under torchrun or alone: k optimizer steps of the real train_step on fixed data, params saved.

usage: equivalence.py SHARDS OUT.pt BATCH MICRO STEPS [compile] [wide]
Every run sees the same global batches (the first BATCH×STEPS tiles of fold 0, in manifest order);
rank r takes its contiguous share of each global batch and splits it into micro-batches.
``wide``: 48 filters instead of 8, over DDP's 1 MB first gradient bucket, so that a compiled
network under DDP has its graph split at the buckets by dynamo, as the full-size networks have;
the number of buckets it made is saved too.
"""
import logging
import sys

import torch

from dist_lc.config import load_config
from dist_lc.data import eval_loader
from dist_lc.distributed import process_group
from dist_lc.train import build_setup, train_step


class BucketCount(logging.Handler):
    """Counts the buckets of dynamo's DDP graph split from its one info line per compiled graph."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.buckets = 0

    def emit(self, record):
        if record.getMessage().lstrip().startswith("DDPOptimizer used bucket cap"):
            self.buckets = max(self.buckets, int(record.args[1]))


def aot_eager():
    """The trainer's ``model.compile`` with dynamo's ``aot_eager`` backend: dynamo's graph split at
    DDP's buckets and AOTAutograd's backward, which is what DDP and accumulation meet, without
    inductor's code generation (a minute of C++ compilation per graph on a CPU; its numerics are
    checked by the GPU benchmark's miniature, tests/test_benchmarks.py)."""
    compile_module = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, *args, **kw: compile_module(self, *args, backend="aot_eager", **kw)


def main(shards, out, batch, micro, steps, compile=False, wide=False):
    filters = 48 if wide else 8
    cfg = load_config(None, [f"data.shards={shards}", "data.fold=null", "model.norm=group", f"model.filters={filters}",
                             f"model.upconv_filters={filters}", "optim.name=sgd", "optim.lr=0.003",
                             "schedule.name=constant", f"train.batch_size={batch}", f"train.micro_batch_size={micro}",
                             "train.precision=fp32", "loss.kl_weight=0.5", f"train.compile={str(compile).lower()}"])
    if compile:
        aot_eager()
    counter = BucketCount()
    split_log = logging.getLogger("torch._dynamo.backends.distributed")
    split_log.setLevel(logging.INFO)
    split_log.addHandler(counter)
    with process_group(cfg.train.device, cfg.train.dist_timeout_s) as group:
        steps_of(build_setup(cfg, group), shards, out, batch, micro, steps, counter)


def steps_of(s, shards, out, batch, micro, steps, counter):
    init = {k: v.detach().clone() for k, v in s.net.state_dict().items()}
    loader = eval_loader(s.manifest, "train", [0], world=1, rank=0, batch_size=1, workers=0)
    tiles = [b for _, b in zip(range(batch * steps), loader)]
    per_rank = batch // s.env.world_size
    for k in range(steps):
        mine = tiles[k * batch + s.env.rank * per_rank:k * batch + (s.env.rank + 1) * per_rank]
        crops = [{"key": t["key"], "image": t["image"][:, :32, :32], "mask": t["mask"][:, :32, :32],
                  "props": t["props"]} for t in mine]
        micro_batches = [{"key": [k for c in group for k in c["key"]],
                          **{n: torch.cat([c[n] for c in group]) for n in ("image", "mask", "props")}}
                         for group in (crops[i:i + micro] for i in range(0, per_rank, micro))]
        train_step(s, micro_batches)
    if s.env.rank == 0:
        torch.save({"init": init, "final": {k: v.detach().clone() for k, v in s.net.state_dict().items()},
                    "ddp_buckets": counter.buckets}, out)
    if torch.distributed.is_initialized():
        # as the trainer does: no rank tears gloo down while another still runs (rank 0 saves);
        # a rank doing so once aborted in its gloo threads ("terminate called without an active exception")
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "compile" in sys.argv[6:],
         "wide" in sys.argv[6:])
