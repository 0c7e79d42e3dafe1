"""J&F scoring of predicted masks with vos-benchmark (the metric is not re-implemented here).

J is the region IoU, F the boundary F-measure (tolerance 0.008 of the image diagonal),
each averaged over the frames of an object. The summary means run over all objects of
all videos, as vos-benchmark reports them; per-video figures average the video's objects.
DAVIS semi-supervised scoring leaves out the first and the last frame of each video.

Every figure comes twice. The standard one (vos-benchmark's, comparable with published
numbers) counts a frame where the object is absent in both the ground truth and the
prediction as perfect (J = F = 1), which inflates J&F on videos where objects are
absent for long stretches. The second one (``without_empty``) leaves those frames out;
``left_out`` says how many object-frames that was. Both come from the same per-frame
values of vos-benchmark's ``Evaluator``; only the selection of frames is ours.

vos-benchmark's own driver exits the process on a missing prediction; here every
prediction is checked first and a missing one is a ``DatasetError`` naming the file.
"""

from __future__ import annotations

from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from vos_benchmark.evaluator import Evaluator

from shards import console

from stcn.evaluation.files import DatasetError

LEFT_OUT_RULE = "frames where the object is absent in both the ground truth and the prediction"


def _frames_scored(gt_video: Path, skip_first_and_last: bool) -> list[str]:
    # Same rule as vos_benchmark.benchmark.VideoEvaluator: every GT file, sorted by name.
    frames = sorted(p.name for p in gt_video.iterdir())
    return frames[1:-1] if skip_first_and_last else frames


def _check_predictions(gt_dir: Path, pred_dir: Path, videos: list[str], skip_first_and_last: bool) -> None:
    for video in videos:
        if not (gt_dir / video).is_dir():
            raise DatasetError(f"{gt_dir / video}: no ground truth for video {video}")
        for name in _frames_scored(gt_dir / video, skip_first_and_last):
            if not (pred_dir / video / name).exists():
                raise DatasetError(f"{pred_dir / video / name}: predicted mask missing "
                                   f"(ground truth {gt_dir / video / name} exists)")


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _score_video(gt_dir: Path, pred_dir: Path, skip_first_and_last: bool, video: str):
    """Per-object figures of one video: vos-benchmark's J and F, and the same without the
    frames where the object is absent from both masks."""
    evaluator = Evaluator(name=video)
    both_empty: dict[int, list[bool]] = {}     # aligned with evaluator.object_iou[object]
    for frame in _frames_scored(gt_dir / video, skip_first_and_last):
        # read as vos_benchmark.benchmark.VideoEvaluator does
        gt = np.array(Image.open(gt_dir / video / frame))
        mask = np.array(Image.open(pred_dir / video / frame))
        if gt.shape[-2:] != mask.shape[-2:]:
            raise DatasetError(f"{pred_dir / video / frame}: predicted mask is {mask.shape[-2:]}, "
                               f"ground truth {gt_dir / video / frame} is {gt.shape[-2:]}")
        evaluator.feed_frame(mask, gt)
        # feed_frame appended one value for every object seen so far in either mask
        for obj in evaluator.objects_in_gt | evaluator.objects_in_masks:
            both_empty.setdefault(obj, []).append(not (gt == obj).any() and not (mask == obj).any())
    iou, boundary = evaluator.conclude()       # standard: the objects of the ground truth
    objects = {}
    for obj in sorted(iou):
        keep = ~np.array(both_empty[obj])
        j_values = np.array(evaluator.object_iou[obj], dtype=float)[keep]
        f_values = np.array(evaluator.boundary_f[obj], dtype=float)[keep]
        objects[int(obj)] = {"J": float(iou[obj]), "F": float(boundary[obj]),
                             "J_without_empty": float(j_values.mean() * 100),
                             "F_without_empty": float(f_values.mean() * 100),
                             "frames": len(keep), "empty_frames": int((~keep).sum())}
    return video, objects


def _left_out(objects: list[dict]) -> dict:
    return {"object_frames": sum(o["empty_frames"] for o in objects),
            "of": sum(o["frames"] for o in objects)}


def _figures(objects: list[dict], suffix: str = "") -> dict:
    j, f = _mean(o["J" + suffix] for o in objects), _mean(o["F" + suffix] for o in objects)
    return {"J&F": None if j is None else (j + f) / 2, "J": j, "F": f}


def score_predictions(gt_dir: Path | str, pred_dir: Path | str, videos: Iterable[str] | None = None,
                      *, skip_first_and_last: bool = True, workers: int = 1) -> dict:
    """Score ``pred_dir/<video>/*.png`` against ``gt_dir/<video>/*.png``.

    videos: the videos to score (default: every predicted video that has ground truth).
    Returns {"J&F", "J", "F", "without_empty": {"J&F", "J", "F"},
             "left_out": {"object_frames", "of", "rule"}, "videos", "objects",
             "skip_first_and_last", "per_video": {video: {"J&F", "J", "F", "without_empty",
             "left_out": {"object_frames", "of"},
             "objects": {id: {"J", "F", "J_without_empty", "F_without_empty",
             "frames", "empty_frames"}}}}}; figures in percent.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: {what} folder not found "
                               "(expected one sub-folder of PNGs per video)")
    if videos is None:
        predicted = {p.name for p in pred_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        videos = sorted(v for v in predicted if (gt_dir / v).is_dir())
        if not videos:
            raise DatasetError(f"{pred_dir}: no predicted video folder matches a ground-truth "
                               f"folder in {gt_dir}")
    videos = sorted(videos)
    _check_predictions(gt_dir, pred_dir, videos, skip_first_and_last)

    score_one = partial(_score_video, gt_dir, pred_dir, skip_first_and_last)
    if workers > 1:
        with Pool(workers) as pool:
            results = list(console.progress(pool.imap(score_one, videos), total=len(videos),
                                            desc="scoring", unit="video"))
    else:
        results = [score_one(v) for v in console.progress(videos, desc="scoring", unit="video")]

    per_video, everything = {}, []
    for name, objects in results:
        listed = list(objects.values())
        everything.extend(listed)
        per_video[name] = {**_figures(listed), "without_empty": _figures(listed, "_without_empty"),
                           "left_out": _left_out(listed), "objects": objects}
    if not everything:
        raise DatasetError(f"{gt_dir}: the scored frames hold no object, nothing to score")
    return {**_figures(everything), "without_empty": _figures(everything, "_without_empty"),
            "left_out": {**_left_out(everything), "rule": LEFT_OUT_RULE},
            "videos": len(videos), "objects": len(everything),
            "skip_first_and_last": skip_first_and_last, "per_video": per_video}
