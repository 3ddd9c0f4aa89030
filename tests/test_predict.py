"""predict: the submission CSV from checkpoints (ensembles, TTA, several ranks) and its bad input."""
from __future__ import annotations

import csv
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch

from lc_common.errors import InputError
from lc_common.tiles import CLASS_NAMES
from shard_tools.manifest import load_manifest
from dist_lc.evaluate import evaluate_csv
from dist_lc.predict import predict
from lc_common.atomic import write_csv_atomic

from test_faults import logged_torchrun, rank_logs
from torchrun_util import dist_lc, torchrun


def best(run):
    return run / "checkpoints" / "best.pt"


def tiles(sample_root, folder, count=4):
    """A folder of the first ``count`` test tiles (links to the sample's)."""
    folder.mkdir()
    for tif in sorted((sample_root / "test" / "images").glob("*.tif"))[:count]:
        os.symlink(tif, folder / tif.name)
    return folder


def poisoned(run, path):
    """best.pt with one convolution's weights NaN: a diverged checkpoint, or one that overflows."""
    state = torch.load(best(run), weights_only=True)
    for weights in [state["model"], *([state["ema"]] if state.get("ema") else [])]:
        name = [k for k, v in weights.items() if v.is_floating_point() and v.ndim == 4][-1]
        weights[name] = torch.full_like(weights[name], float("nan"))
    torch.save(state, path)
    return path


def errors(log: str) -> list[str]:
    return [x for x in log.splitlines() if x.startswith("error: ")]


def check_submission(table: pd.DataFrame, ids):
    assert list(table.columns) == ["sample_id", *CLASS_NAMES]
    assert sorted(table["sample_id"], key=int) == sorted(ids, key=int)
    values = table[list(CLASS_NAMES)].to_numpy()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-9)
    assert (values[:, :2] == 0).all() and (values >= 0).all()


def test_fold_prediction_scores_as_validation_did(smoke_run, packed_sample, sample_root, tmp_path):
    table = predict([best(smoke_run)], packed_sample, "fold:0", workers=0)
    manifest = load_manifest(packed_sample)
    check_submission(table, [k for k, f in manifest.data["folds"].items() if f == 0])
    write_csv_atomic(tmp_path / "fold0.csv", table)
    with open(smoke_run / "metrics.csv", newline="") as f:
        val_kl = float(list(csv.DictReader(f))[-1]["val_kl"])
    kl = evaluate_csv(sample_root / "train_labels.csv", tmp_path / "fold0.csv")["kl"]
    assert kl == pytest.approx(val_kl, rel=1e-5)  # one score function, one prediction path


def test_predicting_folds_a_checkpoint_trained_on_warns_that_they_are_in_sample(smoke_run, packed_sample, tiny_shards,
                                                                               capsys):
    """smoke_run validated on fold 0 and trained on folds 1-4: its predictions of those score low for
    the wrong reason. Its own fold, and shards packed otherwise, say nothing."""
    predict([best(smoke_run)], packed_sample, "fold:0", workers=0)
    assert "warning" not in capsys.readouterr().err
    predict([best(smoke_run)], packed_sample, "fold:2", workers=0)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {best(smoke_run)}: trained on fold(s) 2 of these shards (data.fold=0): its predictions of them "
        "are in-sample, their KL optimistic"]
    predict([best(smoke_run)], packed_sample, "train", workers=0)
    assert "trained on fold(s) 1, 2, 3, 4 of these shards" in capsys.readouterr().err
    predict([best(smoke_run)], tiny_shards, "fold:2", workers=0)   # other shards: their folds are not its
    assert "warning" not in capsys.readouterr().err


def test_a_member_trained_on_an_earlier_pack_of_the_same_folder_is_warned_of(tiny_shards, tmp_path):
    """The folder packed again (another seed, or blocks where the old pack drew tiles): the member's
    folds may not be these, and no identity tells which tiles it saw."""
    from dist_lc.config import load_config
    from dist_lc.predict import Ensemble

    manifest = load_manifest(tiny_shards)
    ensemble = object.__new__(Ensemble)
    ensemble.checkpoints = ["a.pt", "b.pt", "c.pt"]
    ensemble.members = [(None, load_config(None, [f"data.shards={where}", "data.fold=0"]))
                        for where in (tiny_shards.as_uri(), tiny_shards, tmp_path / "other")]
    ensemble.trained_on = ["an earlier pack", None, "another folder"]   # b.pt: a checkpoint without one
    assert ensemble.in_sample(manifest, [0]) == [
        f"a.pt: trained on an earlier pack of {tiny_shards}, whose folds may not be these: some of these tiles "
        "may be in-sample, their KL optimistic"]


def test_test_split_tta_and_ensemble(smoke_run, tiny_shards):
    ids = [k for s in load_manifest(tiny_shards).shards("test") for k in s["keys"]]
    plain = predict([best(smoke_run)], tiny_shards, "test", workers=0)
    tta = predict([best(smoke_run)], tiny_shards, "test", tta=True, workers=0)
    check_submission(plain, ids)
    check_submission(tta, ids)
    assert not np.allclose(plain[list(CLASS_NAMES)], tta[list(CLASS_NAMES)])
    last = smoke_run / "checkpoints" / "last.pt"
    both = predict([best(smoke_run), last], tiny_shards, "test", workers=0)
    alone = predict([last], tiny_shards, "test", workers=0)
    np.testing.assert_allclose(both[list(CLASS_NAMES)], (plain[list(CLASS_NAMES)] + alone[list(CLASS_NAMES)]) / 2,
                               atol=1e-6)


def test_two_ranks_predict_each_tile_once(smoke_run, packed_sample, tmp_path):
    """The 24 test tiles in shards of 16 and 8, shared by two ranks: each tile once, none dropped, in
    id order (two workers a rank hand over their batches in turn)."""
    out = tmp_path / "two.csv"
    assert [len(s["keys"]) for s in load_manifest(packed_sample).shards("test")] == [16, 8]
    torchrun(["-m", "dist_lc", "predict", "--checkpoint", str(best(smoke_run)), "--shards", str(packed_sample),
              "--split", "test", "--out", str(out), "--workers", "2", "--batch-size", "5"])
    two = pd.read_csv(out, dtype={"sample_id": str})
    one = predict([best(smoke_run)], packed_sample, "test", workers=0)
    assert len(two) == 24 and two["sample_id"].is_unique
    assert list(two["sample_id"]) == sorted(two["sample_id"], key=int)
    merged = one.merge(two, on="sample_id", suffixes=("", "_2"))
    for c in CLASS_NAMES:
        np.testing.assert_allclose(merged[c], merged[f"{c}_2"], atol=2e-3)  # bf16 batches differ in size


def test_not_a_checkpoint(packed_sample, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    proc = dist_lc(["predict", "--checkpoint", str(bogus), "--shards", str(packed_sample), "--out",
                    str(tmp_path / "x.csv")])
    assert proc.returncode == 2 and "not a dist_lc checkpoint" in proc.stderr and not (tmp_path / "x.csv").exists()


def test_a_file_torch_refuses_to_load_safely_is_not_met_with_advice_to_load_it_unsafely(tmp_path):
    """A config.yaml given as a checkpoint: torch's message advises weights_only=False, which would
    run whatever a pickle holds."""
    from dist_lc.checkpoint import load
    from lc_common.errors import InputError

    with pytest.raises(InputError) as err:
        load("configs/smoke.yaml")
    assert str(err.value) == ("configs/smoke.yaml: not a dist_lc checkpoint (UnpicklingError: Weights only load "
                              "failed: it holds more than tensors and plain types, as no dist_lc checkpoint does)")


def test_checkpoint_of_another_model_config(smoke_run, packed_sample, tmp_path):
    state = torch.load(best(smoke_run), weights_only=True)
    state["config"]["model"]["filters"] = 32
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(InputError, match="incompatible model config"):
        predict([other], packed_sample, "test", workers=0)


def test_shards_without_manifest_and_bad_split(smoke_run, packed_sample, tmp_path):
    with pytest.raises(InputError, match="no manifest"):
        predict([best(smoke_run)], tmp_path, "test")
    with pytest.raises(InputError, match="expected test, train or fold:K"):
        predict([best(smoke_run)], packed_sample, "fold:9")


def test_output_that_is_not_proportions_is_refused_on_every_rank(smoke_run, sample_root, tmp_path):
    """NaN from the network (a diverged checkpoint, fp16 overflowing) is refused, not written as empty
    cells: one line naming the checkpoint, the count, some ids and the precision, on every rank."""
    nan = poisoned(smoke_run, tmp_path / "nan.pt")
    images = tiles(sample_root, tmp_path / "images")
    with pytest.raises(InputError, match=rf"{nan}: 4 of 4 tiles predicted with proportions that are not finite.*"
                                         r"ids \d+, \d+, \d+, \.\.\..*train\.precision="):
        predict([nan], images=images, workers=0)
    out = tmp_path / "nan.csv"
    proc = logged_torchrun(["-m", "dist_lc", "predict", "--checkpoint", str(nan), "--images", str(images),
                            "--out", str(out), "--workers", "0"], tmp_path / "logs", check=False, timeout=120)
    assert proc.returncode != 0 and not out.exists()
    for rank, log in rank_logs(tmp_path / "logs").items():
        assert len(errors(log)) == 1 and "not finite" in errors(log)[0] and "Traceback" not in log, (rank, log)


def test_a_bad_tile_on_one_rank_ends_every_rank_with_its_cause(smoke_run, sample_root, tmp_path):
    """The last tile (rank 1's) is truncated: rank 1 says so, rank 0 reports it as rank 1's failure,
    both exit at once with one line each and nothing written (not a closed connection, not a hang)."""
    images = tiles(sample_root, tmp_path / "images")
    last = sorted(images.glob("*.tif"))[-1]
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[:3000])
    out = tmp_path / "bad.csv"
    started = time.monotonic()
    proc = logged_torchrun(["-m", "dist_lc", "predict", "--checkpoint", str(best(smoke_run)), "--images", str(images),
                            "--out", str(out), "--workers", "1"], tmp_path / "logs", check=False, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - started < 60 and not out.exists()
    logs = rank_logs(tmp_path / "logs")
    cause = f"{last}: truncated TIFF"
    assert len(errors(logs[1])) == 1 and errors(logs[1])[0].startswith(f"error: {cause}"), logs[1][-2000:]
    assert len(errors(logs[0])) == 1 and \
        errors(logs[0])[0].startswith(f"error: rank 1 failed first: InputError: {cause}"), logs[0][-2000:]
    assert not any("Traceback" in log for log in logs.values())


ONLY_RANK_0_SEES_OUT = """
import os, sys
sys.path.insert(0, os.getcwd())   # the checkout under test (torchrun runs this with the repository as its cwd)
import dist_lc.predict
from lc_common.errors import InputError
if os.environ["RANK"] != "0":   # as on another node than rank 0's, where --out's folder is not mounted
    def absent(path, what="output"):
        raise InputError(f"{path}: {what} folder does not exist on this node")
    dist_lc.predict.check_parent = absent
from dist_lc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_only_rank_0_needs_the_output_folder(smoke_run, sample_root, tmp_path):
    script = tmp_path / "only_rank_0_sees_out.py"
    script.write_text(ONLY_RANK_0_SEES_OUT)
    out = tmp_path / "out.csv"
    torchrun([str(script), "predict", "--checkpoint", str(best(smoke_run)),
              "--images", str(tiles(sample_root, tmp_path / "images", 2)), "--out", str(out), "--workers", "0"],
             timeout=120)
    assert len(pd.read_csv(out)) == 2


ONE_RANK_FAILS = """
import os, sys, time
sys.path.insert(0, os.getcwd())   # the checkout under test (torchrun runs this with the repository as its cwd)
import torch
import dist_lc.predict
from lc_common.errors import WriteError
rank, mode = os.environ["RANK"], os.environ["FAIL"]
if mode in ("oom", "slow") and rank == "1":   # as a GPU shared with another job would, in its first batch
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")
    dist_lc.predict.Ensemble.__call__ = no_memory
if mode == "write" and rank == "0":   # a full disk
    def full(path, table):
        raise WriteError(path, OSError(28, "No space left on device"))
    dist_lc.predict.write_csv_atomic = full
if mode == "slow" and rank == "0":   # a long share: each of its batches takes 1 s, counted
    predicting = dist_lc.predict.Ensemble.__call__
    def slowly(*args, **kwargs):
        with open(os.environ["CALLS"], "a") as calls:
            calls.write("batch\\n")
        time.sleep(1.0)
        return predicting(*args, **kwargs)
    dist_lc.predict.Ensemble.__call__ = slowly
if mode == "fewer" and rank == "1":   # as on a node whose copy of the folder lacks a tile
    import lc_common.tiles
    listing = lc_common.tiles.tiffs_by_id
    lc_common.tiles.tiffs_by_id = lambda folder: dict(list(listing(folder).items())[:-1])
from dist_lc.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode, failing, cause", [
    ("oom", 1, "rank 1: out of memory at --batch-size 16 (CUDA out of memory); lower --batch-size"),
    ("write", 0, "{out}: cannot write: No space left on device"),
])
def test_any_error_of_one_rank_ends_every_rank_with_its_cause(smoke_run, sample_root, tmp_path, mode, failing,
                                                              cause):
    """Not only bad input: a rank out of memory (its peers would otherwise wait in the gather for the
    whole timeout) or rank 0 failing to write the CSV (its peers would exit 0) ends every rank at
    once, in one line each, non-zero."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    out = tmp_path / "out.csv"
    started = time.monotonic()
    proc = logged_torchrun([str(script), "predict", "--checkpoint", str(best(smoke_run)),
                            "--images", str(tiles(sample_root, tmp_path / "images", 2)), "--out", str(out),
                            "--workers", "0"], tmp_path / "logs", check=False, timeout=120, extra_env={"FAIL": mode})
    assert proc.returncode != 0 and time.monotonic() - started < 60 and not out.exists()
    logs = rank_logs(tmp_path / "logs")
    cause = cause.format(out=out)
    other = 1 - failing
    assert errors(logs[failing]) == [f"error: {cause}"], logs[failing][-2000:]
    assert len(errors(logs[other])) == 1 and errors(logs[other])[0].startswith(
        f"error: rank {failing} failed first: ") and errors(logs[other])[0].endswith(cause), logs[other][-2000:]
    assert not any("Traceback" in log for log in logs.values())


def test_a_rank_s_failure_stops_its_peers_before_the_end_of_their_share(smoke_run, sample_root, tmp_path):
    """Rank 1 fails in its first batch; rank 0, whose 12 batches take 12 s, stops within about a second
    of it (through the rendezvous store) instead of finishing its share while rank 1 waits in the
    gather, where the group's timeout could end it before its cause is heard."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    calls = tmp_path / "calls"
    proc = logged_torchrun([str(script), "predict", "--checkpoint", str(best(smoke_run)),
                            "--images", str(tiles(sample_root, tmp_path / "images", 24)), "--out",
                            str(tmp_path / "out.csv"), "--workers", "0", "--batch-size", "1"], tmp_path / "logs",
                           check=False, timeout=120, extra_env={"FAIL": "slow", "CALLS": str(calls)})
    assert proc.returncode != 0
    logs = rank_logs(tmp_path / "logs")
    assert errors(logs[0]) == [f"error: rank 1 failed first: PredictionError: rank 1: out of memory at --batch-size 1 "
                               "(CUDA out of memory); lower --batch-size"], logs[0][-2000:]
    assert (len(calls.read_text().splitlines()) if calls.exists() else 0) < 9


def test_ranks_that_list_different_tiles_are_refused(smoke_run, sample_root, tmp_path):
    """Rank 1's copy of the folder lacks a tile: each rank would take its share of its own list, some
    tiles twice and others never, in a CSV that looks whole."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    out = tmp_path / "out.csv"
    proc = logged_torchrun([str(script), "predict", "--checkpoint", str(best(smoke_run)),
                            "--images", str(tiles(sample_root, tmp_path / "images", 4)), "--out", str(out),
                            "--workers", "0"], tmp_path / "logs", check=False, timeout=120, extra_env={"FAIL": "fewer"})
    assert proc.returncode != 0 and not out.exists()
    said = ("error: the ranks listed different numbers of tiles (rank 0: 4, rank 1: 3); does every node see the "
            "same tiles (--images folder, --shards)?")
    assert all(errors(log) == [said] for log in rank_logs(tmp_path / "logs").values())


def test_a_tile_from_two_ranks_is_refused_and_rows_come_in_id_order():
    from dist_lc.predict import _assembled

    rows = np.full((2, len(CLASS_NAMES)), 0.1)
    listed = (4, "ab12")
    table, verdict = _assembled([(["10", "9"], rows, None, listed), (["2", "1"], rows, None, listed)], None)
    assert verdict is None and list(table["sample_id"]) == ["1", "2", "9", "10"]
    table, verdict = _assembled([(["1", "2"], rows, None, listed), (["2", "3"], rows, None, listed)], None)
    assert table is None and verdict[2].startswith("1 tile(s) predicted by more than one rank (ids 2); ")
    table, verdict = _assembled([(["1", "2"], rows, None, listed), (["3", "5"], rows, None, (4, "cd34"))], None)
    assert table is None and verdict[2].startswith(
        "the ranks listed different tiles (as many, with other ids) (rank 0: 4, rank 1: 4); ")


def test_members_trained_with_auto_precision_run_in_the_dtype_the_ranks_agreed(smoke_run):
    from dataclasses import replace

    from dist_lc.predict import Ensemble

    ensemble = Ensemble([best(smoke_run)], torch.device("cpu"), auto=torch.float16)
    (_, cfg), = ensemble.members
    trained = {p: replace(cfg, train=replace(cfg.train, precision=p)) for p in ("auto", "fp32", "bf16")}
    assert ensemble.dtype(trained["auto"]) == torch.float16
    assert ensemble.dtype(trained["fp32"]) is None and ensemble.dtype(trained["bf16"]) == torch.bfloat16
