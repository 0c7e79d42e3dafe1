"""Shards and their part records on storage: what makes a job resumable and idempotent.

A unit's shard is written atomically (shards.write_shard), THEN its part record
`_parts/<shard>.json` (a one-shard manifest carrying the job config). A rerun skips every
shard whose part record exists with the same config and whose file has the recorded size,
and regenerates the others (byte-identical: clips are pure functions of the seed). Killed at
any point, a rerun ends with exactly the same shard set as an uninterrupted run. An archive
unit also gets `_parts/<archive>.archive.json` listing its shards, once all are written.

`merge` collects the part records into `manifest.json` once every unit is done. Nothing in
the manifest depends on --workers or --num-tasks.
"""
from __future__ import annotations

import math
import re
import sys

import shards
from shards import storage

from pipelines.job.config import JobError
from pipelines.job.units import Plan, unit_name
from pipelines.sources import archive_name

PARTS = "_parts"


def part_url(out: str, shard_name: str) -> str:
    return storage.join(storage.join(out, PARTS), shard_name.removesuffix(".tar") + ".json")


def archive_record_url(out: str, url: str) -> str:
    return storage.join(storage.join(out, PARTS), f"{archive_name(url)}.archive.json")


def shard_done(plan: Plan, shard_name: str) -> shards.ShardInfo | None:
    """The recorded ShardInfo if this shard is complete and made with this config."""
    url = part_url(plan.job.out, shard_name)
    if not storage.exists(url):
        return None
    part = shards.read_manifest(url)
    if part.config != plan.config:
        raise JobError(f"{plan.job.out} holds shards made with another config (see {url}); "
                       "write to a new --out, or delete that set to regenerate it")
    info = part.shards[0]
    if storage.size(storage.join(plan.job.out, shard_name)) != info.bytes:
        return None
    return info


def _record(plan: Plan, shard_name: str, info: shards.ShardInfo) -> shards.ShardInfo:
    shards.write_manifest(part_url(plan.job.out, shard_name),
                          shards.Manifest(shards=[info], config=plan.config))
    return info


def write_shard_bytes(plan: Plan, shard_name: str, encoded: list) -> shards.ShardInfo:
    """Write one shard of encoded samples, then its part record (in that order: see module
    doc)."""
    info = shards.write_encoded_shard(storage.join(plan.job.out, shard_name), encoded)
    return _record(plan, shard_name, info)


def archive_done(plan: Plan, url: str) -> list[shards.ShardInfo] | None:
    """The shards of archive `url` if its record exists with this config and every one of
    them is complete."""
    record = archive_record_url(plan.job.out, url)
    if not storage.exists(record):
        return None
    manifest = shards.read_manifest(record)
    if manifest.config == plan.config and all(shard_done(plan, s.name) for s in manifest.shards):
        return manifest.shards
    return None


def write_archive_record(plan: Plan, url: str, infos: list[shards.ShardInfo]) -> None:
    shards.write_manifest(archive_record_url(plan.job.out, url),
                          shards.Manifest(shards=infos, config=plan.config))


def remove_stale_temps(out: str, mine) -> None:
    """Delete temporary files a killed run left for this task's shards and records (atomic
    writes go through hidden `.NAME.tmp-*` files, see shards.storage); `mine(stem)` says
    whether a target belongs to this task. Called under the set's lease (shards.lease), so
    their writer is dead: a live one would hold the lease, or be this very job's other
    task, whose units `mine` excludes."""
    removed = 0
    for directory in (out, storage.join(out, PARTS)):
        for entry in storage.listdir(directory):  # [] when there is no such directory
            target = storage.temp_target(entry.rsplit("/", 1)[-1])
            match = re.fullmatch(r"(.+)\.(tar|json)", target or "")
            if match and mine(match.group(1)):
                storage.remove(entry)
                removed += 1
    if removed:
        print(f"make_shards: removed {removed} temporary file(s) in {out} left by a killed run",
              file=sys.stderr)


def merge(out: str) -> shards.Manifest:
    """Write `manifest.json` from the part records once every unit of the set is done;
    JobError naming what is missing otherwise."""
    entries = sorted(e.rsplit("/", 1)[-1] for e in storage.listdir(storage.join(out, PARTS)))
    if not entries:
        raise JobError(f"{out}: no {PARTS}/ records; is this a make_shards output?")
    records = {e for e in entries if e.endswith(".json") and not e.startswith(".")}
    if not records:
        raise JobError(f"{out}: no finished unit yet")
    any_part = shards.read_manifest(storage.join(storage.join(out, PARTS), sorted(records)[0]))
    config = any_part.config
    if "archives" in config:
        expected = [f"{a}.archive.json" for a in config["archives"]]
    else:
        units = math.ceil(config["clips"] / config["clips_per_shard"])
        expected = [unit_name(u).removesuffix(".tar") + ".json" for u in range(units)]
    missing = [e for e in expected if e not in records]
    if missing:
        raise JobError(f"{len(missing)} of {len(expected)} units of {out} are not finished "
                       f"(first: {missing[0].removesuffix('.json')})")
    parts = [shards.read_manifest(storage.join(storage.join(out, PARTS), e)) for e in expected]
    manifest = shards.merge_manifests(parts)
    shards.write_manifest(out, manifest)
    return manifest
