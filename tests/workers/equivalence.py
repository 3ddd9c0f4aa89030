"""Run under torchrun or alone: k optimizer steps of the real train_step on fixed data, params saved.

usage: equivalence.py SHARDS OUT.pt BATCH MICRO STEPS [COMPILE]
Every run sees the same global batches (the first BATCH×STEPS tiles of fold 0, in manifest order);
rank r takes its contiguous share of each global batch and splits it into micro-batches.
"""
import sys

import torch

from dist_lc.config import load_config
from dist_lc.data import eval_loader
from dist_lc.distributed import process_group
from dist_lc.train import build_setup, train_step


def main(shards, out, batch, micro, steps, compile=False):
    cfg = load_config(None, [f"data.shards={shards}", "data.fold=null", "model.norm=group", "model.filters=8",
                             "model.upconv_filters=8", "optim.name=sgd", "optim.lr=0.003", "schedule.name=constant",
                             f"train.batch_size={batch}", f"train.micro_batch_size={micro}", "train.precision=fp32",
                             "loss.kl_weight=0.5", f"train.compile={str(compile).lower()}"])
    with process_group(cfg.train.device, cfg.train.dist_timeout_s) as group:
        steps_of(build_setup(cfg, group), shards, out, batch, micro, steps)


def steps_of(s, shards, out, batch, micro, steps):
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
        torch.save({"init": init, "final": {k: v.detach().clone() for k, v in s.net.state_dict().items()}}, out)
    if torch.distributed.is_initialized():
        # as the trainer does: no rank tears gloo down while another still runs (rank 0 saves);
        # a rank doing so once aborted in its gloo threads ("terminate called without an active exception")
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:] == ["compile"])
