"""Shared fixtures: the real sample (read in place, never written) and its shards packed once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
