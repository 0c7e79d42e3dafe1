"""Reading one tar shard as a stream of sample member groups, through shards.storage.

webdataset's tar iteration expects URLs it opens itself (or shell pipes); here the shard is
opened through shards.storage (any URL it reads, requests retried) and parsed by a small
streaming tar reader (`iter_tar`), so a broken shard surfaces as a `ShardError` naming it.
"""
from __future__ import annotations

import io
from typing import Iterator

from . import codec, storage
from .manifest import ShardInfo


class ShardError(IOError):
    """A whole shard (or its tail) is unreadable: checksum mismatch, truncation, bad tar."""


def split_member_name(name: str) -> tuple[str, str]:
    """("dir/key", "frames.jpg") from "dir/key.frames.jpg" (the key ends at the first dot
    of the file name, as in webdataset)."""
    head, _, base = name.rpartition("/")
    key, dot, member = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return (f"{head}/{key}" if head else key), member


BLOCK = 512
_END = bytes(BLOCK)


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ").strip() or b"0", 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _read_exactly(fileobj, size: int, what: str) -> bytes:
    data = fileobj.read(size)
    if len(data) != size:
        raise EOFError(f"unexpected end of data in {what}")
    return data


def iter_tar(fileobj) -> Iterator[tuple[str, bytes]]:
    """(member name, data) of the regular files of an uncompressed tar, streaming.

    A small reader of our own: about 5x less overhead per member than tarfile's stream
    mode, and it is strict: a bad header checksum or a missing end-of-archive marker (a
    file cut at a member boundary) raises instead of ending quietly."""
    pax: dict[str, str] = {}
    long_name = None
    while True:
        header = fileobj.read(BLOCK)
        if not header:
            raise EOFError("no end-of-archive marker (truncated tar)")
        if len(header) != BLOCK:
            raise EOFError("unexpected end of data in a member header")
        if header == _END:
            return
        stored = _number(header[148:156])
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ValueError("tar header checksum mismatch (corrupt or not a tar)")
        kind = header[156:157]
        size = int(pax.get("size", _number(header[124:136])))
        name = _text(header[:100])
        if header[257:262] == b"ustar" and header[345] != 0:
            name = _text(header[345:500]) + "/" + name
        data = _read_exactly(fileobj, size, name)
        _read_exactly(fileobj, -size % BLOCK, name)
        if kind == b"x":  # PAX header: "LEN key=value\n" records for the next member
            pax = {}
            for record in data.decode("utf-8", "surrogateescape").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                pax[key] = value
            continue
        if kind == b"L":  # GNU long name for the next member
            long_name = _text(data)
            continue
        if kind in (b"0", b"\0", b"7"):
            yield pax.get("path") or long_name or name, data
        if kind != b"g":
            pax, long_name = {}, None


def _open_checked(url: str, info: ShardInfo | None, verify: bool):
    if verify and info is not None:
        try:
            # a remote mismatch is re-fetched first (a body cut short in transit)
            return io.BytesIO(storage.read_verified(url, info.bytes, info.sha256))
        except storage.ChecksumError as err:
            raise ShardError(str(err)) from None
    return storage.open_read(url)


def iter_shard(url: str, info: ShardInfo | None = None, verify: bool = True,
               data: bytes | None = None) -> Iterator[dict[str, bytes]]:
    """Yield {"__key__": key, member: bytes, ...} per sample, in tar order.

    With `verify` and a manifest entry, the shard is read whole and its size and sha256
    checked before anything is yielded. A truncated or malformed tar raises ShardError after
    the complete samples before the damage were yielded. `data`: the shard's bytes when
    the caller has them already (`url` then only names the shard in errors)."""
    try:
        fileobj = io.BytesIO(data) if data is not None else _open_checked(url, info, verify)
    except FileNotFoundError:
        raise ShardError(f"shard {storage.redact(url)}: not found") from None
    except storage.StorageError as err:  # retries exhausted, or a permanent error
        raise ShardError(f"shard {err}") from None
    current: dict[str, bytes] | None = None
    failure = None
    try:
        with fileobj:
            for name, data in iter_tar(fileobj):
                key, ext = split_member_name(name)
                if current is not None and current["__key__"] != key:
                    # a new key starts: the previous sample is complete, hand it out
                    # before reading on (damage further on must not take it along)
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[ext] = data
    except (EOFError, OSError, ValueError) as err:
        failure = err
    if current is not None and (failure is None or all(m in current for m in codec.MEMBERS)):
        yield current  # every member read in full
    if failure is not None:
        raise ShardError(f"shard {url}: unreadable tar after "
                         f"{'key ' + current['__key__'] if current else 'the start'} "
                         f"({type(failure).__name__}: {failure})")


def iter_samples(url_dir: str, verify: bool = True) -> Iterator[dict]:
    """Every decoded sample of a shard set, in manifest order (no shuffling, no skipping:
    errors propagate). For tools and tests; training reads through `make_loader`."""
    from .codec import decode_sample
    from .manifest import read_manifest

    for info in read_manifest(url_dir).shards:
        for members in iter_shard(storage.join(url_dir, info.name), info, verify):
            yield decode_sample(members)
