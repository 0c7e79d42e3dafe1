"""Video sets stored as trees: JPEGImages/<video>/<frame>.jpg + Annotations/<video>/<frame>.png.

DAVIS 2017 (480p, the train list), YouTubeVOS (train_480p) and an extracted BL30K share this
shape; `open_davis`, `open_youtube` and `open_bl30k_tree` find the tree under the root a user
passes (the official download's top directory or the tree itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipelines.sources.base import LayoutError, Video, list_dir

DAVIS_LAYOUT = ("DAVIS/2017/trainval/{JPEGImages,Annotations}/480p/<video>/00000.{jpg,png} "
                "and DAVIS/2017/trainval/ImageSets/2017/train.txt (pass DAVIS, DAVIS/2017 or "
                "DAVIS/2017/trainval)")
YOUTUBE_LAYOUT = ("YouTube/train_480p/{JPEGImages,Annotations}/<video>/00000.{jpg,png}, "
                  "frames every 5th (pass YouTube or YouTube/train_480p)")
#: The published training lists, shipped as package data (pipelines/lists/).
PUBLISHED_LISTS = {"davis": "davis_train_subset.txt", "youtube": "youtube_vos_train_subset.txt"}
SUBSET_HELP = ("`published` (the published train list: 60 DAVIS / 3464 YouTubeVOS videos), "
               "`all` (every video of the source) or a FILE of video names, one per line")
BL30K_LAYOUT = ("BL30K/{JPEGImages,Annotations}/<video>/00000.{jpg,png} (pass BL30K or its "
                "parent), or a directory of the BL30K_*.tar archives")


@dataclass
class VideoTree:
    """A set of videos on disk; also the FrameStore its clips read from."""
    kind: str                 # "davis" | "youtube" | "bl30k"
    image_dir: Path
    mask_dir: Path
    videos: list[Video]
    #: raw frames between consecutive listed frames (YouTubeVOS lists every 5th frame)
    frame_step: int = 1
    #: listed videos left out because no triplet fits (fewer than 3 frames)
    too_short: tuple[str, ...] = ()

    def read(self, video: str, frame: str) -> tuple[bytes, bytes]:
        return ((self.image_dir / video / f"{frame}.jpg").read_bytes(),
                (self.mask_dir / video / f"{frame}.png").read_bytes())


def _scan(kind: str, image_dir: Path, mask_dir: Path, names: list[str] | None,
          layout: str, frame_step: int = 1) -> VideoTree:
    if names is None:
        names = list_dir(image_dir, layout)
    videos, too_short = [], []
    for name in names:
        frames = [f[:-4] for f in list_dir(image_dir / name, layout) if f.lower().endswith(".jpg")]
        if len(frames) < 3:  # no triplet fits (published rule); reported by the job
            too_short.append(name)
            continue
        masks = set(list_dir(mask_dir / name, layout))
        missing = [f for f in frames if f"{f}.png" not in masks]
        if missing:
            raise LayoutError(mask_dir / name, f"no annotation {missing[0]}.png for frame "
                              f"{missing[0]}.jpg ({len(missing)} missing)", layout)
        videos.append(Video(name, tuple(frames)))
    if not videos:
        raise LayoutError(image_dir, "no video with at least 3 frames", layout)
    return VideoTree(kind, image_dir, mask_dir, videos, frame_step, tuple(too_short))


def read_list(path) -> list[str]:
    """Video names of a list file, one per line (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def subset_names(kind: str, subset: str) -> tuple[str, list[str] | None]:
    """(where the list comes from, its names) for --subset; names None means every video."""
    if subset == "all":
        return "all", None
    if subset == "published":
        if kind not in PUBLISHED_LISTS:
            raise ValueError(f"no published list for {kind}; pass --subset all or a FILE")
        ref = resources.files("pipelines") / "lists" / PUBLISHED_LISTS[kind]
        return f"the published {kind} train list", read_list(ref)
    if not Path(subset).is_file():
        raise ValueError(f"--subset {subset}: no such list file; expected {SUBSET_HELP}")
    return str(subset), read_list(subset)


def _select(kind: str, image_dir: Path, available: list[str], subset: str) -> list[str]:
    """The names of `subset` (see subset_names), each checked to be in the source."""
    origin, names = subset_names(kind, subset)
    if names is None:
        return available
    have = set(available)
    absent = [n for n in names if n not in have]
    if absent:
        raise ValueError(f"{image_dir}: video {absent[0]!r} of {origin} is missing "
                         f"({len(absent)} of {len(names)} missing); pass --subset all to use "
                         "every video of the source, or --subset FILE with your own list")
    return names


def open_davis(root: str | Path, subset: str = "published") -> VideoTree:
    """DAVIS 2017 train videos at 480p: `subset` (see subset_names; `all` is the split's
    ImageSets/2017/train.txt)."""
    root = Path(root)
    for base in (root, root / "trainval", root / "2017" / "trainval"):
        if (base / "JPEGImages" / "480p").is_dir():
            break
    else:
        raise LayoutError(root, "no JPEGImages/480p found", DAVIS_LAYOUT)
    split = base / "ImageSets" / "2017" / "train.txt"
    if not split.is_file():
        raise LayoutError(split, "missing train list", DAVIS_LAYOUT)
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    image_dir = base / "JPEGImages" / "480p"
    absent = [n for n in names if not (image_dir / n).is_dir()]
    if absent:
        raise LayoutError(image_dir / absent[0], f"video listed in {split} is missing "
                          f"({len(absent)} missing)", DAVIS_LAYOUT)
    if subset != "all":  # a list may name any video of the 480p tree
        names = _select("davis", image_dir, list_dir(image_dir, DAVIS_LAYOUT), subset)
    return _scan("davis", image_dir, base / "Annotations" / "480p", names, DAVIS_LAYOUT)


def open_youtube(root: str | Path, subset: str = "published") -> VideoTree:
    """YouTubeVOS train_480p videos of `subset` (see subset_names): every listed frame is
    annotated, frames are 5 raw frames apart."""
    root = Path(root)
    base = root / "train_480p" if (root / "train_480p").is_dir() else root
    if not (base / "JPEGImages").is_dir():
        raise LayoutError(root, "no train_480p/JPEGImages found", YOUTUBE_LAYOUT)
    image_dir = base / "JPEGImages"
    names = _select("youtube", image_dir, list_dir(image_dir, YOUTUBE_LAYOUT), subset)
    return _scan("youtube", image_dir, base / "Annotations", names, YOUTUBE_LAYOUT, frame_step=5)


def open_bl30k_tree(root: str | Path) -> VideoTree:
    """An extracted BL30K: JPEGImages/ and Annotations/ per video."""
    root = Path(root)
    base = root / "BL30K" if (root / "BL30K" / "JPEGImages").is_dir() else root
    if not (base / "JPEGImages").is_dir():
        raise LayoutError(root, "no JPEGImages/ found", BL30K_LAYOUT)
    return _scan("bl30k", base / "JPEGImages", base / "Annotations", None, BL30K_LAYOUT)
