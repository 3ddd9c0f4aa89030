"""How much of a checkpoint's score is its BatchNorm running statistics (why the benchmark recipe fails short).

Scores each checkpoint's held-out fold twice: as ``dist-lc predict`` does (BatchNorm in eval mode,
the running statistics) and with every BatchNorm layer normalising by the statistics of the batch
it sees (train mode, running statistics left untouched). A large gap means the running statistics
had not settled when training stopped: with Keras' momentum 0.99 (torch 0.01) after N forward
passes, 0.99^N of them is still the initial (mean 0, variance 1).

    python benchmarks/bn_statistics.py --shards /tmp/dist_lc_quality/shards --fold 0 \\
        RUN/fold0/checkpoints/last.pt [more checkpoints ...]

Prints a markdown table (checkpoint, eval-mode KL, batch-statistics KL, BatchNorm momentum).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, table  # noqa: E402

from dist_lc.data import eval_loader, to_nchw  # noqa: E402
from dist_lc.metrics import kl_score  # noqa: E402
from dist_lc.predict import Ensemble  # noqa: E402
from shard_tools.manifest import load_manifest  # noqa: E402

BATCH = 8


def set_batchnorm(net: torch.nn.Module, batch_statistics: bool) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(batch_statistics)
            if batch_statistics:
                m.momentum = 0.0  # normalise by the batch, leave the running statistics as they are


def fold_kl(ensemble: Ensemble, manifest, fold: int) -> float:
    preds, truth = [], []
    for batch in eval_loader(manifest, "train", [fold], world=1, rank=0, batch_size=BATCH, workers=0):
        preds.append(ensemble(to_nchw(batch["image"]))[0].float().numpy())
        truth.append(batch["props"].numpy())
    return kl_score(np.concatenate(truth), np.concatenate(preds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=0)
    args = ap.parse_args()
    manifest = load_manifest(args.shards)
    rows = []
    for path in args.checkpoints:
        scores = {}
        for batch_statistics in (False, True):
            ensemble = Ensemble([path], torch.device("cpu"))
            net, cfg = ensemble.members[0]
            set_batchnorm(net, batch_statistics)
            scores[batch_statistics] = fold_kl(ensemble, manifest, args.fold)
        rows.append([f"`{path}`", f"{scores[False]:.4f}", f"{scores[True]:.4f}", cfg.model.bn_momentum])
    print(f"Machine: {machine_line()}; fold {args.fold}, batches of {BATCH} tiles\n")
    print(table(["checkpoint", "KL, running statistics (as predicted)", "KL, batch statistics",
                 "bn_momentum"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
