"""Static image sets for stage 0 (pseudo clips from single images).

Two layouts: FSS-1000 (<class>/<n>.jpg + <class>/<n>.png) and flat (NAME.jpg + NAME.png:
DUTS-TR, DUTS-TE, ECSSD, BIG, HRSOD). BIG and HRSOD are higher quality and are repeated 5x
(published weights): every image appears `weight` times in the item list clips draw from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.sources.base import LayoutError, list_dir

#: (directory under the static root, layout, repeat weight), the published stage 0 mix.
STATIC_SETS = (("fss", "classes", 1), ("DUTS-TR", "flat", 1), ("DUTS-TE", "flat", 1),
               ("ecssd", "flat", 1), ("BIG_small", "flat", 5), ("HRSOD_small", "flat", 5))
STATIC_LAYOUT = ("STATIC/fss/<class>/<n>.jpg + .png (FSS-1000) and STATIC/{DUTS-TR,DUTS-TE,"
                 "ecssd,BIG_small,HRSOD_small}/NAME.jpg + NAME.png")


@dataclass(frozen=True)
class StaticItem:
    """One image and its mask; `name` is unique in the source (set/class/stem, copy)."""
    name: str
    image: Path
    mask: Path


@dataclass
class StaticSource:
    root: Path
    items: list[StaticItem]
    sets: dict[str, int]      # set name -> number of distinct images

    def read(self, item: StaticItem) -> tuple[bytes, bytes]:
        return item.image.read_bytes(), item.mask.read_bytes()


def _pairs(directory: Path, prefix: str) -> list[tuple[str, Path, Path]]:
    names = list_dir(directory, STATIC_LAYOUT)
    present = set(names)
    pairs = []
    for name in names:
        if not name.lower().endswith(".jpg"):
            continue
        stem = name[:-4]
        if f"{stem}.png" not in present:
            raise LayoutError(directory / name, "image without its mask "
                              f"{stem}.png", STATIC_LAYOUT)
        pairs.append((f"{prefix}{stem}", directory / name, directory / f"{stem}.png"))
    return pairs


def open_static(root: str | Path, sets: tuple[str, ...] | None = None) -> StaticSource:
    """The published static mix under `root`, or the named subset of its sets."""
    root = Path(root)
    known = {name: (layout, weight) for name, layout, weight in STATIC_SETS}
    sets = tuple(known) if sets is None else tuple(sets)
    unknown = [s for s in sets if s not in known]
    if unknown:
        raise ValueError(f"unknown static set(s) {unknown}; known: {list(known)}")
    items, counts = [], {}
    for set_name in sets:
        layout, weight = known[set_name]
        directory = root / set_name
        if layout == "classes":
            pairs = [p for c in list_dir(directory, STATIC_LAYOUT) if (directory / c).is_dir()
                     for p in _pairs(directory / c, f"{set_name}/{c}/")]
        else:
            pairs = _pairs(directory, f"{set_name}/")
        if not pairs:
            raise LayoutError(directory, "no NAME.jpg + NAME.png pair", STATIC_LAYOUT)
        counts[set_name] = len(pairs)
        items += [StaticItem(f"{name}#{copy}", image, mask)
                  for copy in range(weight) for name, image, mask in pairs]
    return StaticSource(root, items, counts)
