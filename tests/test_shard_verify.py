"""verify: a good folder passes; each kind of damage fails, naming the shard (and the sample when known)."""
from __future__ import annotations

import io
import json
import shutil
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lc_common.errors import InputError
from shard_tools.cli import main
from shard_tools.pack import pack
from shard_tools.verify import verify

SHARD = "train-f1-000000.tar"


@pytest.fixture(scope="module")
def small_packed(sample_root, tmp_path_factory) -> Path:
    """12 real train tiles (2 folds, 3 per shard) and 2 real test tiles, packed once for this module."""
    src = tmp_path_factory.mktemp("verify") / "src"
    train_ids = sorted((p.stem for p in (sample_root / "train/images").glob("*.tif")), key=int)[:12]
    test_ids = sorted(p.stem for p in (sample_root / "test/images").glob("*.tif"))[:2]
    for sub, ids in (("train/images", train_ids), ("train/masks", train_ids), ("test/images", test_ids)):
        (src / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(sample_root / sub / f"{i}.tif", src / sub / f"{i}.tif")
    out = src.parent / "shards"
    pack(src, out, folds=2, samples_per_shard=3, workers=0, progress=False)
    return out


@pytest.fixture
def shards(small_packed, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(small_packed, tmp_path / "shards"))


def _member(shard: Path, suffix: str, index: int = 0) -> tarfile.TarInfo:
    with tarfile.open(shard) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][index]


def _patch(shard: Path, offset: int, value: int) -> None:
    data = bytearray(shard.read_bytes())
    data[offset] = value
    shard.write_bytes(bytes(data))


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _edit_manifest(root: Path, edit) -> None:
    data = _manifest(root)
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data))


def _fails(root: Path, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        verify(root)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_real_sample_verifies(packed_sample):
    verify(packed_sample)


def test_cli_ok_and_failure(shards, capsys):
    assert main(["verify", str(shards)]) == 0
    (shards / SHARD).unlink()
    assert main(["verify", str(shards)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and SHARD in err and err.count("\n") == 1


def test_flipped_pixel_byte_is_a_sha_mismatch(shards):
    image = _member(shards / SHARD, ".image.npy")
    offset = image.offset_data + 128 + 5000  # past the .npy header, inside the pixels
    _patch(shards / SHARD, offset, (shards / SHARD).read_bytes()[offset] ^ 0x01)
    _fails(shards, SHARD, "sha256 mismatch")


def test_flipped_mask_byte_names_the_sample(shards):
    mask = _member(shards / SHARD, ".mask.npy", index=1)
    key = mask.name.split(".")[0]
    offset = mask.offset_data + 128 + 1000
    _patch(shards / SHARD, offset, (shards / SHARD).read_bytes()[offset] % 9 + 1)  # another class, 1..9
    _fails(shards, SHARD, f"sample {key!r}", "props differ from the class proportions of its mask")


def test_mask_value_above_9_names_the_sample(shards):
    mask = _member(shards / SHARD, ".mask.npy", index=2)
    _patch(shards / SHARD, mask.offset_data + 128 + 77, 200)
    _fails(shards, SHARD, f"sample {mask.name.split('.')[0]!r}", "mask value 200 above 9")


def test_flipped_header_byte(shards):
    _patch(shards / SHARD, 3, ord("#"))  # inside the first member's name: its header checksum fails
    _fails(shards, SHARD, "corrupt tar")


CLAIMED = 0o77777777770   # ~8.6 GB, the most an 11-digit octal size field holds


def _lie_about_size(shard: Path, size: int = CLAIMED, kind: bytes = b"0") -> None:
    """The first member's header claims ``size`` bytes (and is of ``kind``) with its checksum recomputed."""
    data = bytearray(shard.read_bytes())
    data[124:136] = b"%011o\0" % size
    data[156:157] = kind
    data[148:156] = b" " * 8   # the checksum is summed over the header with its own field as spaces
    data[148:156] = b"%06o\0 " % sum(data[:512])
    shard.write_bytes(bytes(data))


class _CappedStream(io.BytesIO):
    """A stream where memory is capped: a read allocates what it asks for, so asking for gigabytes fails."""

    def read(self, size=-1):
        if size is None or size < 0 or size > 1 << 30:
            raise MemoryError(f"read({size})")
        return super().read(size)


@pytest.mark.parametrize("kind, strict, problem", [(b"0", True, "the tar ends inside member"),
                                                    (b"x", False, "the tar ends inside a header")],
                         ids=["member", "pax header"])
def test_a_header_claiming_gigabytes_is_a_truncated_tar_not_a_huge_read(shards, kind, strict, problem):
    from shard_tools import tarstream

    _lie_about_size(shards / SHARD, kind=kind)
    with pytest.raises(tarstream.TarError, match=problem):
        list(tarstream.samples(_CappedStream((shards / SHARD).read_bytes()), strict=strict))


def test_verify_of_a_header_claiming_gigabytes_is_one_line_where_memory_is_capped(shards):
    """As a user runs it: an address-space limit below the claimed size (a batch job's memory limit)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    _lie_about_size(shards / SHARD)
    # BLAS reserves address space per thread: on a many-core host the cap would bite at import
    quiet = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "shard_tools", "verify", str(shards)], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit, env=quiet)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert SHARD in proc.stderr and "truncated or corrupt tar" in proc.stderr, proc.stderr


def test_truncated_shard_names_the_sample(shards):
    mask = _member(shards / SHARD, ".mask.npy", index=1)
    data = (shards / SHARD).read_bytes()
    (shards / SHARD).write_bytes(data[: mask.offset_data + 100])
    _fails(shards, SHARD, "truncated", f"sample {mask.name.split('.')[0]!r}")


def test_shard_truncated_at_a_sample_boundary(shards):
    props = _member(shards / SHARD, ".props.npy", index=1)
    data = (shards / SHARD).read_bytes()
    (shards / SHARD).write_bytes(data[: props.offset_data + 512])  # two whole samples, no end-of-archive
    _fails(shards, SHARD, "2 samples, manifest says 3")


def test_missing_shard(shards):
    (shards / "test-000000.tar").unlink()
    _fails(shards, "test-000000.tar", "shard missing")


def test_manifest_count_differs(shards):
    _edit_manifest(shards, lambda d: d["shards"][1].update(count=d["shards"][1]["count"] + 1))
    name = _manifest(shards)["shards"][1]["name"]
    _fails(shards, name, "3 samples, manifest says 4")


def test_manifest_keys_differ(shards):
    def rename(data):
        entry = next(s for s in data["shards"] if s["name"] == SHARD)
        entry["keys"][1] = "999999"
    _edit_manifest(shards, rename)
    _fails(shards, SHARD, "keys differ", "'999999'")


def test_manifest_fold_table_differs(shards):
    def move(data):
        key = next(s for s in data["shards"] if s["name"] == SHARD)["keys"][0]
        data["folds"][key] = 0
    _edit_manifest(shards, move)
    _fails(shards, SHARD, "by the manifest's folds, the shard is fold 1")


def test_manifest_sha_or_size_differs(shards):
    _edit_manifest(shards, lambda d: d["shards"][0].update(sha256="0" * 64))
    _fails(shards, _manifest(shards)["shards"][0]["name"], "sha256 mismatch")
    _edit_manifest(shards, lambda d: d["shards"][0].update(bytes=d["shards"][0]["bytes"] + 512))
    _fails(shards, "bytes, manifest says")


def test_manifest_class_pixels_differ(shards):
    _edit_manifest(shards, lambda d: d["fold_class_pixels"]["0"].__setitem__(3, 1))
    _fails(shards, "fold 0 class pixels")


def test_manifest_channel_stats_differ(shards):
    _edit_manifest(shards, lambda d: d["channel_stats"]["mean"].__setitem__(2, 1.0))
    _fails(shards, "channel mean")


def test_stray_shard(shards):
    shutil.copy(shards / SHARD, shards / "train-f1-000009.tar")
    _fails(shards, "train-f1-000009.tar", "not listed in the manifest")


def test_unknown_encoding_is_refused(shards):
    _edit_manifest(shards, lambda d: d.update(encoding={"image": "zstd", "mask": "npy", "props": "npy"}))
    _fails(shards, "manifest.json", "encoding", "this tool decodes")


def test_no_manifest(shards):
    (shards / "manifest.json").unlink()
    _fails(shards, "no manifest")


def test_several_problems_are_counted(shards):
    (shards / "test-000000.tar").unlink()
    (shards / SHARD).unlink()
    message = _fails(shards, "shard missing")
    assert message.endswith("(and 1 more problem(s))")


def test_props_member_must_equal_mask_proportions(shards):
    props = _member(shards / SHARD, ".props.npy")
    offset = props.offset_data + 128 + 8 * 3  # the float64 of class 3
    data = bytearray((shards / SHARD).read_bytes())
    data[offset:offset + 8] = np.float64(0.5).tobytes()
    (shards / SHARD).write_bytes(bytes(data))
    _fails(shards, SHARD, "props differ")


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d["shards"][0].update(name="train-f0-000000.tar; touch /tmp/x #"), "not a shard's name"),
    (lambda d: d["shards"][0].update(count="3"), "not counts"),
    (lambda d: d["shards"][0].pop("split"), "lacks split"),
    (lambda d: d["shards"][-1].update(fold=0), "fold 0 for a test shard"),
    (lambda d: d["fold_class_pixels"].pop("1"), "fold_class_pixels lacks a list"),
    (lambda d: d.update(num_folds=0), "num_folds 0"),
])
def test_a_manifest_its_readers_cannot_use_is_refused_on_loading(shards, edit, problem):
    from shard_tools.manifest import load_manifest

    _edit_manifest(shards, edit)
    with pytest.raises(InputError, match=problem):
        load_manifest(shards)
    assert main(["describe", str(shards)]) == 2


def test_a_pipe_folder_needs_the_name_placeholder(shards):
    from shard_tools.manifest import load_manifest

    with pytest.raises(InputError, match="needs {name}"):
        load_manifest(f"pipe:cat {shards}/manifest.json")
    with pytest.raises(InputError, match="no reader for 's3' URLs"):
        load_manifest("s3://bucket/shards")


def _trainer_reads(root: Path, shard: str):
    from dist_lc.data import Segment, decoded_segment

    count = next(s["count"] for s in _manifest(root)["shards"] if s["name"] == shard)
    return list(decoded_segment(Segment(str(root / shard), 0, count), "train"))


def test_the_trainer_refuses_a_mask_class_above_9_naming_the_shard(shards):
    member = _member(shards / SHARD, ".mask.npy", 1)
    _patch(shards / SHARD, member.offset_data + member.size - 1, 12)   # the mask's last pixel
    with pytest.raises(InputError, match=rf"{SHARD}: sample '\w+': mask value 12 above 9"):
        _trainer_reads(shards, SHARD)


def test_the_trainer_refuses_a_sample_that_lost_a_member_naming_the_shard(shards):
    member = _member(shards / SHARD, ".props.npy", 2)   # the last sample's last member
    data = bytearray((shards / SHARD).read_bytes())
    data[member.offset:member.offset + 512] = bytes(512)   # its header zeroed: the tar seems to end there
    (shards / SHARD).write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"{SHARD}: sample '\w+': members \['image.npy', 'mask.npy'\]"):
        _trainer_reads(shards, SHARD)
