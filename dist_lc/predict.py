"""Checkpoints → tile proportions → the challenge's submission CSV (also under torchrun)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shard_tools.errors import InputError
from shard_tools.format import CLASS_NAMES
from shard_tools.manifest import load_manifest

from . import checkpoint as ckpt
from . import distributed
from .config import from_dict
from .data import batches_of, eval_loader
from .files import check_parent, write_csv_atomic
from .model import build_network, tile_proportions
from .precision import resolve_precision

DIHEDRAL = [(k, flip) for k in range(4) for flip in (False, True)]  # the 8 flips/rotations


def load_network(path, device: torch.device):
    """The network of a checkpoint (EMA weights when the run kept them) and its config."""
    state = ckpt.load(path)
    try:
        cfg = from_dict(state["config"])
        net = build_network(cfg.model)
        net.load_state_dict(state["ema"] if state.get("ema") else state["model"])
    except (InputError, RuntimeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: written by an incompatible model config "
                         f"({str(exc).splitlines()[0][:160]})") from None
    net = net.to(device).eval()
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, cfg


@torch.no_grad()
def proportions(net, image: torch.Tensor, dtype, tta: bool = False, channels_last: bool = False) -> torch.Tensor:
    """(B, 10) tile proportions; with ``tta`` the mean over the 8 flips/rotations."""
    views = DIHEDRAL if tta else DIHEDRAL[:1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    total = 0
    for k, flip in views:
        x = torch.rot90(image, k, dims=(2, 3))
        x = (torch.flip(x, dims=(3,)) if flip else x).contiguous(memory_format=fmt)
        with torch.autocast(image.device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(x)
        total = total + tile_proportions(logits, net.logit_bias)
    return total / len(views)


def parse_split(split: str, num_folds: int) -> tuple[str, list | None]:
    if split in ("test", "train"):
        return split, None
    if split.startswith("fold:") and split[5:].isdigit() and int(split[5:]) < num_folds:
        return "train", [int(split[5:])]
    raise InputError(f"--split {split!r}: expected test, train or fold:K with K < {num_folds}")


def predict(checkpoints, shards, split="test", *, tta=False, batch_size=16, workers=2,
            device_pref="auto") -> pd.DataFrame | None:
    """Ensemble prediction of a split; the table on rank 0, None on the other ranks."""
    env, device = distributed.setup(device_pref)
    manifest = load_manifest(shards)
    split_name, folds = parse_split(split, manifest.num_folds)
    if not manifest.shards(split_name, folds):
        raise InputError(f"{manifest.root}: no {split} shards")
    models = [load_network(p, device) for p in checkpoints]
    loader = eval_loader(manifest, split_name, folds, world=env.world_size, rank=env.rank,
                         batch_size=batch_size, workers=workers, pin=device.type == "cuda")
    keys, rows = [], []
    with batches_of(loader) as batches:
        for batch in batches:
            image = batch["image"].to(device)
            p = sum(proportions(net, image, resolve_precision(cfg.train.precision, device), tta,
                                cfg.train.channels_last) for net, cfg in models)
            keys += batch["key"]
            rows.append((p / len(models)).double().cpu().numpy())
    parts = distributed.gather_objects((keys, np.concatenate(rows) if rows else np.zeros((0, len(CLASS_NAMES)))))
    if parts is None:
        return None
    values = np.concatenate([r for _, r in parts])
    table = pd.DataFrame(values / values.sum(axis=1, keepdims=True), columns=list(CLASS_NAMES))  # float64 rows
    table.insert(0, "sample_id", [k for ks, _ in parts for k in ks])
    return table


def run(args) -> int:
    check_parent(args.out, "--out")
    try:
        table = predict(args.checkpoint, args.shards, args.split, tta=args.tta, batch_size=args.batch_size,
                        workers=args.workers, device_pref=args.device)
        if table is not None:
            write_csv_atomic(table, args.out)
            print(f"wrote {len(table)} rows to {args.out}")
    finally:
        distributed.teardown()
    return 0
