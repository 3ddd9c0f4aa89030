"""Shared fixtures: the real sample (read in place, never written) and its shards packed once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# As if the venv were activated: jobs started through sbatch/srun inherit this PATH and find the
# interpreter that runs the tests (CI runs `.venv/bin/python -m pytest` without activating).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
SHARED = Path(os.environ.get("DIST_LC_SHARED", REPO.parent / "shared"))
SAMPLE = SHARED / "data" / "s2glc-sample"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The 300 real train tiles + 24 test tiles in the challenge layout (read-only)."""
    if not (SAMPLE / "train_labels.csv").is_file():
        pytest.fail(f"real sample not found at {SAMPLE} (set DIST_LC_SHARED)")
    return SAMPLE


@pytest.fixture(scope="session")
def packed_sample(sample_root, tmp_path_factory) -> Path:
    """The real sample packed into 5 fold-pure shard groups (seed 0), shared by every test."""
    from shard_tools.pack import pack

    out = tmp_path_factory.mktemp("shards") / "s2glc"
    pack(sample_root, out, folds=5, seed=0, samples_per_shard=16, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def smoke_run(packed_sample, tmp_path_factory) -> Path:
    """One epoch of the smoke recipe on fold 0 of the real shards (single process): a run folder."""
    from dist_lc.config import load_config
    from dist_lc.train import train

    run = tmp_path_factory.mktemp("smoke") / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"data.shards={packed_sample}", "data.crop=32",
                                                       "train.epochs=1", "data.workers=0"])
    train(cfg, run)
    return run


# ----------------------------------------------------------------------------- fault-injection summary

FAULT_OUTCOMES: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    """Tests marked ``fault`` are scenarios of tests/test_faults.py: each one survived or not."""
    if report.when == "call" and "fault" in report.keywords:
        FAULT_OUTCOMES.append((report.nodeid.split("::", 1)[-1], "survived" if report.passed else "FAILED"))


def pytest_terminal_summary(terminalreporter):
    if FAULT_OUTCOMES:
        terminalreporter.section("fault injection")
        for name, outcome in FAULT_OUTCOMES:
            terminalreporter.write_line(f"fault {outcome}: {name}")
        survived = sum(outcome == "survived" for _, outcome in FAULT_OUTCOMES)
        terminalreporter.write_line(f"faults survived: {survived} of {len(FAULT_OUTCOMES)}")
