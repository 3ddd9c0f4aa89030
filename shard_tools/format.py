"""The data contract shared by the packer, the verifier and the trainer.

A shard is a WebDataset tar. One sample is a group of members sharing the key ``<id>``:

- ``<id>.image.npy``  uint16 array H×W×4 (bands R, G, B, NIR), raw ``.npy`` bytes
- ``<id>.mask.npy``   uint8 array H×W, class index 0..9 (train only)
- ``<id>.props.npy``  float64 array (10,), class proportions computed from the mask (train only)

Raw ``.npy`` was chosen by measurement (see docs/BENCHMARKS.md, "In-shard encoding").
Everything that reads or writes a sample goes through :func:`encode_sample` / :func:`decode_sample`.
"""
from __future__ import annotations

import io
import math

import numpy as np

from lc_common.errors import InputError, one_line
from lc_common.tiles import IMAGE_SHAPE, NUM_CLASSES, check_image, check_mask, class_proportions

FORMAT_VERSION = 1
ENCODING = {"image": "npy", "mask": "npy", "props": "npy"}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple] = {}   # header bytes → layout: every tile of a set shares one


def _npy_layout(data: bytes) -> tuple:
    """(dtype, shape, data offset, element count) of .npy bytes, parsed once per distinct header."""
    if bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not .npy bytes (no magic)")
    major = data[6]
    offset = (10 + int.from_bytes(data[8:10], "little")) if major == 1 else (12 + int.from_bytes(data[8:12], "little"))
    header = bytes(data[:offset])
    layout = _NPY_HEADERS.get(header)
    if layout is None:
        stream = io.BytesIO(header)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
        if fortran or dtype.hasobject:
            raise ValueError("a Fortran-ordered or object array")
        layout = _NPY_HEADERS.setdefault(header, (dtype, shape, offset, math.prod(shape)))
    return layout


def _npy_array(data: bytes, what: str, key: str) -> np.ndarray:
    """A read-only array over the bytes (no copy)."""
    try:
        dtype, shape, offset, count = _npy_layout(data)
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(f"{len(data) - offset} data bytes for {shape} {dtype}")
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt sample
        raise InputError(f"sample {key!r}: cannot decode {what}: {one_line(exc)}") from None


def encode_sample(key: str, image: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """The dict that ``webdataset.TarWriter.write`` takes for one sample."""
    if "." in key:
        raise InputError(f"sample id {key!r} contains a dot (WebDataset keys stop at the first dot)")
    sample = {"__key__": key, "image.npy": _npy_bytes(image)}
    if mask is not None:
        sample["mask.npy"] = _npy_bytes(mask)
        sample["props.npy"] = _npy_bytes(class_proportions(mask))
    return sample


def decode_sample(sample: dict) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(key, image, mask, props)`` from a raw WebDataset sample (bytes values); mask/props None for test."""
    key = sample["__key__"]
    if "image.npy" not in sample:
        raise InputError(f"sample {key!r}: no image member")
    image = _npy_array(sample["image.npy"], "image", key)
    mask = _npy_array(sample["mask.npy"], "mask", key) if "mask.npy" in sample else None
    props = _npy_array(sample["props.npy"], "props", key) if "props.npy" in sample else None
    return key, image, mask, props


MEMBERS = {"train": frozenset({"image.npy", "mask.npy", "props.npy"}), "test": frozenset({"image.npy"})}


def decode_checked(sample: dict, split: str) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`decode_sample` of a sample of ``split`` with what training and prediction rely on checked:
    the split's members, the image's bands and dtype, the mask's size and classes (a class above 9 would fail
    deep in the loss, on a GPU as a device-side assert), the props' shape. ``lc-shard verify`` also
    checks the tile's side and the props against the mask, which costs a count of its pixels. Messages start with ``sample '<key>'``."""
    key = sample["__key__"]
    where = f"sample {key!r}"
    members = set(sample) - {"__key__"}
    if members != MEMBERS[split]:
        raise InputError(f"{where}: members {sorted(members)}, a {split} sample has {sorted(MEMBERS[split])}")
    key, image, mask, props = decode_sample(sample)
    side = image.shape[:2]   # pack and verify hold tiles to 256²; any side here keeps small test tiles readable
    check_image(image.shape, image.dtype, where, expected=(*side, IMAGE_SHAPE[2]))
    if mask is not None:
        check_mask(mask, where, expected=side)
    if props is not None and (props.dtype != np.float64 or props.shape != (NUM_CLASSES,)):
        raise InputError(f"{where}: props {props.dtype} {props.shape}, expected float64 ({NUM_CLASSES},)")
    return key, image, mask, props
