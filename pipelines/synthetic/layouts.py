"""Writers that lay synthetic scenes out exactly as the official data sets are distributed.

One function per kind, each `write_KIND(root, spec, progress)`. Every video (or image) draws
its scene from its own generator, seeded by (seed, kind, split, index), so a video does not
change when more videos are asked for, and the same seed gives the same bytes.

Sizes: `spec.videos` is the number of training videos (BL30K: videos; static: images per
set, classes for FSS-1000). Held-out splits (DAVIS val and test-dev, YouTubeVOS valid) get
`held_out_count(videos)` = ceil(videos / 3) videos each.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipelines.synthetic.files import jpeg_bytes, write_file, write_json, write_lines, write_tar
from pipelines.synthetic.palette import binary_png_bytes, indexed_png_bytes
from pipelines.synthetic.scene import ObjectSpec, Scene, make_scene, make_sprite, render_video

ANNOTATION_STEP = 5  # YouTubeVOS annotates (and ships JPEGs for) every 5th frame
BL30K_ARCHIVES = "abcdef"  # BL30K ships as BL30K_a.tar ... BL30K_f.tar
# Small objects added to every BL30K video (pixel areas), around the published size rule:
# only objects larger than 10x10 in the first frame count, and one between 10x10 and 30x30
# only if it stays under 20x20 in the other two frames.
BL30K_TINY_AREA = 40.0       # always below 10x10: never eligible
BL30K_SMALL_AREA = 250.0     # between 10x10 and 20x20 and stays there: eligible
BL30K_GROWER_AREA = 450.0    # starts between 10x10 and 30x30, grows well past 20x20
BL30K_GROWTH = 1.5
FSS_IMAGES_PER_CLASS = 3
STATIC_FLAT_SETS = ("DUTS-TR", "DUTS-TE", "ecssd", "BIG_small", "HRSOD_small")
FSS_SIZE = (224, 224)  # FSS-1000 images are 224x224
# Salient objects fill much of their image: the foreground's radius, as a fraction of the
# shorter side (distractors keep the usual video-object sizes).
FOREGROUND_RADIUS = (0.22, 0.32)
YOUTUBE_SPEED = 0.5    # its frames are 5 apart once subsampled, so objects move slower


@dataclass(frozen=True)
class SyntheticSpec:
    """The resolved parameters of one generated set (defaults filled in)."""
    kind: str
    videos: int
    frames: int
    objects: int
    seed: int
    size: tuple[int, int] | None  # None: each set's real size
    speed: float = 1.0  # scales all motion (objects, camera pan); 1 = the default scenes
    object_scale: float = 1.0  # scales the objects' size (davis, youtube, bl30k); 1 = default


Progress = Callable[[int], None]


def held_out_count(videos: int) -> int:
    return max(1, math.ceil(videos / 3))


def scene_rng(spec: SyntheticSpec, split: str, index: int) -> np.random.Generator:
    """The generator of one video/image: independent of how many others there are."""
    key = [spec.seed, zlib.crc32(spec.kind.encode()), zlib.crc32(split.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def frame_name(t: int) -> str:
    return f"{t:05d}"


def encoded_frames(scene: Scene) -> Iterator[tuple[int, bytes, np.ndarray]]:
    """(t, JPEG bytes, id map) for every frame of a scene."""
    for t, image, ids in render_video(scene):
        yield t, jpeg_bytes(image), ids


# --------------------------------------------------------------------------- DAVIS

def write_davis(root: Path, spec: SyntheticSpec, progress: Progress) -> None:
    """DAVIS 2017 trainval + test-dev, and the DAVIS 2016 single-object variant.

    root/2017/trainval/{JPEGImages,Annotations}/480p/<video>/00000.{jpg,png} with every
    frame annotated (ids 1..K, all present in frame 0), ImageSets/2017/{train,val}.txt and
    ImageSets/2016/{train,val}.txt (the 2016 list STCN's eval_davis_2016.py reads).
    root/2017/test-dev/: same tree, ImageSets/2017/test-dev.txt, only 00000.png annotated;
    the full masks go to root/2017/test-dev_ground_truth/Annotations/480p/ for scoring.
    root/2016/{JPEGImages,Annotations}/480p/: the trainval videos again (same JPEG bytes),
    with binary 0/255 masks of all foreground, as DAVIS 2016 merges objects into one; plus
    root/2016/ImageSets/480p/{train,val}.txt in the 2016 "image mask" line format.
    """
    size = spec.size or (480, 854)
    trainval = root / "2017" / "trainval"
    testdev = root / "2017" / "test-dev"
    davis2016 = root / "2016"
    splits = {"train": spec.videos, "val": held_out_count(spec.videos),
              "test-dev": held_out_count(spec.videos)}
    names: dict[str, list[str]] = {}
    for split, count in splits.items():
        names[split] = [f"{split}-{i:03d}" for i in range(count)]
        for i, video in enumerate(names[split]):
            scene = make_scene(scene_rng(spec, split, i), size, spec.frames,
                               [ObjectSpec(k) for k in range(1, spec.objects + 1)], speed=spec.speed,
                               object_scale=spec.object_scale)
            for t, jpeg, ids in encoded_frames(scene):
                name = frame_name(t)
                png = indexed_png_bytes(ids)
                if split == "test-dev":
                    write_file(testdev / "JPEGImages/480p" / video / f"{name}.jpg", jpeg)
                    if t == 0:
                        write_file(testdev / "Annotations/480p" / video / f"{name}.png", png)
                    write_file(root / "2017/test-dev_ground_truth/Annotations/480p" / video
                               / f"{name}.png", png)
                else:
                    for tree in (trainval, davis2016):
                        write_file(tree / "JPEGImages/480p" / video / f"{name}.jpg", jpeg)
                    write_file(trainval / "Annotations/480p" / video / f"{name}.png", png)
                    write_file(davis2016 / "Annotations/480p" / video / f"{name}.png",
                               binary_png_bytes(ids > 0))
            progress(1)
    for split in ("train", "val"):
        write_lines(trainval / "ImageSets/2017" / f"{split}.txt", names[split])
        write_lines(trainval / "ImageSets/2016" / f"{split}.txt", names[split])
        write_lines(davis2016 / "ImageSets/480p" / f"{split}.txt", [
            f"/JPEGImages/480p/{video}/{frame_name(t)}.jpg /Annotations/480p/{video}/{frame_name(t)}.png"
            for video in names[split] for t in range(spec.frames)])
    write_lines(testdev / "ImageSets/2017/test-dev.txt", names["test-dev"])


# --------------------------------------------------------------------------- YouTubeVOS

def youtube_objects(rng: np.random.Generator, objects: int, frames: int) -> list[ObjectSpec]:
    """Objects as in YouTubeVOS: ids with a gap (one of 1..K+1 is missing, so they are never
    contiguous), and, with two or more objects, a third of them (at least one) first
    appearing at a later annotated frame."""
    missing = int(rng.integers(1, objects + 1))
    ids = [i for i in range(1, objects + 2) if i != missing]
    late = set(rng.permutation(objects)[:max(1, objects // 3)].tolist()) if objects >= 2 else set()
    last_annotated = (frames - 1) // ANNOTATION_STEP
    return [ObjectSpec(object_id, start=ANNOTATION_STEP * int(rng.integers(1, last_annotated + 1))
                       if k in late else 0)
            for k, object_id in enumerate(ids)]


def write_youtube(root: Path, spec: SyntheticSpec, progress: Progress) -> None:
    """YouTubeVOS as STCN uses it.

    root/train_480p/{JPEGImages,Annotations}/<video>/NNNNN.{jpg,png}: every 5th frame
    (00000, 00005, ...), every annotated frame fully labelled.
    root/valid/JPEGImages/<video>/: every 5th frame; root/valid/Annotations/<video>/: a PNG
    only at frames where some object first appears, holding only those objects;
    root/valid/meta.json: {"videos": {video: {"objects": {id: {"category", "frames"}}}}},
    frames = the annotated frames from the object's first appearance on.
    root/all_frames/valid_all_frames/JPEGImages/<video>/: every frame.
    root/valid_ground_truth/Annotations/<video>/: full masks every 5th frame, for scoring.
    """
    size = spec.size or (480, 854)
    for split, count in (("train", spec.videos), ("valid", held_out_count(spec.videos))):
        meta: dict[str, dict] = {}
        for i in range(count):
            rng = scene_rng(spec, split, i)
            video = rng.bytes(5).hex()
            scene = make_scene(rng, size, spec.frames, youtube_objects(rng, spec.objects, spec.frames),
                               speed=YOUTUBE_SPEED * spec.speed, object_scale=spec.object_scale)
            categories = {obj.object_id: obj.sprite.shape for obj in scene.objects}
            first_seen: dict[int, str] = {}
            annotated: list[str] = []
            for t, jpeg, ids in encoded_frames(scene):
                name = frame_name(t)
                if split == "valid":
                    write_file(root / "all_frames/valid_all_frames/JPEGImages" / video / f"{name}.jpg", jpeg)
                if t % ANNOTATION_STEP:
                    continue
                annotated.append(name)
                if split == "train":
                    write_file(root / "train_480p/JPEGImages" / video / f"{name}.jpg", jpeg)
                    write_file(root / "train_480p/Annotations" / video / f"{name}.png",
                               indexed_png_bytes(ids))
                    continue
                write_file(root / "valid/JPEGImages" / video / f"{name}.jpg", jpeg)
                write_file(root / "valid_ground_truth/Annotations" / video / f"{name}.png",
                           indexed_png_bytes(ids))
                new = [int(k) for k in np.unique(ids) if k and int(k) not in first_seen]
                if new:
                    first_seen.update({k: name for k in new})
                    write_file(root / "valid/Annotations" / video / f"{name}.png",
                               indexed_png_bytes(np.where(np.isin(ids, new), ids, 0).astype(np.uint8)))
            meta[video] = {"objects": {
                str(k): {"category": categories[k], "frames": [f for f in annotated if f >= first]}
                for k, first in sorted(first_seen.items())}}
            progress(1)
        if split == "valid":
            write_json(root / "valid/meta.json", {"videos": meta})


# --------------------------------------------------------------------------- BL30K

def bl30k_objects(objects: int, index: int) -> list[ObjectSpec]:
    """K regular objects plus a tiny and a small one; every other video also one that
    starts small and grows (ids K+1, K+2, K+3)."""
    specs = [ObjectSpec(k) for k in range(1, objects + 1)]
    specs.append(ObjectSpec(objects + 1, area=BL30K_TINY_AREA))
    specs.append(ObjectSpec(objects + 2, area=BL30K_SMALL_AREA))
    if index % 2 == 0:
        specs.append(ObjectSpec(objects + 3, area=BL30K_GROWER_AREA, growth=BL30K_GROWTH))
    return specs


def write_bl30k(root: Path, spec: SyntheticSpec, progress: Progress) -> None:
    """BL30K: root/BL30K/{JPEGImages,Annotations}/<video>/NNNNN.{jpg,png}, 768 wide x 512
    tall, every frame annotated; plus the same files packed as root/tars/BL30K_a.tar ...
    (up to six archives, consecutive videos per archive) with members named as in the tree
    (BL30K/JPEGImages/<video>/00000.jpg, ...), each video's frames then its masks."""
    size = spec.size or (512, 768)
    videos = [f"bl{i:05d}" for i in range(spec.videos)]
    for i, video in enumerate(videos):
        scene = make_scene(scene_rng(spec, "train", i), size, spec.frames,
                           bl30k_objects(spec.objects, i), speed=spec.speed,
                           object_scale=spec.object_scale)
        for t, jpeg, ids in encoded_frames(scene):
            write_file(root / "BL30K/JPEGImages" / video / f"{frame_name(t)}.jpg", jpeg)
            write_file(root / "BL30K/Annotations" / video / f"{frame_name(t)}.png",
                       indexed_png_bytes(ids))
        progress(1)
    archives = min(len(BL30K_ARCHIVES), len(videos))
    for letter, chunk in zip(BL30K_ARCHIVES, np.array_split(np.array(videos), archives)):
        members = [Path("BL30K") / folder / str(video) / f"{frame_name(t)}.{ext}"
                   for video in chunk
                   for folder, ext in (("JPEGImages", "jpg"), ("Annotations", "png"))
                   for t in range(spec.frames)]
        write_tar(root / "tars" / f"BL30K_{letter}.tar", root, members)


# --------------------------------------------------------------------------- static

def write_static(root: Path, spec: SyntheticSpec, progress: Progress) -> None:
    """The static-image sets of STCN's stage 0, masks binary 0/255 (object 1 = foreground,
    the other objects are distractors).

    root/fss/<class>/<n>.jpg + <n>.png (FSS-1000: `videos` classes of 3 images, 224x224,
    all images of a class share one object look); root/<set>/<name>.jpg + <name>.png for
    DUTS-TR, DUTS-TE, ecssd, BIG_small, HRSOD_small (`videos` images each, alternating
    480x640 landscape and portrait unless a size is given).
    """
    objects = [ObjectSpec(k) for k in range(1, spec.objects + 1)]
    for c in range(spec.videos):
        class_rng = scene_rng(spec, "fss-class", c)
        class_size = spec.size or FSS_SIZE
        look = make_sprite(class_rng, FOREGROUND_RADIUS[1] * min(class_size), class_rng.random())
        for n in range(1, FSS_IMAGES_PER_CLASS + 1):
            scene = make_scene(scene_rng(spec, f"fss-{c}", n), class_size, 1, objects,
                               sprites={1: look})
            _write_static_image(root / "fss" / f"class{c:03d}", str(n), scene)
        progress(1)
    for name in STATIC_FLAT_SETS:
        for i in range(spec.videos):
            size = spec.size or ((480, 640) if i % 2 == 0 else (640, 480))
            rng = scene_rng(spec, name, i)
            foreground = make_sprite(rng, rng.uniform(*FOREGROUND_RADIUS) * min(size), rng.random())
            scene = make_scene(rng, size, 1, objects, sprites={1: foreground})
            _write_static_image(root / name, f"img_{i:05d}", scene)
            progress(1)


def _write_static_image(folder: Path, stem: str, scene: Scene) -> None:
    (_, jpeg, ids), = encoded_frames(scene)
    write_file(folder / f"{stem}.jpg", jpeg)
    write_file(folder / f"{stem}.png", binary_png_bytes(ids == 1))


def static_units(videos: int) -> int:
    return videos * (1 + len(STATIC_FLAT_SETS))
