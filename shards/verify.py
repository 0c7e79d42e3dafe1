"""Checking a shard set against its manifest (tools/verify_shards)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from . import codec, console, storage
from .manifest import read_manifest
from .reader import ShardError, iter_shard


@dataclass
class VerifyReport:
    url: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard_set(url_dir: str, decode: bool = True, progress: bool = True) -> VerifyReport:
    """Check every shard of the set: present, size and sha256 as in the manifest, a
    readable tar holding the manifest's sample count, keys unique in the set, every sample
    complete and (with `decode`) decodable. Problems are collected, not raised."""
    report = VerifyReport(url_dir)
    try:
        manifest = read_manifest(url_dir)
    except Exception as err:  # a missing or malformed manifest is the report
        report.problems.append(str(err))
        return report
    seen: dict[str, str] = {}
    for info in console.progress(manifest.shards, desc=f"verify {url_dir}", unit="shard",
                                 enabled=progress):
        url = storage.join(url_dir, info.name)
        report.shards += 1
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            report.problems.append(f"{url}: missing")
            continue
        if len(data) != info.bytes:
            report.problems.append(f"{url}: {len(data)} bytes, manifest says {info.bytes}")
        if hashlib.sha256(data).hexdigest() != info.sha256:
            report.problems.append(f"{url}: sha256 does not match the manifest")
        count = 0
        try:
            # already checked above; parse these very bytes rather than reading again
            for members in iter_shard(url, info, verify=False, data=data):
                count += 1
                key = members["__key__"]
                if key in seen:
                    report.problems.append(f"{url}: key {key} also in {seen[key]}")
                seen[key] = info.name
                if decode:
                    try:
                        codec.decode_sample(members)
                    except codec.SampleDecodeError as err:
                        report.problems.append(f"{url}: {err}")
                else:
                    missing = [m for m in codec.MEMBERS if m not in members]
                    if missing:
                        report.problems.append(f"{url}: key {key} lacks {', '.join(missing)}")
        except ShardError as err:
            report.problems.append(str(err))
        if count != info.count:
            report.problems.append(f"{url}: {count} samples, manifest says {info.count}")
        report.samples += count
        console.debug(f"checked {url}: {count} samples, {len(data)} bytes")
    return report
