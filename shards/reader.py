"""Reading one tar shard as a stream of sample member groups, through fsspec.

webdataset's tar iteration expects URLs it opens itself (or shell pipes); here the shard is
opened with fsspec and parsed with the standard library's streaming tar reader, so every
fsspec URL works and a broken shard surfaces as a `ShardError` naming the shard.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
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


def _open_checked(url: str, info: ShardInfo | None, verify: bool):
    if verify and info is not None:
        data = storage.read_bytes(url)
        if len(data) != info.bytes:
            raise ShardError(f"shard {url}: {len(data)} bytes, manifest says {info.bytes} "
                             "(truncated or rewritten shard)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(f"shard {url}: sha256 {digest[:12]}... does not match the "
                             f"manifest's {info.sha256[:12]}... (corrupt or rewritten shard)")
        return io.BytesIO(data)
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
        raise ShardError(f"shard {url}: not found") from None
    current: dict[str, bytes] | None = None
    failure = None
    try:
        with fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and current["__key__"] != key:
                    # a new key starts: the previous sample is complete, hand it out
                    # before reading on (damage further on must not take it along)
                    yield current
                    current = None
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError("unexpected end of data")
                if current is None:
                    current = {"__key__": key}
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
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
