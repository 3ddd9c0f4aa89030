"""Checkpoints → tile proportions → the challenge's submission CSV (also under torchrun).

The tiles come from shards (``--shards``, a split of them) or straight from a folder of the
challenge's TIFFs (``--images``, e.g. ``test/images/`` as it comes); both give the same rows.
:class:`Ensemble` is the one place that runs checkpoints on images: tile proportions for
``predict``, per-pixel probabilities for ``dist-lc map`` and the pixel metrics.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from lc_common.atomic import check_parent, write_csv_atomic
from lc_common.errors import InputError, print_error
from lc_common.tiles import CLASS_NAMES
from shard_tools.manifest import load_manifest

from . import checkpoint as ckpt
from . import distributed, pixel_metrics
from .config import from_dict
from . import views
from .data import eval_loader, tiff_loader, to_nchw
from .loading import LoaderError
from .model import build_network, pixel_probabilities, tile_proportions
from .precision import autocast, resolve_precision

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


class Ensemble:
    """One or more checkpoints on a device, each in its own precision; ``tta``: the 8 flips/rotations."""

    def __init__(self, checkpoints, device: torch.device, tta: bool = False):
        self.members = [load_network(p, device) for p in checkpoints]
        self.device, self.tta = device, tta

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, pixels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tile proportions (B, 10), per-pixel probabilities (B, 10, H, W) or None). Proportions are the
        mean over members and views of each one's tile proportions; probabilities the mean of their
        softmax (with each member's logit bias), every view turned back."""
        chosen = views.VIEWS if self.tta else views.VIEWS[:1]
        image = image.float()
        props, probs = 0, 0
        for net, cfg in self.members:
            fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
            dtype = resolve_precision(cfg.train.precision, self.device)
            for k, flip in chosen:
                with autocast(self.device, dtype):
                    logits = net(views.turn(image, k, flip, axes=(2, 3)).contiguous(memory_format=fmt))
                props = props + tile_proportions(logits, net.logit_bias)
                if pixels:
                    probs = probs + views.unturn(pixel_probabilities(logits, net.logit_bias), k, flip, axes=(2, 3))
        count = len(self.members) * len(chosen)
        return props / count, (probs / count if pixels else None)


def parse_split(split: str, num_folds: int) -> tuple[str, list | None]:
    if split in ("test", "train"):
        return split, None
    if split.startswith("fold:") and split[5:].isdigit() and int(split[5:]) < num_folds:
        return "train", [int(split[5:])]
    raise InputError(f"--split {split!r}: expected test, train or fold:K with K < {num_folds}")


class Tally:
    """What a prediction pass gathers on one rank, batch by batch: tile ids, tile proportions and,
    for tiles with masks, the pixel confusion matrix (summed over ranks by :meth:`finish`)."""

    def __init__(self, device: torch.device, confusion: bool):
        self.keys, self.rows = [], []
        self.matrix = torch.zeros(pixel_metrics.N, pixel_metrics.N, dtype=torch.int64, device=device) \
            if confusion else None

    def add(self, keys: list, props: torch.Tensor, scores: torch.Tensor | None = None, mask=None) -> None:
        """``scores``: per-pixel class scores whose argmax is the predicted map (probabilities, or
        logits with the logit bias added), compared with ``mask`` when the tally keeps a confusion."""
        self.keys += keys
        self.rows.append(props.double().cpu().numpy())
        if self.matrix is not None:
            self.matrix += pixel_metrics.confusion(mask.to(self.matrix.device), scores)

    def finish(self) -> tuple[list, np.ndarray, np.ndarray | None]:
        """(this rank's ids, its proportions (N, 10), the confusion of all ranks or None); every rank
        must call it when the tally keeps a confusion."""
        if self.matrix is not None and dist.is_initialized():
            dist.all_reduce(self.matrix)
        props = np.concatenate(self.rows) if self.rows else np.zeros((0, len(CLASS_NAMES)))
        return self.keys, props, None if self.matrix is None else self.matrix.cpu().numpy()


def predict(checkpoints, shards=None, split="test", *, images=None, tta=False, batch_size=16, workers=2,
            device_pref="auto", with_confusion: bool = False, wait_timeout_s: float = 300.0):
    """Ensemble prediction of a split of shards, or of a folder of TIFF tiles (``images``), in the
    process group of the entry point that calls it (or in one of its own).

    Returns the table on rank 0 (None on the other ranks); with ``with_confusion`` (tiles with
    masks), ``(table, 8×8 pixel confusion matrix)``.
    """
    with distributed.process_group(device_pref) as group:
        return _predict(checkpoints, shards, split, group, images=images, tta=tta, batch_size=batch_size,
                        workers=workers, with_confusion=with_confusion, wait_timeout_s=wait_timeout_s)


def _predict(checkpoints, shards, split, group: distributed.Group, *, images, tta, batch_size, workers,
             with_confusion, wait_timeout_s):
    env, device = group.env, group.device
    ensemble = Ensemble(checkpoints, device, tta)
    if images is not None:
        loader = tiff_loader(images, world=env.world_size, rank=env.rank, batch_size=batch_size, workers=workers,
                             device=device, timeout_s=wait_timeout_s)
    else:
        manifest = load_manifest(shards)
        split_name, folds = parse_split(split, manifest.num_folds)
        if not manifest.shards(split_name, folds):
            raise InputError(f"{manifest.root}: no {split} shards")
        loader = eval_loader(manifest, split_name, folds, world=env.world_size, rank=env.rank,
                             batch_size=batch_size, workers=workers, device=device,
                             timeout_s=wait_timeout_s)
    tally = Tally(device, with_confusion)
    with loader, loader.batches() as batches:
        for batch in batches:
            props, probs = ensemble(to_nchw(batch["image"]).to(device), pixels=with_confusion)
            tally.add(batch["key"], props, probs, batch.get("mask"))
    keys, props, matrix = tally.finish()
    table = gathered_table(keys, props)
    if table is None:
        return None
    return (table, matrix) if with_confusion else table


def gathered_table(keys: list, props: np.ndarray) -> pd.DataFrame | None:
    """Every rank's (tile ids, proportions) as one table on rank 0, rows summing to 1 in float64
    (None on the other ranks; every rank must call it)."""
    parts = distributed.gather_objects((keys, props))
    if parts is None:
        return None
    values = np.concatenate([r for _, r in parts])
    table = pd.DataFrame(values / values.sum(axis=1, keepdims=True), columns=list(CLASS_NAMES))
    table.insert(0, "sample_id", [k for ks, _ in parts for k in ks])
    return table


def run(args) -> int:
    check_parent(args.out, "--out")
    if (args.shards is None) == (args.images is None):
        raise InputError("predict: give the tiles either as --shards DIR (with --split) or as --images DIR")
    try:
        with distributed.process_group(args.device):
            table = predict(args.checkpoint, args.shards, args.split, images=args.images, tta=args.tta,
                            batch_size=args.batch_size, workers=args.workers, device_pref=args.device)
            if table is not None:
                write_csv_atomic(args.out, table)
                print(f"wrote {len(table)} rows to {args.out}")
    except LoaderError as exc:
        print_error(exc)
        return 1
    return 0
