"""Shard set manifest: `manifest.json` beside the `*.tar` shards of one set.

    {"version": 2,
     "schema": {member name: what it holds},
     "shards": [{"name": "shard-000000.tar", "count": 1000, "bytes": 123, "sha256": "..."}],
     "config": {... whatever generated the set ...}}

Shard names are relative to the manifest's directory. Readers plan epochs from the counts
alone (no listing of the store) and check bytes/sha256 when they open a shard.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import codec, storage

#: 2: static clips carry soft masks (codec.SOFT); version 1 sets lack them.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SCHEMA = {
    "__key__": "sample key, unique within the shard set, no dots",
    codec.FRAMES: "T RGB frames stacked vertically as one (T*H, W, 3) JPEG",
    codec.MASKS: "uint8 (T, H, W) object-id label maps (0 = background): "
                 "header <3H (T, H, W), then the raw bytes zlib-compressed",
    codec.SOFT: "optional (static clips): uint8 (T, H, W) soft masks, 0..255 for 0..1, "
                "in the label maps' format; the label maps hold soft > 0.5",
    codec.META: "JSON metadata: source set, video, frame indices, max_skip, seed, "
                "objects, augmentation parameters",
}


class ManifestError(ValueError):
    """A manifest is missing, malformed or inconsistent with another one."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    version: int = FORMAT_VERSION
    schema: dict = field(default_factory=lambda: dict(SCHEMA))
    shards: list[ShardInfo] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "schema": self.schema,
                           "shards": [asdict(s) for s in self.shards], "config": self.config},
                          indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
            manifest = cls(version=int(raw["version"]), schema=dict(raw["schema"]),
                           shards=[ShardInfo(str(s["name"]), int(s["count"]), int(s["bytes"]),
                                             str(s["sha256"])) for s in raw["shards"]],
                           config=dict(raw.get("config", {})))
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"{where}: not a valid shard manifest "
                                f"({type(err).__name__}: {err})") from None
        if manifest.version < FORMAT_VERSION:
            raise ManifestError(f"{where}: shard format version {manifest.version} is older "
                                f"than this code's {FORMAT_VERSION} (static clips now carry "
                                "soft masks); remake the set with `tools/make_shards ...` "
                                "(the same command that made it)")
        if manifest.version != FORMAT_VERSION:
            raise ManifestError(f"{where}: shard format version {manifest.version}, this code "
                                f"reads version {FORMAT_VERSION}; update the code")
        names = [s.name for s in manifest.shards]
        unsafe = [n for n in names if not _safe_name(n)]
        if unsafe:
            raise ManifestError(f"{where}: shard name {unsafe[0]!r} leaves the set's directory "
                                "(absolute, a URL, or with '..'); shard names must be relative "
                                "paths inside it. Was the manifest edited or crafted?")
        if len(set(names)) != len(names):
            raise ManifestError(f"{where}: lists a shard twice")
        return manifest


def _safe_name(name: str) -> bool:
    """A shard name that stays inside the set's directory: relative, no '..', no scheme."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith(("/", "~")) and "://" not in name \
        and ":" not in parts[0] and ".." not in parts and "" not in parts


def manifest_url(url_dir: str) -> str:
    return url_dir if url_dir.endswith(".json") else storage.join(url_dir, MANIFEST_NAME)


def write_manifest(url_dir: str, manifest: Manifest) -> str:
    """Atomically write `manifest.json` into `url_dir`; returns its URL."""
    url = manifest_url(url_dir)
    storage.write_bytes_atomic(url, manifest.to_json().encode("utf-8"))
    return url


def read_manifest(url_dir: str) -> Manifest:
    url = manifest_url(url_dir)
    try:
        text = storage.read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{url}: no manifest; is {url_dir} a shard set directory "
                            "(written by shards.ShardWriter / write_manifest)?") from None
    return Manifest.from_json(text, where=url)


def merge_manifests(manifests: list[Manifest]) -> Manifest:
    """One manifest for shards written by several jobs (e.g. one per work unit).

    All parts must share version, schema and config; shard names must be unique. The result
    lists the shards sorted by name, so the merge is independent of completion order."""
    if not manifests:
        raise ManifestError("merge_manifests needs at least one manifest")
    first = manifests[0]
    by_name: dict[str, ShardInfo] = {}
    for i, m in enumerate(manifests):
        for what in ("version", "schema", "config"):
            if getattr(m, what) != getattr(first, what):
                raise ManifestError(
                    f"cannot merge manifests: part {i} has a different {what} than part 0 "
                    f"({getattr(m, what)!r} != {getattr(first, what)!r}); shards generated with "
                    "different settings belong in different shard sets")
        for s in m.shards:
            if s.name in by_name:
                raise ManifestError(f"cannot merge manifests: shard {s.name} appears twice "
                                    f"(part {i} and an earlier part)")
            by_name[s.name] = s
    return Manifest(version=first.version, schema=dict(first.schema),
                    shards=[by_name[n] for n in sorted(by_name)], config=dict(first.config))
