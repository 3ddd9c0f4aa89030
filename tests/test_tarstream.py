"""The shard reader on tars that other tools write: pax and GNU headers, and headers that lie."""
from __future__ import annotations

import io
import tarfile

import pytest

from shard_tools import tarstream

LONG = "k" * 120


def tar_of(members, fmt) -> io.BytesIO:
    """A tar of ``(name, bytes | None)``; None makes a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


@pytest.mark.parametrize("seekable", [False, True])
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_and_non_ascii_names_reach_their_own_member(fmt, seekable):
    members = [(f"{LONG}.image.npy", b"abc"), ("a.mask.npy", b"x" * 600), ("d" * 150, None),
               ("é.cls", b""), ("b.image.npy", b"hi")]
    got = [(name, bytes(read())) for name, _, read in tarstream.members(tar_of(members, fmt), seekable)]
    assert got == [(n, d) for n, d in members if d is not None]


def test_pax_size_overrides_the_header():
    big = tar_of([("a.npy", b"z" * 700)], tarfile.PAX_FORMAT).getvalue()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.npy")
        info.size, info.pax_headers = 700, {"size": "700"}
        tar.addfile(info, io.BytesIO(b"z" * 700))
    assert buf.getvalue() != big   # the pax record is there
    buf.seek(0)
    assert [(n, s) for n, s, _ in tarstream.members(buf)] == [("a.npy", 700)]


def header(name: bytes, size: bytes) -> bytes:
    block = bytearray(tarstream.BLOCK)
    block[:len(name)], block[124:124 + len(size)], block[156:157] = name, size, b"0"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize("seekable", [False, True])
def test_a_negative_member_size_is_refused_not_looped_over(seekable):
    stream = io.BytesIO(header(b"a.npy", b"-0000000001\0") + bytes(2 * tarstream.BLOCK))
    with pytest.raises(tarstream.TarError, match="member size -1"):
        list(tarstream.members(stream, seekable))
