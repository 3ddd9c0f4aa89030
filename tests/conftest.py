"""Shared fixtures: the real sample (read in place, never written) and its shards packed once per session."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# As if the venv were activated: jobs started through sbatch/srun inherit this PATH and find the
# interpreter that runs the tests (CI runs `.venv/bin/python -m pytest` without activating).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Started in the background by a script (`nohup make test &`), the suite would ignore SIGINT and pass
# that on to every process it starts: the submitit controllers of the local-executor tests would then
# ignore the SIGINT that cancels them, and those tests hang. `dist-lc cv` and `tune` handle SIGINT
# while they submit, so their jobs never inherit it; a handled signal is reset to its default in a
# started program, as it is here.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# An empty DIST_LC_SHARED counts as unset (Path("") would be the current folder).
SHARED = Path(os.environ.get("DIST_LC_SHARED") or REPO.parent / "shared")
SAMPLE = SHARED / "data" / "s2glc-sample"
SAMPLE_COUNTS = {"train": 300, "test": 24}
SAMPLE_WHAT = ("the real sample (300 train + 24 test tiles of the ENS Challenge Data 2021 land-cover data, "
               "with train_labels.csv; README.md, 'Tests')")
SAMPLE_HOW = "set DIST_LC_SHARED=/path/to/shared, whose data/s2glc-sample holds the challenge layout"
# One fixed reason, so that the end of the run can count the tests skipped for it and say it once.
SAMPLE_SKIP = f"needs {SAMPLE_WHAT}: {SAMPLE_HOW}"


def sample_required() -> bool:
    """True where a missing sample must fail the tests that use it instead of skipping them: CI has it
    beside the clone (``CI=true``, or ``DIST_LC_REQUIRE_SAMPLE=1`` which .ci/run sets), and a
    DIST_LC_SHARED given on purpose that does not hold it is a mistake to report, not to hide."""
    return (os.environ.get("CI", "").strip().lower() == "true"
            or os.environ.get("DIST_LC_REQUIRE_SAMPLE", "").strip() == "1"
            or bool(os.environ.get("DIST_LC_SHARED")))


def sample_problem() -> tuple[str, bool] | None:
    """None if SAMPLE holds the sample, else (what is wrong, whether it is missing rather than wrong)."""
    if not SAMPLE.exists():
        return f"no {SAMPLE}", True
    missing = [p for p in ("train_labels.csv", "train/images", "train/masks", "test/images")
               if not (SAMPLE / p).exists()]
    if missing:
        return f"{SAMPLE} lacks {', '.join(missing)}", False
    # The tests count on these exact numbers (fold sizes, score thresholds): a different slice or the
    # whole challenge data would fail them for a reason that has nothing to do with the code.
    counts = {split: sum(1 for _ in (SAMPLE / split / "images").glob("*.tif")) for split in SAMPLE_COUNTS}
    if counts != SAMPLE_COUNTS:
        return f"{SAMPLE} has {counts['train']} train + {counts['test']} test tiles, not 300 + 24", False
    return None


@pytest.fixture(scope="session", autouse=True)
def torchrun_logs(tmp_path_factory):
    """torchrun makes a log folder per launch (/tmp/torchelastic_*) and never removes it: the suite's
    hundreds of launches put theirs under pytest's own temporary folder (PET_LOG_DIR is --log-dir)."""
    os.environ.setdefault("PET_LOG_DIR", str(tmp_path_factory.mktemp("torchelastic")))


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The 300 real train tiles + 24 test tiles in the challenge layout (read-only).

    Skipped where the sample is absent (a fresh clone); a failure under CI, with DIST_LC_REQUIRE_SAMPLE=1
    or DIST_LC_SHARED set, or when a folder is there but is not the sample."""
    found = sample_problem()
    if found is not None:
        problem, absent = found
        if absent and not sample_required():
            pytest.skip(SAMPLE_SKIP)
        pytest.fail(f"{SAMPLE_WHAT} required here (CI=true, DIST_LC_REQUIRE_SAMPLE=1 or DIST_LC_SHARED set) "
                    f"but {problem}: {SAMPLE_HOW}", pytrace=False)
    return SAMPLE


@pytest.fixture(scope="session")
def packed_sample(sample_root, tmp_path_factory) -> Path:
    """The real sample packed into 5 fold-pure shard groups (seed 0), shared by every test."""
    from shard_tools.pack import pack

    out = tmp_path_factory.mktemp("shards") / "s2glc"
    pack(sample_root, out, folds=5, seed=0, samples_per_shard=16, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_shards(sample_root, tmp_path_factory) -> Path:
    """60 train tiles (5 folds of 12) and 8 test tiles of the real sample, packed."""
    from shard_tools.pack import pack

    src = tmp_path_factory.mktemp("tiny-src")
    for split, count in (("train", 60), ("test", 8)):
        names = sorted(os.listdir(sample_root / split / "images"), key=lambda n: int(n.split(".")[0]))[:count]
        for kind in ("images", "masks") if split == "train" else ("images",):
            (src / split / kind).mkdir(parents=True)
            for name in names:
                (src / split / kind / name).symlink_to(sample_root / split / kind / name)
    out = tmp_path_factory.mktemp("tiny") / "shards"
    pack(src, out, folds=5, seed=0, samples_per_shard=8, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def smoke_run(packed_sample, tmp_path_factory) -> Path:
    """One epoch of the smoke recipe on fold 0 of the real shards (single process): a run folder."""
    from dist_lc.config import load_config
    from dist_lc.train import train

    run = tmp_path_factory.mktemp("smoke") / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"data.shards={packed_sample}", "data.crop=32",
                                                       "train.epochs=1", "data.workers=0", "train.plot_every=0"])
    train(cfg, run)
    return run


# ------------------------------------------------------------- summary: sample skips, fault injection

FAULT_OUTCOMES: list[tuple[str, str]] = []
SAMPLE_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    """Tests marked ``fault`` are scenarios of tests/test_faults.py: each one survived or not."""
    if report.when == "call" and "fault" in report.keywords:
        FAULT_OUTCOMES.append((report.nodeid.split("::", 1)[-1], "survived" if report.passed else "FAILED"))
    if report.skipped and isinstance(report.longrepr, tuple) and SAMPLE_SKIP in str(report.longrepr[2]):
        SAMPLE_SKIPPED.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    # pytest -q lists no skip reasons by default: say once why so many tests did not run.
    if SAMPLE_SKIPPED:
        terminalreporter.write_line(f"{len(SAMPLE_SKIPPED)} skipped: {SAMPLE_SKIP}", yellow=True)
    if FAULT_OUTCOMES:
        terminalreporter.section("fault injection")
        for name, outcome in FAULT_OUTCOMES:
            terminalreporter.write_line(f"fault {outcome}: {name}")
        survived = sum(outcome == "survived" for _, outcome in FAULT_OUTCOMES)
        terminalreporter.write_line(f"faults survived: {survived} of {len(FAULT_OUTCOMES)}")
