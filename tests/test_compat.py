"""Run folders, checkpoints and CV folders written by the previous version still resume and report.

The previous version's formats differ from this one's in what it did not write: checkpoints without
``stale_validations``, ``planned_epochs``, ``world_size`` and ``device``, configs without the keys
added since (``train.val_from``, ``train.loggers``, ``optim.clip_grad_norm``, ...), a cosine
scheduler whose state holds no schedule length, done.json without ``timeline``, fold folders without
``oof_confusion.json``, jobs.json records without ``tasks``. These tests turn a current run and CV
folder into that shape and use them.
"""
from __future__ import annotations

import json
from pathlib import Path
import shutil

import pytest
import torch
import yaml

from dist_lc import cli
from dist_lc.config import load_config
from dist_lc.train import train

ADDED = {"train": ("val_from", "early_stop", "early_stop_min_delta", "fit_schedule", "loggers", "mlflow_uri",
                   "experiment", "dist_timeout_s", "memory_limit_gb"),
         "optim": ("clip_grad_norm",), "cv": ("second_stage",)}


def legacy_config(config: dict) -> dict:
    return {section: {k: v for k, v in keys.items() if k not in ADDED.get(section, ())}
            for section, keys in config.items()}


def legacy_checkpoint(path, shards) -> None:
    from shard_tools.manifest import load_manifest

    state = torch.load(path, weights_only=True)
    del state["manifest_identity"]
    state["manifest_sha256"] = load_manifest(shards).sha256   # earlier releases hashed the manifest file
    for key in ("stale_validations", "planned_epochs", "world_size", "device", "ema_updates"):
        state.pop(key, None)
    state["config"] = legacy_config(state["config"])
    if "lr_lambdas" in state["scheduler"]:
        state["scheduler"]["lr_lambdas"] = [None]   # a plain function was not saved
    torch.save(state, path)


def small(shards, *extra):
    return load_config("configs/smoke.yaml", [f"data.shards={shards}", "data.crop=32", "data.workers=0",
                                              "model.filters=8", "model.upconv_filters=8", "train.plot_every=0",
                                              "train.precision=fp32", "schedule.name=cosine", *extra])


def test_a_checkpoint_of_the_previous_version_resumes(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(small(tiny_shards, "train.epochs=1", "train.ema_decay=0.9"), run)
    for name in ("last.pt", "best.pt"):
        legacy_checkpoint(run / "checkpoints" / name, tiny_shards)
    (run / "config.yaml").write_text(yaml.safe_dump(legacy_config(yaml.safe_load((run / "config.yaml").read_text()))))
    result = train(small(tiny_shards, "train.epochs=2", "train.ema_decay=0.9"), run)
    assert result.epochs_done == 2 and "resuming after epoch 1" in (run / "train.log").read_text()


def test_the_same_tiles_packed_again_are_the_same_data_for_a_resume(tiny_shards, tmp_path):
    from shard_tools.manifest import load_manifest
    from shard_tools.pack import pack

    again = tmp_path / "packed-again"
    manifest = load_manifest(tiny_shards)
    pack(Path(manifest.data["source"]), again, folds=5, seed=0, samples_per_shard=8, workers=1, progress=False)
    assert load_manifest(again).sha256 != manifest.sha256   # another time, another folder
    run = tmp_path / "run"
    train(small(tiny_shards, "train.epochs=1"), run)
    result = train(small(again, "train.epochs=2"), run)
    assert result.epochs_done == 2 and "resuming after epoch 1" in (run / "train.log").read_text()


def test_a_cv_folder_of_the_previous_version_reports(tiny_shards, tmp_path):
    from test_cv import tiny

    cv_dir = tmp_path / "cv"
    assert cli.main(["cv", *tiny(tiny_shards), "--out", str(cv_dir), "--executor", "local"]) == 0
    plan = json.loads((cv_dir / "cv.json").read_text())
    for point in plan["points"]:
        point["config"] = legacy_config(point["config"])
    (cv_dir / "cv.json").write_text(json.dumps(plan))
    records = json.loads((cv_dir / "jobs.json").read_text())
    for r in records["jobs"]:
        r.pop("tasks")
    (cv_dir / "jobs.json").write_text(json.dumps(records))
    for fold in ("fold0", "fold1"):
        done = json.loads((cv_dir / fold / "done.json").read_text())
        done.pop("timeline")
        (cv_dir / fold / "done.json").write_text(json.dumps(done))
        (cv_dir / fold / "oof_confusion.json").unlink()
    for name in ("report.json", "report.md", "tile_features.csv"):
        (cv_dir / name).unlink(missing_ok=True)
    shutil.rmtree(cv_dir / "plots")
    assert cli.main(["report", str(cv_dir)]) == 0
    report = json.loads((cv_dir / "report.json").read_text())
    assert report["complete"] and report["oof_pixel"] is None and (cv_dir / "submission.csv").is_file()
    assert cli.main(["cv", "--out", str(cv_dir), "--resume"]) == 0    # nothing left to run: reports again


@pytest.mark.parametrize("what", ["shards", "model"])
def test_what_cannot_resume_is_refused_naming_what_changed(tiny_shards, tmp_path, what):
    from lc_common.errors import InputError

    run = tmp_path / "run"
    train(small(tiny_shards, "train.epochs=1"), run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    if what == "shards":
        state["manifest_identity"] = "0" * 64
    else:
        state["config"]["model"]["filters"] = 16
    torch.save(state, run / "checkpoints" / "last.pt")
    message = "trained on other shards" if what == "shards" else "written with another model config"
    with pytest.raises(InputError, match=message):
        train(small(tiny_shards, "train.epochs=2"), run)
