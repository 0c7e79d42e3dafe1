"""Synthetic data sets in the layouts of the official ones (DAVIS, YouTubeVOS, BL30K and
the static-image sets), so every path of the project can run without the real data.

    from pipelines.synthetic import make_synthetic
    root = make_synthetic("davis", "data/DAVIS", videos=6, seed=0)

Scenes are textured objects moving, spinning, scaling and occluding each other over a
panning textured background (`scene`); `layouts` writes them as each set is distributed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from shards import console

from pipelines.synthetic.files import MARKER, staged_output, write_json
from pipelines.synthetic.layouts import (
    SyntheticSpec,
    held_out_count,
    static_units,
    write_bl30k,
    write_davis,
    write_static,
    write_youtube,
)

KINDS = ("davis", "youtube", "bl30k", "static")
# Rendered frames per video when not given. YouTubeVOS keeps every 5th, so 50 -> 10.
DEFAULT_FRAMES = {"davis": 30, "youtube": 50, "bl30k": 30, "static": 1}
# Fewest frames a kind can have: STCN skips videos under 3 frames; YouTubeVOS needs 3
# annotated frames (0, 5, 10) and room for objects that appear late.
MIN_FRAMES = {"davis": 3, "youtube": 11, "bl30k": 3, "static": 1}
MIN_SIDE = 32
MAX_OBJECTS = 250  # ids stay below 256 even with YouTubeVOS's gap and BL30K's extras

_WRITERS: dict[str, Callable] = {
    "davis": write_davis, "youtube": write_youtube, "bl30k": write_bl30k, "static": write_static}

__all__ = ["KINDS", "DEFAULT_FRAMES", "make_synthetic", "resolve_spec", "SyntheticSpec"]


def resolve_spec(kind: str, *, videos: int = 6, frames: int | None = None, objects: int = 3,
                 seed: int = 0, size: tuple[int, int] | None = None, speed: float = 1.0,
                 object_scale: float = 1.0) -> SyntheticSpec:
    """Check the parameters and fill in the kind's defaults; one clear error per mistake."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {', '.join(KINDS)}")
    frames = DEFAULT_FRAMES[kind] if frames is None else int(frames)
    if kind == "static" and frames != 1:
        raise ValueError(f"static sets are single images: frames must be 1 (or left out), got {frames}")
    if frames < MIN_FRAMES[kind]:
        raise ValueError(f"{kind} needs at least {MIN_FRAMES[kind]} frames per video, got {frames}")
    if videos < 1:
        raise ValueError(f"videos must be at least 1, got {videos}")
    if not 1 <= objects <= MAX_OBJECTS:
        raise ValueError(f"objects must be in 1..{MAX_OBJECTS}, got {objects}")
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    if not object_scale > 0:
        raise ValueError(f"object_scale must be positive, got {object_scale}")
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if min(size) < MIN_SIDE:
            raise ValueError(f"size (H, W) must be at least {MIN_SIDE}x{MIN_SIDE}, got {size[0]}x{size[1]}")
    return SyntheticSpec(kind=kind, videos=int(videos), frames=frames, objects=int(objects),
                         seed=int(seed), size=size, speed=float(speed),
                         object_scale=float(object_scale))


def units_of_work(spec: SyntheticSpec) -> int:
    """Videos (or FSS classes and images) rendered: the progress bar's total."""
    if spec.kind == "davis":
        return spec.videos + 2 * held_out_count(spec.videos)
    if spec.kind == "youtube":
        return spec.videos + held_out_count(spec.videos)
    if spec.kind == "static":
        return static_units(spec.videos)
    return spec.videos


def make_synthetic(kind: str, out, *, videos: int = 6, frames: int | None = None,
                   objects: int = 3, seed: int = 0, size: tuple[int, int] | None = None,
                   overwrite: bool = False, progress: bool = False, speed: float = 1.0,
                   object_scale: float = 1.0) -> Path:
    """Generate a synthetic `kind` data set under `out` in its official layout; return `out`.

    kind: "davis", "youtube", "bl30k" or "static". videos: training videos (held-out
    splits get ceil(videos / 3) each; static: images per set, classes for FSS-1000).
    frames: rendered frames per video (default per kind, DEFAULT_FRAMES). objects: objects
    per video. size: (H, W), or None for each set's real size. speed: scales all motion
    (objects and camera; 1 = the default scenes, same bytes as before the option).
    object_scale: scales the objects' size in videos (davis, youtube, bl30k; 1 = the default
    scenes). The set appears at `out` only once complete; `out` must be new or empty, or an
    earlier synthetic set with `overwrite`. Same arguments, same bytes.
    """
    spec = resolve_spec(kind, videos=videos, frames=frames, objects=objects, seed=seed, size=size,
                        speed=speed, object_scale=object_scale)
    out = Path(out)
    with staged_output(out, overwrite=overwrite) as staging, \
            console.progress(total=units_of_work(spec), unit="video", desc=f"synthetic {kind}",
                             enabled=progress) as bar:
        _WRITERS[kind](staging, spec, bar.update)
        write_json(staging / MARKER, {"generator": "pipelines.synthetic", "kind": spec.kind,
                                      "videos": spec.videos, "frames": spec.frames,
                                      "objects": spec.objects, "seed": spec.seed,
                                      "size": list(spec.size) if spec.size else None,
                                      # only when changed: default sets keep their bytes
                                      **({"speed": spec.speed} if spec.speed != 1.0 else {}),
                                      **({"object_scale": spec.object_scale}
                                         if spec.object_scale != 1.0 else {})})
    return out
