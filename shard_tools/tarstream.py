"""Samples of a WebDataset tar shard, read member by member without the tarfile module.

A sample is the run of consecutive members whose names share the text before the first dot (the
WebDataset convention). The shards ``pack`` writes hold regular files only, with short names; this
reader also takes directories (skipped), GNU long names and pax headers (their ``path`` and ``size``
applied to the next member), and checks every header's checksum and size, so that damage is reported
where it is instead of being read as data.

Skipping is cheap: the members of the first ``skip`` samples, and members not asked for, are passed
over with a seek on a local file (read and dropped on a stream such as a URL).
"""
from __future__ import annotations

import io

from lc_common.errors import InputError

BLOCK = 512
# The most one read asks for. A read allocates what it asks for before it knows what the stream holds,
# so a corrupt header that claims gigabytes (with a valid checksum) would be a MemoryError; in bounded
# reads it ends at the end of the stream, as a truncated tar. A shard's members (~0.5 MB) take one read.
READ_CHUNK = 16 << 20


class TarError(InputError):
    """A shard that is not a well-formed tar where it is read."""


def _read_exact(stream, size: int) -> bytes:
    """``size`` bytes of ``stream``, fewer only where it ends."""
    data = stream.read(min(size, READ_CHUNK))
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:   # pipes and sockets return what they have; a member above READ_CHUNK is read in parts
        more = stream.read(min(size - got, READ_CHUNK))
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _skip(stream, size: int, seekable: bool) -> None:
    if seekable:
        stream.seek(size, io.SEEK_CUR)
        return
    while size > 0:
        chunk = stream.read(min(size, 1 << 20))
        if not chunk:
            raise TarError("the tar ends inside a member")
        size -= len(chunk)


def _header(block: bytes) -> tuple[str, int, bytes]:
    """(name, data size, type flag) of a 512-byte header; TarError on a bad checksum."""
    stored = block[148:156].split(b"\0", 1)[0].strip()
    computed = sum(block) - sum(block[148:156]) + 8 * 32   # the checksum field counts as spaces
    try:
        if int(stored or b"-1", 8) != computed:
            raise ValueError
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarError("corrupt tar header (bad checksum)") from None
    if size < 0:   # a valid checksum over a negative size would seek backwards for ever
        raise TarError(f"corrupt tar header (member size {size})")
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
        name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
    return name, size, block[156:157]


def _pax(data: bytes) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header (``"%d %s=%s\n"``, length first)."""
    records, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        length, _, rest = data[at:].partition(b" ")
        try:
            n = int(length)
            key, _, value = rest[:n - len(length) - 1].rstrip(b"\n").partition(b"=")
        except ValueError:
            raise TarError("corrupt pax header") from None
        if n <= 0:
            raise TarError("corrupt pax header")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        at += n
    return records


def _described(name: str, size: int, long_name: str | None, pax: dict) -> tuple[str, int]:
    """A member's name and size as the GNU long-name or pax header before it gives them."""
    if "size" in pax:
        try:
            size = int(pax["size"])
        except ValueError:
            size = -1
        if size < 0:
            raise TarError(f"corrupt pax header (size {pax['size']!r})")
    return pax.get("path") or long_name or name, size


def members(stream, seekable: bool = False, strict: bool = False):
    """``(name, size, read)`` of every regular member, in order. ``read()`` returns the member's bytes;
    a member whose bytes the caller does not read is passed over. ``strict``: any other kind of
    member (a directory, a link, a pax header) is an error instead of being passed over."""
    long_name, pax = None, {}
    while True:
        block = _read_exact(stream, BLOCK)
        if not block or block == bytes(BLOCK):   # end of archive (or a tar cut at a member boundary)
            return
        if len(block) < BLOCK:
            raise TarError("the tar ends inside a header")
        name, size, kind = _header(block)
        padded = -(-size // BLOCK) * BLOCK
        if strict and kind not in (b"0", b"\0", b"7", b"L"):
            raise TarError(f"member {name!r} is not a regular file")
        if kind in (b"L", b"x"):   # GNU long name, pax header: they describe the next member
            data = _read_exact(stream, padded)
            if len(data) < size:
                raise TarError("the tar ends inside a header")
            if kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                pax = _pax(bytes(data[:size]))
            continue
        if kind not in (b"0", b"\0", b"7"):   # directories, links, global pax headers: nothing to yield
            _skip(stream, padded, seekable)
            long_name, pax = None, {}
            continue
        if long_name or pax:
            name, size = _described(name, size, long_name, pax)
            padded = -(-size // BLOCK) * BLOCK
        long_name, pax = None, {}
        done = []

        def read(name=name, size=size, padded=padded):
            """The member's bytes (a memoryview over the block-padded read: no copy to trim it)."""
            data = _read_exact(stream, padded)
            done.append(True)
            if len(data) < size:
                raise TarError(f"the tar ends inside member {name!r}")
            return memoryview(data)[:size] if padded != size else data

        yield name, size, read
        if not done:
            _skip(stream, padded, seekable)


def samples(stream, skip: int = 0, wanted=None, seekable: bool = False, seen: list | None = None,
            strict: bool = False):
    """Raw samples ``{"__key__": key, suffix: bytes, ...}`` after the first ``skip``, whose members are
    passed over unread, as are members whose suffix is not in ``wanted`` (None: all). ``seen``
    collects the key of every sample started, so that an error can name it."""
    index, key, sample = -1, None, None
    for name, _, read in members(stream, seekable, strict):
        this, _, suffix = name.partition(".")
        if this != key:
            if sample is not None:
                yield sample
            index, key = index + 1, this
            if seen is not None:
                seen.append(this)
            sample = {"__key__": this} if index >= skip else None
        if sample is not None and (wanted is None or suffix in wanted):
            sample[suffix] = read()
    if sample is not None:
        yield sample
