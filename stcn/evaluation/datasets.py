"""Evaluation sets in their distributed layouts, and loading one video for inference.

A reader turns a data set folder into an ``EvalSet``: the videos (frame files, the masks
given as input, the frames to write) and, when complete ground truth exists, the folder
to score against.

- DAVIS 2017: ``<root>/2017/trainval`` (val) or ``<root>/2017/test-dev``, each with
  ``JPEGImages/480p/<video>/``, ``Annotations/480p/<video>/`` and
  ``ImageSets/2017/{val,test-dev}.txt``. Only the first frame's mask is input; for val
  the remaining masks are the ground truth.
- DAVIS 2016: ``<root>/2016`` with the same folders (binary 0/255 masks, one object) and
  the video list in ``ImageSets/2016/val.txt``, ``ImageSets/480p/val.txt`` (official
  format: one image/mask path pair per line) or ``2017/trainval/ImageSets/2016/val.txt``
  (where the published code reads it).
- YouTubeVOS 2018/2019: ``<root>[/<year>]/valid/{JPEGImages,Annotations,meta.json}`` and
  ``all_frames/valid_all_frames/JPEGImages`` (every frame; without it the sparse
  ``valid/JPEGImages`` frames are used). Every mask present is input (objects appear
  later); by default only the frames listed in meta.json are written; there is no public
  ground truth. Frames are processed at 480p (shorter side) and results resized back.
- generic: ``<root>/JPEGImages/<video>/`` and ``<root>/Annotations/<video>/``; the first
  frame's mask is required, every mask present is input (YouTubeVOS style), 480p.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shards.images import shorter_side_size

from stcn.evaluation.files import (
    DatasetError,
    list_images,
    normalise_frames,
    read_frame,
    read_mask,
    resize_frames,
    resize_labels,
)
from stcn.inference.core import Annotation

log = logging.getLogger(__name__)

PROCESSING_SHORT_SIDE = 480


@dataclass(frozen=True)
class VideoSpec:
    """One video to segment. ``annotations``: (frame index, mask file) pairs given as input;
    ``output_frames``: frame indices to write (None: every frame from the first annotation)."""
    name: str
    frames: tuple[Path, ...]
    annotations: tuple[tuple[int, Path], ...]
    output_frames: frozenset[int] | None = None
    binary: bool = False                       # DAVIS 2016: every non-zero pixel is the object
    short_side: int | None = None              # process at this shorter side (None: as stored)


@dataclass(frozen=True)
class EvalSet:
    """Videos of one split, where their predictions go, and how to score them."""
    name: str
    videos: tuple[VideoSpec, ...]
    ground_truth: Path | None                  # per-video GT folders, when complete GT exists
    mask_subdir: str = ""                      # predictions go to <output>/<mask_subdir>/<video>/
    skip_first_and_last: bool = True           # DAVIS semi-supervised scoring rule
    default_mem_every: int = 5


@dataclass
class LoadedVideo:
    """A video ready for ``InferenceCore.segment`` plus what is needed to write results."""
    images: torch.Tensor                       # (T, 3, h, w) normalised, processing size
    annotations: list[Annotation]              # core ids 1..K at processing size
    object_ids: list[int]                      # data set id of core id i at index i - 1
    original_size: tuple[int, int]
    palette: bytes | None

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)


# -- readers ---------------------------------------------------------------------------------

def _first_existing(candidates: list[Path], what: str) -> Path:
    for c in candidates:
        if c.exists():
            return c
    raise DatasetError(f"{what} not found; looked for: " + ", ".join(str(c) for c in candidates))


def _read_video_list(path: Path) -> list[str]:
    """Video names from an ImageSets file: one name per line, or the official DAVIS 2016
    format with one '/JPEGImages/480p/<video>/<frame>.jpg /Annotations/...' pair per line."""
    names: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        name = Path(line.split()[0]).parent.name if "/" in line else line
        if name not in names:
            names.append(name)
    if not names:
        raise DatasetError(f"{path}: empty video list, expected one video name per line")
    return names


def _has_full_annotations(videos: list[VideoSpec], mask_dir: Path) -> bool:
    return all((mask_dir / v.name / (f.stem + ".png")).exists() for v in videos for f in v.frames)


def davis(root: Path | str, year: int = 2017, split: str = "val") -> EvalSet:
    """DAVIS 2016 val, 2017 val or 2017 test-dev (see the module doc for the layout)."""
    root = Path(root)
    if year == 2017 and split in ("val", "test-dev"):
        tree_name = "trainval" if split == "val" else "test-dev"
        tree = _first_existing([root / "2017" / tree_name, root / tree_name, root],
                               f"DAVIS 2017 {tree_name} folder (with JPEGImages/480p)")
        video_list = _first_existing([tree / "ImageSets" / "2017" / f"{split}.txt"],
                                     f"DAVIS 2017 {split} video list")
    elif year == 2016 and split == "val":
        tree = _first_existing([root / "2016", root], "DAVIS 2016 folder (with JPEGImages/480p)")
        video_list = _first_existing(
            [tree / "ImageSets" / "2016" / "val.txt", tree / "ImageSets" / "480p" / "val.txt",
             root / "2017" / "trainval" / "ImageSets" / "2016" / "val.txt"], "DAVIS 2016 val video list")
    else:
        raise DatasetError(f"DAVIS {year} has no split {split!r}: use 2016 val, 2017 val or 2017 test-dev")
    image_dir, mask_dir = tree / "JPEGImages" / "480p", tree / "Annotations" / "480p"
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: folder not found, expected DAVIS JPEGImages/480p/<video>/")
    videos = []
    for name in _read_video_list(video_list):
        frames = tuple(list_images(image_dir / name))
        first_mask = mask_dir / name / (frames[0].stem + ".png")
        if not first_mask.exists():
            raise DatasetError(f"{first_mask}: missing first-frame mask of video {name} "
                               f"(expected one PNG per annotated frame, named like its image)")
        videos.append(VideoSpec(name, frames, ((0, first_mask),), binary=(year == 2016)))
    has_gt = split == "val" and _has_full_annotations(videos, mask_dir)
    return EvalSet(name=f"davis-{year}-{split}", videos=tuple(videos),
                   ground_truth=mask_dir if has_gt else None,
                   default_mem_every=3 if split == "test-dev" else 5)


def _annotations_like_frames(frames: tuple[Path, ...], mask_folder: Path) -> tuple[tuple[int, Path], ...]:
    """Every mask in ``mask_folder`` named like a frame, as (frame index, path)."""
    found = []
    for i, frame in enumerate(frames):
        mask = mask_folder / (frame.stem + ".png")
        if mask.exists():
            found.append((i, mask))
    return tuple(found)


def youtube(root: Path | str, year: int = 2018, split: str = "valid", output_all: bool = False,
            short_side: int | None = PROCESSING_SHORT_SIDE) -> EvalSet:
    """YouTubeVOS 2018/2019 valid (see the module doc for the layout); frames are processed
    with their shorter side at ``short_side`` (None: as stored)."""
    root = Path(root)
    base = _first_existing([root / str(year) / split, root / split], f"YouTubeVOS {split} folder").parent
    split_dir = base / split
    all_frames = base / "all_frames" / f"{split}_all_frames" / "JPEGImages"
    image_dir = all_frames if all_frames.is_dir() else split_dir / "JPEGImages"
    if image_dir != all_frames:
        log.warning("%s not found: segmenting the sparse frames of %s", all_frames, image_dir)
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: folder not found, expected YouTubeVOS JPEGImages/<video>/")
    meta = None
    if not output_all:
        meta_path = split_dir / "meta.json"
        if not meta_path.exists():
            raise DatasetError(f"{meta_path}: not found; it lists the frames to write (or use --output-all)")
        meta = json.loads(meta_path.read_text())["videos"]
    videos = []
    for folder in sorted(p for p in image_dir.iterdir() if p.is_dir()):
        frames = tuple(list_images(folder))
        annotations = _annotations_like_frames(frames, split_dir / "Annotations" / folder.name)
        if not annotations:
            raise DatasetError(f"{split_dir / 'Annotations' / folder.name}: no first-frame mask for "
                               f"video {folder.name} (expected PNGs named like its frames, "
                               f"e.g. {frames[0].stem}.png)")
        output_frames = None
        if meta is not None:
            if folder.name not in meta:
                raise DatasetError(f"{split_dir / 'meta.json'}: video {folder.name} is not listed")
            wanted = {f for obj in meta[folder.name]["objects"].values() for f in obj["frames"]}
            output_frames = frozenset(i for i, f in enumerate(frames) if f.stem in wanted)
        videos.append(VideoSpec(folder.name, frames, annotations, output_frames, short_side=short_side))
    if not videos:
        raise DatasetError(f"{image_dir}: no video folders found")
    return EvalSet(name=f"youtube-{year}-{split}", videos=tuple(videos), ground_truth=None,
                   mask_subdir="Annotations", skip_first_and_last=False)


def generic(root: Path | str, short_side: int | None = PROCESSING_SHORT_SIDE) -> EvalSet:
    """A folder of videos with their first-frame masks (see the module doc for the layout);
    frames are processed with their shorter side at ``short_side`` (None: as stored)."""
    root = Path(root)
    image_dir, mask_dir = root / "JPEGImages", root / "Annotations"
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: folder not found, expected JPEGImages/<video>/ frames")
    videos = []
    for folder in sorted(p for p in image_dir.iterdir() if p.is_dir()):
        frames = tuple(list_images(folder))
        annotations = _annotations_like_frames(frames, mask_dir / folder.name)
        if not annotations or annotations[0][0] != 0:
            raise DatasetError(f"{mask_dir / folder.name / (frames[0].stem + '.png')}: missing first-frame "
                               f"mask of video {folder.name}")
        videos.append(VideoSpec(folder.name, frames, annotations, short_side=short_side))
    if not videos:
        raise DatasetError(f"{image_dir}: no video folders found")
    return EvalSet(name="generic", videos=tuple(videos), ground_truth=None, skip_first_and_last=False)


# -- loading -----------------------------------------------------------------------------------

def load_video(spec: VideoSpec) -> LoadedVideo:
    """Read a video's frames and input masks; map data set ids to core ids 1..K."""
    raw = [read_frame(p) for p in spec.frames]
    size = raw[0].shape[:2]
    for path, frame in zip(spec.frames, raw):
        if frame.shape[:2] != size:
            raise DatasetError(f"{path}: frame size {frame.shape[1]}x{frame.shape[0]} differs from the "
                               f"video's first frame {spec.frames[0].name} ({size[1]}x{size[0]})")
    masks, palette = {}, None
    for index, path in spec.annotations:
        labels, mask_palette = read_mask(path)
        if labels.shape != size:
            raise DatasetError(f"{path}: mask size {labels.shape[1]}x{labels.shape[0]} does not match its "
                               f"image {spec.frames[index]} ({size[1]}x{size[0]})")
        masks[index] = (labels > 0).astype(np.uint8) * labels.max() if spec.binary else labels
        palette = palette or mask_palette

    object_ids = sorted({int(i) for m in masks.values() for i in np.unique(m) if i != 0})
    lut = np.zeros(256, dtype=np.uint8)
    lut[object_ids] = np.arange(1, len(object_ids) + 1)

    images = normalise_frames(raw)
    work_size = size  # (H, W)
    if spec.short_side is not None:
        width, height = shorter_side_size(size[1], size[0], spec.short_side)
        work_size = (height, width)
    images = resize_frames(images, work_size)
    annotations = []
    for index, labels in sorted(masks.items()):
        present = tuple(int(lut[i]) for i in np.unique(labels) if i != 0)
        core_ids = torch.from_numpy(resize_labels(lut[labels], work_size)).long()
        annotations.append(Annotation(index, core_ids, present))
    return LoadedVideo(images, annotations, object_ids, tuple(size), palette)


def to_dataset_ids(core_labels: np.ndarray, object_ids: list[int]) -> np.ndarray:
    """Map a core label map (0..K) back to the data set's object ids."""
    back = np.zeros(len(object_ids) + 1, dtype=np.uint8)
    back[1:] = object_ids
    return back[core_labels]
