"""Checkpoints → tile proportions → the challenge's submission CSV (also under torchrun).

The tiles come from shards (``--shards``, a split of them) or straight from a folder of the
challenge's TIFFs (``--images``, e.g. ``test/images/`` as it comes); both give the same rows.
:class:`Ensemble` is the one place that runs checkpoints on images: tile proportions for
``predict``, per-pixel probabilities for ``dist-lc map`` and the pixel metrics.
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from lc_common.atomic import check_parent, write_csv_atomic
from lc_common.errors import InputError, first_sentence, one_line, print_error, said
from lc_common.tiles import CLASS_NAMES, id_sort_key
from shard_tools.manifest import Location, load_manifest

from . import checkpoint as ckpt
from . import confusion, distributed, pixel_metrics
from .config import from_dict
from . import views
from .data import eval_loader, tiff_loader, to_nchw
from .loading import LoaderError
from .memory import is_out_of_memory
from .model import build_network, pixel_probabilities, tile_proportions
from .precision import agreed_precision, autocast, resolve_precision

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}   # train.precision's words
SAMPLE_IDS = 3   # tile ids named in the message about rows that are not proportions


class PredictionError(RuntimeError):
    """A prediction that failed for a reason other than its input (a device out of memory, a peer's
    error, an output that could not be written): one line, exit status 1."""


def load_network(path, device: torch.device):
    """The network of a checkpoint (EMA weights when the run kept them), its config and the identity
    of the shards it trained on (None for a checkpoint of an earlier release)."""
    state = ckpt.load(path)
    try:
        cfg = from_dict(state["config"])
        net = build_network(cfg.model)
        net.load_state_dict(state["ema"] if state.get("ema") else state["model"])
    except (InputError, RuntimeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: written by an incompatible model config "
                         f"({said(exc, limit=160)})") from None
    net = net.to(device).eval()
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, cfg, state.get("manifest_identity")


def same_folder(shards, root) -> bool:
    """Whether a config's ``data.shards`` names the folder ``root`` (a Location) is read from (a
    relative path as seen from here: the training may have run elsewhere)."""
    try:
        return shards is not None and str(Location(shards)) == str(root)
    except InputError:   # what the training read is not a folder this release reads
        return False


OWN_DEVICE = "own device"   # Ensemble's ``auto``: what this rank's device runs, not agreed with the others


class Ensemble:
    """One or more checkpoints on a device, each in its own precision; ``tta``: the 8 flips/rotations.
    ``auto``: the dtype of members trained with ``train.precision=auto``, agreed by the ranks
    (:func:`~dist_lc.precision.agreed_precision`, a collective its caller runs where every rank does),
    as training agreed it; OWN_DEVICE decides by this rank's device alone."""

    def __init__(self, checkpoints, device: torch.device, tta: bool = False, auto=OWN_DEVICE):
        self.checkpoints = [str(p) for p in checkpoints]
        loaded = [load_network(p, device) for p in checkpoints]
        self.members = [(net, cfg) for net, cfg, _ in loaded]
        self.trained_on = [identity for _, _, identity in loaded]   # the shards' identity, or None
        self.device, self.tta = device, tta
        self.auto = resolve_precision("auto", device) if auto is OWN_DEVICE else auto

    def dtype(self, cfg) -> torch.dtype | None:
        """The autocast dtype of a member trained with ``cfg`` (None: fp32)."""
        return self.auto if cfg.train.precision == "auto" else resolve_precision(cfg.train.precision, self.device)

    def in_sample(self, manifest, folds: list[int] | None) -> list[str]:
        """A line for each member that trained on some of the train ``folds`` (None: all) of these
        very shards: its predictions of them are in-sample, and their KL optimistic. A member trained
        on an earlier pack of the same folder may have had other folds (another seed or block size):
        said too. Other shards, or an older checkpoint, say nothing here."""
        asked = set(range(manifest.num_folds) if folds is None else folds)
        out = []
        for path, (_, cfg), identity in zip(self.checkpoints, self.members, self.trained_on):
            if identity != manifest.identity:
                if identity is not None and same_folder(cfg.data.shards, manifest.root):
                    out.append(f"{path}: trained on an earlier pack of {manifest.root}, whose folds may not be "
                               "these: some of these tiles may be in-sample, their KL optimistic")
                continue
            seen = sorted(asked - {cfg.data.fold})
            if seen:
                out.append(f"{path}: trained on fold(s) {', '.join(map(str, seen))} of these shards (data.fold="
                           f"{cfg.data.fold}): its predictions of them are in-sample, their KL optimistic")
        return out

    def precision_hint(self) -> str:
        """The precision the checkpoints run in on this device, and what to try when their output is
        not finite: fp16 overflows where bf16 (a model trained on a newer GPU) did not."""
        ran = [PRECISION_NAMES[self.dtype(cfg)] for _, cfg in self.members]
        said = f"run in {', '.join(dict.fromkeys(ran))} here (train.precision=" \
               f"{', '.join(dict.fromkeys(cfg.train.precision for _, cfg in self.members))})"
        if "fp16" in ran:
            return (f"{said}: fp16 can overflow where the model trained in bf16; predict where bf16 runs "
                    "natively (an Ampere or later GPU, or --device cpu), or train with train.precision=fp32")
        return f"{said}: the weights may have diverged; train again (a lower optim.lr, or train.precision=fp32)"

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, pixels: bool = False,
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tile proportions (B, 10), per-pixel probabilities (B, 10, H, W) or None). Proportions are the
        mean over members and views of each one's tile proportions; probabilities the mean of their
        softmax (with each member's logit bias), every view turned back.

        ``valid`` (B, H, W) bool: pixels outside it (a scene's no_data) are given each member's band
        means, 0 once normalised, as the convolutions' zero padding shows the network beyond a tile's
        edge: their raw values (0, a nodata value, whatever a mask band hides) would otherwise
        colour the valid pixels around them."""
        chosen = views.VIEWS if self.tta else views.VIEWS[:1]
        image = image.float()
        props, probs = 0, 0
        for net, cfg in self.members:
            fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
            dtype = self.dtype(cfg)
            seen = image if valid is None else torch.where(valid[:, None], image, net.mean)
            for k, flip in chosen:
                with autocast(self.device, dtype):
                    logits = net(views.turn(seen, k, flip, axes=(2, 3)).contiguous(memory_format=fmt))
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

    def __init__(self, device: torch.device, with_confusion: bool):
        self.keys, self.rows = [], []
        self.matrix = torch.zeros(pixel_metrics.N, pixel_metrics.N, dtype=torch.int64, device=device) \
            if with_confusion else None

    def add(self, keys: list, props: torch.Tensor, scores: torch.Tensor | None = None, mask=None) -> None:
        """``scores``: per-pixel class scores whose argmax is the predicted map (probabilities, or
        logits with the logit bias added), compared with ``mask`` when the tally keeps a confusion."""
        self.keys += keys
        self.rows.append(props.double().cpu().numpy())
        if self.matrix is not None:
            self.matrix += confusion.confusion(mask.to(self.matrix.device), scores)

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
    masks), ``(table, 8×8 pixel confusion matrix)``. An error on any rank (bad input: a checkpoint, a
    tile, a shard; a loader that gives up; a device out of memory) raises on every rank, as do rows
    that are not proportions.
    """
    with distributed.process_group(device_pref) as group:
        return _predict(checkpoints, shards, split, group, images=images, tta=tta, batch_size=batch_size,
                        workers=workers, with_confusion=with_confusion, wait_timeout_s=wait_timeout_s)


def _predict(checkpoints, shards, split, group: distributed.Group, *, images, tta, batch_size, workers,
             with_confusion, wait_timeout_s):
    tally, ensemble, failure, listed = Tally(group.device, with_confusion), None, None, None
    peer_failed = distributed.PeerFailed(group, "predict")
    auto = agreed_precision("auto", group.device)   # a collective: before anything that can fail on one rank
    try:
        ensemble = Ensemble(checkpoints, group.device, tta, auto)
        loader = open_loader(shards, split, images, group, batch_size=batch_size, workers=workers,
                             wait_timeout_s=wait_timeout_s, ensemble=ensemble)
        listed = loader.listed
        with loader, loader.batches() as batches:
            for batch in batches:
                if peer_failed.is_set():   # the gather below names the peer's error; this share is moot
                    break
                props, probs = ensemble(to_nchw(batch["image"]).to(group.device), pixels=with_confusion)
                tally.add(batch["key"], props, probs, batch.get("mask"))
    except Exception as exc:   # noqa: BLE001 - whatever it is, the peers must hear of it
        # raised below, after the collectives: a rank that left now would leave its peers waiting in them
        failure = out_of_memory(exc, batch_size) or exc
        peer_failed.set()
    keys, props, matrix = tally.finish()
    table = gathered_table(keys, props, failure, ensemble, listed)
    if table is None:
        return None
    return (table, matrix) if with_confusion else table


def open_loader(shards, split, images, group: distributed.Group, *, batch_size, workers, wait_timeout_s,
                ensemble: Ensemble | None = None):
    """This rank's share of the tiles: a folder of TIFFs (``images``) or a split of shards (rank 0
    warns of ``ensemble`` members that trained on them)."""
    env, device = group.env, group.device
    if images is not None:
        return tiff_loader(images, world=env.world_size, rank=env.rank, batch_size=batch_size, workers=workers,
                           device=device, timeout_s=wait_timeout_s)
    manifest = load_manifest(shards)
    split_name, folds = parse_split(split, manifest.num_folds)
    if not manifest.shards(split_name, folds):
        raise InputError(f"{manifest.root}: no {split} shards")
    if ensemble is not None and split_name == "train" and group.env.is_main:
        for line in ensemble.in_sample(manifest, folds):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return eval_loader(manifest, split_name, folds, world=env.world_size, rank=env.rank, batch_size=batch_size,
                       workers=workers, device=device, timeout_s=wait_timeout_s)


def gathered_table(keys: list, props: np.ndarray, failure: Exception | None = None,
                   ensemble: Ensemble | None = None, listed: tuple | None = None) -> pd.DataFrame | None:
    """Every rank's (tile ids, proportions) as one table on rank 0, rows in id order summing to 1 in
    float64 (None on the other ranks; every rank must call it, a rank whose prediction failed included).

    Every rank raises when one failed (``failure``, its error: it raises that, the others
    ``rank R failed first: ...`` naming the lowest such rank), when rank 0 finds rows that are not
    finite or sum to 0, naming the ``ensemble`` that predicted them, or tiles not predicted once
    each: the ranks' ``listed`` (tiles, digest of their ids) differ, or a tile came from two ranks.
    """
    parts = distributed.gather_objects((keys, props, failure_note(failure), listed))
    table, verdict = _assembled(parts, ensemble) if parts is not None else (None, None)
    raise_agreed(verdict, failure)
    return table


def _assembled(parts: list, ensemble: Ensemble | None) -> tuple[pd.DataFrame | None, tuple | None]:
    """Rank 0's (table, None) from the ranks' (ids, proportions, failure note), or (None, the verdict
    that every rank raises)."""
    verdict = first_failure([note for _, _, note, _ in parts])
    if verdict is not None:
        return None, verdict
    keys = [k for ks, _, _, _ in parts for k in ks]
    values = np.concatenate([r for _, r, _, _ in parts])
    verdict = _not_once_each(keys, [listed for _, _, _, listed in parts]) or \
        _not_proportions(keys, values, ensemble)
    if verdict is not None:
        return None, verdict
    table = pd.DataFrame(values / values.sum(axis=1, keepdims=True), columns=list(CLASS_NAMES))
    table.insert(0, "sample_id", keys)
    order = sorted(range(len(keys)), key=lambda i: id_sort_key(str(keys[i])))
    return table.iloc[order].reset_index(drop=True), None


def _not_once_each(keys: list, listed: list) -> tuple | None:
    """The verdict on ranks that listed different tiles (each took its share of its own list: some
    tiles twice, others never), or None."""
    where = "does every node see the same tiles (--images folder, --shards)?"
    if len(set(listed)) > 1:
        counts = [(entry or (None, None))[0] for entry in listed]
        what = "numbers of tiles" if len(set(counts)) > 1 else "tiles (as many, with other ids)"
        said = ", ".join(f"rank {rank}: {n}" for rank, n in enumerate(counts))
        return None, "input", f"the ranks listed different {what} ({said}); {where}"
    twice = pd.Index(keys)[pd.Index(keys).duplicated()].unique()
    if len(twice):
        shown = ", ".join(map(str, twice[:SAMPLE_IDS])) + (", ..." if len(twice) > SAMPLE_IDS else "")
        return None, "input", f"{len(twice)} tile(s) predicted by more than one rank (ids {shown}); {where}"
    return None


def out_of_memory(exc: Exception, batch_size: int) -> PredictionError | None:
    """A PredictionError naming the setting to lower for a device out of memory, else None."""
    if not is_out_of_memory(exc):
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    return PredictionError(f"rank {rank}: out of memory at --batch-size {batch_size} ({first_sentence(exc)}); "
                           "lower --batch-size")


def failure_note(failure: Exception | None) -> tuple[str, str] | None:
    """What a rank that failed sends rank 0: the kind of its error and its text (as training records it)."""
    if failure is None:
        return None
    kind = "input" if isinstance(failure, InputError) else "loader" if isinstance(failure, LoaderError) else "error"
    return kind, f"{type(failure).__name__}: {one_line(failure) or type(failure).__name__}"


def first_failure(notes: list) -> tuple | None:
    """(rank, kind, text) of the lowest rank that failed, or None."""
    return next(((rank, *note) for rank, note in enumerate(notes) if note is not None), None)


def _not_proportions(keys: list, values: np.ndarray, ensemble: Ensemble | None) -> tuple | None:
    """The verdict on rows that cannot be renormalised into proportions (NaN/inf from an overflow or a
    diverged model, or all 0), or None: written, they would be empty cells in a CSV that looks whole."""
    bad = ~(np.isfinite(values).all(axis=1) & (values.sum(axis=1) > 0))
    if not bad.any():
        return None
    ids = [str(k) for k, b in zip(keys, bad) if b]
    shown = ", ".join(ids[:SAMPLE_IDS]) + (", ..." if len(ids) > SAMPLE_IDS else "")
    what = ", ".join(ensemble.checkpoints) if ensemble else "prediction"
    hint = f"; {ensemble.precision_hint()}" if ensemble else ""
    return None, "input", (f"{what}: {len(ids)} of {len(keys)} tiles predicted with proportions that are "
                           f"not finite (NaN/inf) or sum to 0 (ids {shown}){hint}")


def agreed(failure: Exception | None) -> None:
    """Every rank raises when one failed (``failure``, its own error: it raises that; the others
    ``rank R failed first: ...``), for a step whose failure one rank alone can meet (a checkpoint read
    from a node-local path). A collective: every rank calls it."""
    notes = distributed.gather_objects(failure_note(failure))
    raise_agreed(first_failure(notes) if notes is not None else None, failure)


def raise_agreed(verdict: tuple | None, own: Exception | None = None) -> None:
    """Rank 0's ``verdict`` (None, or (rank that failed or None, "input" | "loader" | "error", text))
    on every rank, raised there: by a rank with an error of its own (``own``), that error; by the
    others, ``rank R failed first: text`` (or the text itself when no rank failed) as an InputError
    (exit 2), a LoaderError or a PredictionError. A collective: every rank calls it."""
    raise_verdict(distributed.broadcast_object(verdict), own)


def raise_verdict(verdict, own: Exception | None = None) -> None:
    """:func:`raise_agreed` once every rank holds the verdict (no collective)."""
    if verdict is None:
        return
    if own is not None:
        raise own
    rank, kind, text = verdict
    message = text if rank is None else f"rank {rank} failed first: {text}"
    raise {"input": InputError, "loader": LoaderError}.get(kind, PredictionError)(message)


def run(args) -> int:
    if (args.shards is None) == (args.images is None):
        raise InputError("predict: give the tiles either as --shards DIR (with --split) or as --images DIR")
    if args.images is not None and args.split is not None:   # a folder has no splits: it would be ignored
        raise InputError("predict: --split applies to --shards; --images DIR predicts every tile of the folder")
    failure = None
    with distributed.process_group(args.device):
        try:
            # rank 0 writes --out: its folder is checked there (on several nodes it may exist on that
            # node alone), the answer agreed by every rank
            distributed.on_main(check_parent, args.out, "--out")
            table = predict(args.checkpoint, args.shards, args.split or "test", images=args.images, tta=args.tta,
                            batch_size=args.batch_size, workers=args.workers, device_pref=args.device)
            write_agreed(table, args.out)
        except Exception as exc:   # noqa: BLE001 - raised below
            # every rank raised it together: they leave the group together, as after a run that ended well
            failure = exc
    if isinstance(failure, (LoaderError, PredictionError)):
        print_error(failure)
        return 1
    if failure is not None:   # bad input, a write: one line from the entry point; anything else: its traceback
        raise failure
    return 0


def write_agreed(table: pd.DataFrame | None, out) -> None:
    """Rank 0 writes the table; every rank then ends as it did, the others naming rank 0's failure
    (they would otherwise exit 0 from a launch that wrote nothing). A collective."""
    failure, verdict = None, None
    if table is not None:
        try:
            write_csv_atomic(out, table)
            print(f"wrote {len(table)} rows to {out}")
        except Exception as exc:   # noqa: BLE001 - a full disk, a closed stdout: the peers wait to hear
            failure, verdict = exc, (0, *failure_note(exc))
    raise_agreed(verdict, failure)
