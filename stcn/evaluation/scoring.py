"""J&F scoring of predicted masks with vos-benchmark (the metric is not re-implemented here).

J is the region IoU, F the boundary F-measure (tolerance 0.008 of the image diagonal),
each averaged over the frames of an object. The summary means run over all objects of
all videos, as vos-benchmark reports them; per-video figures average the video's objects.
DAVIS semi-supervised scoring leaves out the first and the last frame of each video.

vos-benchmark's own driver exits the process on a missing prediction; here every
prediction is checked first and a missing one is a ``DatasetError`` naming the file.
"""

from __future__ import annotations

from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable

import numpy as np
from vos_benchmark.benchmark import VideoEvaluator

from shards import console
from stcn.evaluation.files import DatasetError


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


def _evaluate(evaluator: VideoEvaluator, video: str):
    try:
        return evaluator(video)
    except AssertionError as err:  # vos-benchmark asserts equal GT/prediction sizes
        raise DatasetError(f"video {video}: {err}") from None


def score_predictions(gt_dir: Path | str, pred_dir: Path | str, videos: Iterable[str] | None = None,
                      *, skip_first_and_last: bool = True, workers: int = 1) -> dict:
    """Score ``pred_dir/<video>/*.png`` against ``gt_dir/<video>/*.png``.

    videos: the videos to score (default: every predicted video that has ground truth).
    Returns {"J&F", "J", "F", "videos", "objects", "skip_first_and_last",
             "per_video": {video: {"J&F", "J", "F", "objects": {id: {"J", "F"}}}}}.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: {what} folder not found (expected one sub-folder of PNGs per video)")
    if videos is None:
        predicted = {p.name for p in pred_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        videos = sorted(v for v in predicted if (gt_dir / v).is_dir())
        if not videos:
            raise DatasetError(f"{pred_dir}: no predicted video folder matches a ground-truth folder in {gt_dir}")
    videos = sorted(videos)
    _check_predictions(gt_dir, pred_dir, videos, skip_first_and_last)

    evaluator = VideoEvaluator(str(gt_dir), str(pred_dir), skip_first_and_last=skip_first_and_last)
    score_one = partial(_evaluate, evaluator)
    if workers > 1:
        with Pool(workers) as pool:
            results = list(console.progress(pool.imap(score_one, videos), total=len(videos),
                                                desc="scoring", unit="video"))
    else:
        results = [score_one(v) for v in console.progress(videos, desc="scoring", unit="video")]

    per_video, all_j, all_f = {}, [], []
    for name, iou, boundary in results:
        objects = {int(o): {"J": float(iou[o]), "F": float(boundary[o])} for o in sorted(iou)}
        all_j.extend(v["J"] for v in objects.values())
        all_f.extend(v["F"] for v in objects.values())
        j, f = _mean(v["J"] for v in objects.values()), _mean(v["F"] for v in objects.values())
        per_video[name] = {"J&F": None if j is None else (j + f) / 2, "J": j, "F": f, "objects": objects}
    if not all_j:
        raise DatasetError(f"{gt_dir}: the scored frames hold no object, nothing to score")
    j, f = _mean(all_j), _mean(all_f)
    return {"J&F": (j + f) / 2, "J": j, "F": f, "videos": len(videos), "objects": len(all_j),
            "skip_first_and_last": skip_first_and_last, "per_video": per_video}
