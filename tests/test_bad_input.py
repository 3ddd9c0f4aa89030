"""The inputs a real user produces by accident, across every command: each one is a single
``error:`` line that names the file, key or option and the problem, exit status 2, and no output
that looks complete. (More cases per command live in the command's own test file.)"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from dist_lc import cli as dist_lc_cli
from shard_tools import cli as shard_cli

LABELS = "train_labels.csv"


@pytest.fixture(scope="module")
def world(packed_sample, sample_root, smoke_run, tmp_path_factory) -> dict:
    """Paths the cases refer to: shards, a checkpoint, files and folders to get wrong."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "empty").mkdir()
    (tmp / "notes").mkdir()
    (tmp / "notes" / "thesis.tex").write_text("precious")
    (tmp / "header_only.csv").write_text("sample_id,no_data,clouds,artificial,cultivated,broadleaf,coniferous,"
                                         "herbaceous,natural,snow,water\n")
    labels = pd.read_csv(sample_root / LABELS)
    labels.loc[labels.index[3], "water"] = np.nan
    labels.to_csv(tmp / "nan.csv", index=False)
    nan_id = labels["sample_id"].iloc[3]
    (tmp / "cycle.yaml").write_text("base: cycle.yaml\n")
    (tmp / "latin1.yaml").write_bytes("train:\n  epochs: 3   # café\n".encode("latin-1"))
    os.mkfifo(tmp / "fifo.yaml")
    (tmp / "unreadable.yaml").write_text("train:\n  epochs: 3\n")
    (tmp / "unreadable.yaml").chmod(0)
    (tmp / "base_key.yaml").write_text("train:\n  epochz: 3\n")
    (tmp / "base_range.yaml").write_text("optim:\n  lr: -1\n")
    (tmp / "base_yaml.yaml").write_text("train: [\n")
    for base in ("base_key", "base_range", "base_yaml", "latin1"):
        (tmp / f"on_{base}.yaml").write_text(f"base: {base}.yaml\ntrain:\n  epochs: 2\n")
    src = tmp / "src"
    for sub in ("train/images", "train/masks"):
        (src / sub).mkdir(parents=True)
    for name in sorted((sample_root / "train" / "images").iterdir())[:3]:
        shutil.copy(name, src / "train" / "images" / name.name)
        shutil.copy(sample_root / "train" / "masks" / name.name, src / "train" / "masks" / name.name)
    tifffile.imwrite(src / "train" / "images" / "tile_a.tif", np.ones((256, 256, 4), np.uint16))
    return {"shards": str(packed_sample), "ckpt": str(smoke_run / "checkpoints" / "best.pt"), "tmp": tmp,
            "labels": str(sample_root / LABELS), "sample": str(sample_root), "src": str(src), "nan_id": nan_id}


# (case, the command line with {placeholders} from `world`, what the error line must say)
CASES = [
    ("pack: missing source", "lc-shard pack --src {tmp}/nowhere --out {tmp}/o1", "source folder does not exist"),
    ("pack: --out under a file", "lc-shard pack --src {sample} --out {tmp}/a_file/shards", "--out cannot be created"),
    ("pack: zero folds", "lc-shard pack --src {sample} --out {tmp}/o2 --folds 0", "--folds must be at least 1"),
    ("pack: a tile id that is not an integer", "lc-shard pack --src {src} --out {tmp}/o3 --folds 1",
     "'tile_a' is not an integer"),
    ("pack: non-numeric --workers", "lc-shard pack --src {sample} --out {tmp}/o4 --workers many",
     "argument --workers: invalid int value"),
    ("verify: missing folder", "lc-shard verify {tmp}/nowhere", "shard folder does not exist"),
    ("verify: folder without manifest", "lc-shard verify {tmp}/empty", "no manifest"),
    ("describe: a file", "lc-shard describe {tmp}/a_file", "shard folder does not exist"),
    ("train: no shard folder", "dist-lc train --run-dir {tmp}/made/r1", "config key 'data.shards' is empty"),
    ("train: unknown key", "dist-lc train --set data.shards={shards} --set train.epoch=3",
     "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("train: zero epochs", "dist-lc train --set data.shards={shards} --set train.epochs=0",
     "'train.epochs': 0 is out of range (allowed: at least 1)"),
    ("train: negative learning rate", "dist-lc train --set data.shards={shards} --set optim.lr=-1e-3",
     "'optim.lr': -0.001 is out of range"),
    ("train: crop larger than a tile", "dist-lc train --set data.shards={shards} --set data.crop=512",
     "'data.crop': 512 is out of range (allowed: 8 to 256)"),
    ("train: negative workers", "dist-lc train --set data.shards={shards} --set data.workers=-1",
     "'data.workers': -1 is out of range"),
    ("train: a choice misspelt", "dist-lc train --set data.shards={shards} --set optim.name=adamm",
     "'optim.name': 'adamm' is not one of adam, adamw, rmsprop, adagrad, sgd (did you mean 'adam'?)"),
    ("train: --run-dir under a file", "dist-lc train --set data.shards={shards} --run-dir {tmp}/a_file/run",
     "--run-dir cannot be created ("),
    ("train: missing shards", "dist-lc train --set data.shards={tmp}/nowhere --run-dir {tmp}/r1",
     "shard folder does not exist"),
    ("train: missing recipe", "dist-lc train --config {tmp}/nope.yaml", "config file does not exist"),
    ("train: base recipes in a cycle", "dist-lc train --config {tmp}/cycle.yaml", "base recipes form a cycle"),
    ("train: a recipe that is not UTF-8", "dist-lc train --config {tmp}/latin1.yaml",
     "{tmp}/latin1.yaml: not UTF-8 text (byte 0xe9 on line 2)"),
    ("train: a folder as recipe", "dist-lc train --config {tmp}/empty", "{tmp}/empty: is a folder, not a config file"),
    ("train: a device as recipe", "dist-lc train --config /dev/zero", "/dev/zero: is a device, not a config file"),
    ("train: a FIFO as recipe", "dist-lc train --config {tmp}/fifo.yaml",
     "{tmp}/fifo.yaml: is a FIFO (named pipe), not a config file"),
    ("train: a recipe without read permission", "dist-lc train --config {tmp}/unreadable.yaml",
     "{tmp}/unreadable.yaml: cannot read the config file: Permission denied"),
    ("train: an unknown key in a base recipe", "dist-lc train --config {tmp}/on_base_key.yaml",
     "{tmp}/base_key.yaml: unknown config key 'train.epochz' (did you mean 'train.epochs'?)"),
    ("train: a value out of range in a base recipe", "dist-lc train --config {tmp}/on_base_range.yaml",
     "{tmp}/base_range.yaml: config key 'optim.lr': -1.0 is out of range"),
    ("train: bad YAML in a base recipe", "dist-lc train --config {tmp}/on_base_yaml.yaml",
     "{tmp}/base_yaml.yaml: invalid YAML: line 2, column 1:"),
    ("train: a base recipe that is not UTF-8", "dist-lc train --config {tmp}/on_latin1.yaml",
     "{tmp}/latin1.yaml: not UTF-8 text"),
    ("train: a fold the shards lack", "dist-lc train --set data.shards={shards} --set data.fold=7 --run-dir {tmp}/r2",
     "'data.fold': 7 is not a fold of"),
    ("train: a --set without =", "dist-lc train --set train.epochs", "expected key=value"),
    ("predict: batch size 0", "dist-lc predict --checkpoint {ckpt} --shards {shards} --out {tmp}/p.csv "
     "--batch-size 0", "argument --batch-size: must be at least 1"),
    ("predict: missing checkpoint", "dist-lc predict --checkpoint {tmp}/none.pt --shards {shards} --out {tmp}/p.csv",
     "checkpoint does not exist"),
    ("predict: not a checkpoint", "dist-lc predict --checkpoint {labels} --shards {shards} --out {tmp}/p.csv",
     "not a dist_lc checkpoint"),
    ("predict: --out in a missing folder", "dist-lc predict --checkpoint {ckpt} --shards {shards} "
     "--out {tmp}/nowhere/p.csv", "--out folder"),
    ("predict: a fold the shards lack", "dist-lc predict --checkpoint {ckpt} --shards {shards} --split fold:9 "
     "--out {tmp}/p.csv", "expected test, train or fold:K"),
    ("predict: --split with a folder of tiles", "dist-lc predict --checkpoint {ckpt} --images {tmp}/empty "
     "--split train --out {tmp}/p.csv", "--split applies to --shards"),
    ("predict: negative workers", "dist-lc predict --checkpoint {ckpt} --shards {shards} --out {tmp}/p.csv "
     "--workers -2", "argument --workers: must be 0 or more"),
    ("eval: prediction with a header only", "dist-lc eval --gt {labels} --pred {tmp}/header_only.csv",
     "no prediction rows"),
    ("eval: a NaN proportion", "dist-lc eval --gt {labels} --pred {tmp}/nan.csv", "sample_id {nan_id}: missing"),
    ("eval: missing ground truth", "dist-lc eval --gt {tmp}/gt.csv --pred {labels}", "gt.csv: file does not exist"),
    ("eval: a folder as prediction", "dist-lc eval --gt {labels} --pred {tmp}/empty", "not a file"),
    ("cv: a grid over the launcher", "dist-lc cv --set data.shards={shards} --out {tmp}/cv1 "
     "--grid launcher.nodes=1,2", "cannot vary within a CV"),
    ("cv: a fold the shards lack", "dist-lc cv --set data.shards={shards} --set cv.folds=[0,9] --out {tmp}/cv2",
     "fold 9 is not in"),
    ("cv: --out holding other files", "dist-lc cv --set data.shards={shards} --out {tmp}/notes",
     "not an empty folder nor a CV folder"),
    ("cv: --out under a file", "dist-lc cv --set data.shards={shards} --out {tmp}/a_file/cv",
     "--out cannot be created"),
    ("cv: --resume of a folder that is no CV", "dist-lc cv --out {tmp}/notes --resume", "not a CV folder"),
    ("report: a folder that is no CV", "dist-lc report {tmp}/notes", "not a CV folder"),
    ("synth: negative count", "dist-lc synth --out {tmp}/s1 --train -5", "argument --train: must be 0 or more"),
    ("synth: --out holding other files", "dist-lc synth --out {tmp}/notes --train 1 --test 0", "not empty"),
    ("demo: data that is no challenge folder", "dist-lc demo --out {tmp}/d1 --data {tmp}/empty",
     "not a challenge folder"),
]


# root reads a file whatever its permissions say
NEEDS_AN_ORDINARY_USER = {"train: a recipe without read permission"}


def case_params():
    for name, command, message in CASES:
        marks = ([pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")]
                 if name in NEEDS_AN_ORDINARY_USER else [])
        yield pytest.param(command, message, id=name, marks=marks)


@pytest.mark.parametrize("command, message", list(case_params()))
def test_bad_input_is_one_clear_line(world, capsys, command, message):
    argv = command.format(**world).split()
    main = shard_cli.main if argv[0] == "lc-shard" else dist_lc_cli.main
    try:
        rc = main(argv[1:])
    except SystemExit as exc:   # argparse
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith("error: ") and message.format(**world) in err[-1], err
    assert len([x for x in err if x.startswith("error: ")]) == 1
    tmp = Path(world["tmp"])
    assert sorted(p.name for p in (tmp / "notes").iterdir()) == ["thesis.tex"]
    assert not (tmp / "p.csv").exists() and not (tmp / "r1").exists() and not (tmp / "cv1").exists()
    assert not (tmp / "made").exists()   # nor the parents a refused run made for its folder


def test_the_list_covers_every_command():
    commands = {c[1].split()[0] + " " + c[1].split()[1] for c in CASES}
    assert len(CASES) >= 25 and commands >= {"lc-shard pack", "lc-shard verify", "dist-lc train", "dist-lc predict",
                                             "dist-lc eval", "dist-lc cv", "dist-lc report", "dist-lc synth"}
