"""Evaluation driver: segment every video of an ``EvalSet``, write PNGs, time, score, report.

Output folder layout (``<masks>`` is ``<output>`` or ``<output>/Annotations`` for YouTubeVOS):
    <masks>/<video>/<frame>.png   indexed PNGs, source palette (DAVIS palette fallback)
    <output>/.records/            per-video timing records and the run's settings
    <output>/results.json         the summary (timing, settings, scores), written atomically
    <output>/FINISHED             written last: the run completed

Nothing partial looks complete: a video's PNGs are written to ``<masks>/.partial-<video>``
and renamed into place once all are written (after its timing record), ``results.json``
and ``FINISHED`` are removed when a run starts and rewritten when it ends. A rerun reuses
the finished videos (same settings required, otherwise it stops and asks for
``overwrite``) and segments the rest; ``overwrite=True`` starts from scratch.

Timing follows the published protocol: file IO is excluded, the clock runs from the
video's frames being on the device to its label maps being back on the CPU, with CUDA
synchronised at both ends. FPS is amortised: all frames of all videos / total time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shards import console
from stcn.evaluation import datasets
from stcn.evaluation.datasets import EvalSet, VideoSpec
from stcn.evaluation.files import DatasetError, read_mask, write_json_atomic, write_mask
from stcn.evaluation.scoring import score_predictions
from stcn.inference import InferenceConfig, InferenceCore
from stcn.network import STCN
from stcn.weights import load_stcn_weights

RESULTS_FILE = "results.json"
FINISHED_FILE = "FINISHED"
RECORDS_DIR = ".records"
PARTIAL_PREFIX = ".partial-"


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when available, else the CPU; an unusable CUDA request is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available here")
    return device


def build_network(weights: Path | str | None, device: torch.device | str) -> torch.nn.Module:
    """The multi-object STCN in eval mode on ``device``, with the checkpoint at ``weights``
    loaded strictly (stage-0 checkpoints widened), or random weights when None (seeded, so
    smoke tests are repeatable)."""
    if weights is None:
        torch.manual_seed(0)
    net = STCN(single_object=False)
    if weights is not None:
        load_stcn_weights(net, weights)
    return net.to(device).eval()


def format_summary(summary: dict) -> str:
    """Human-readable lines for a ``run_evaluation`` summary."""
    lines = [f"{summary['data_set']}: {summary['videos']} videos, {summary['frames']} frames, "
             f"{summary['seconds']:.2f} s of inference, {summary['fps']:.2f} FPS (amortised, IO excluded)"]
    if summary["reused_videos"]:
        lines.append(f"reused {len(summary['reused_videos'])} finished videos from an earlier run")
    if "peak_gpu_memory_mib" in summary:
        lines.append(f"peak GPU memory: {summary['peak_gpu_memory_mib']:.0f} MiB")
    if summary["scores"] is not None:
        lines.append(format_scores(summary["scores"]))
    return "\n".join(lines)


def format_scores(scores: dict) -> str:
    lines = [f"{'video':<24} {'J&F':>6} {'J':>6} {'F':>6}"]
    for name, v in scores["per_video"].items():
        if v["J"] is not None:
            lines.append(f"{name:<24} {v['J&F']:6.1f} {v['J']:6.1f} {v['F']:6.1f}")
    lines.append(f"{'mean over objects':<24} {scores['J&F']:6.1f} {scores['J']:6.1f} {scores['F']:6.1f}")
    return "\n".join(lines)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_settings(eval_set: EvalSet, config: InferenceConfig, weights: str | None) -> dict:
    return {"data_set": eval_set.name, "inference": dataclasses.asdict(config), "weights": weights}


def _prepare_output(output: Path, eval_set: EvalSet, settings: dict, overwrite: bool) -> tuple[Path, Path]:
    """Create the folders, drop stale completion markers and partial videos, check settings."""
    masks_dir = output / eval_set.mask_subdir if eval_set.mask_subdir else output
    records = output / RECORDS_DIR
    for marker in (output / FINISHED_FILE, output / RESULTS_FILE):
        marker.unlink(missing_ok=True)
    if overwrite:
        for video in eval_set.videos:
            shutil.rmtree(masks_dir / video.name, ignore_errors=True)
        shutil.rmtree(records, ignore_errors=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    for stale in masks_dir.glob(PARTIAL_PREFIX + "*"):
        shutil.rmtree(stale)
    settings_file = records / "settings.json"
    if settings_file.exists():
        previous = json.loads(settings_file.read_text())
        if previous != settings and any(records.glob("video-*.json")):
            raise DatasetError(f"{output}: holds results made with other settings ({previous}); "
                               "choose another output folder or overwrite it (--overwrite)")
    write_json_atomic(settings_file, settings)
    return masks_dir, records


def _finished_record(video: VideoSpec, masks_dir: Path, records: Path) -> dict | None:
    record = records / f"video-{video.name}.json"
    if record.exists() and (masks_dir / video.name).is_dir():
        return json.loads(record.read_text())
    return None


def _segment_video(core: InferenceCore, video: VideoSpec, device: torch.device):
    """Load (untimed), segment (timed) -> (data set label maps per frame, palette, record)."""
    loaded = datasets.load_video(video)
    images = loaded.images.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    start = time.perf_counter()
    core_labels = core.segment(images, loaded.annotations, loaded.num_objects,
                               output_size=loaded.original_size, output_frames=video.output_frames)
    _synchronize(device)
    seconds = time.perf_counter() - start
    record = {"frames": len(video.frames), "seconds": seconds, "fps": len(video.frames) / seconds,
              "objects": loaded.num_objects}
    if device.type == "cuda":
        record["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    labels = {i: datasets.to_dataset_ids(m, loaded.object_ids) for i, m in core_labels.items()}
    return labels, loaded.palette, record


def _write_video(video: VideoSpec, labels: dict[int, np.ndarray], palette: bytes | None,
                 masks_dir: Path, records: Path, record: dict) -> None:
    partial = masks_dir / (PARTIAL_PREFIX + video.name)
    partial.mkdir()
    for index, frame_labels in sorted(labels.items()):
        write_mask(partial / (video.frames[index].stem + ".png"), frame_labels, palette)
    write_json_atomic(records / f"video-{video.name}.json", record)
    final = masks_dir / video.name
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def _summary(eval_set: EvalSet, settings: dict, per_video: dict, reused: list[str], device) -> dict:
    frames = sum(r["frames"] for r in per_video.values())
    seconds = sum(r["seconds"] for r in per_video.values())
    summary = {**settings, "device": str(device), "videos": len(per_video), "frames": frames,
               "seconds": seconds, "fps": frames / seconds if seconds > 0 else None,
               "reused_videos": reused, "per_video": per_video, "scores": None}
    peaks = [r["peak_gpu_memory_mib"] for r in per_video.values() if "peak_gpu_memory_mib" in r]
    if peaks:
        summary["peak_gpu_memory_mib"] = max(peaks)
    return summary


def run_evaluation(net: torch.nn.Module, eval_set: EvalSet, output: Path | str,
                   config: InferenceConfig | None = None, *, weights: str | None = None,
                   overwrite: bool = False, score: bool = True, score_workers: int = 1,
                   progress: bool = True) -> dict:
    """Segment ``eval_set`` with ``net`` (already on its device), write the masks under
    ``output``, score them when ground truth exists, and return the summary that is also
    saved as ``output/results.json``. ``weights`` only labels the run (e.g. a path)."""
    output = Path(output)
    config = config or InferenceConfig(mem_every=eval_set.default_mem_every)
    core = InferenceCore(net, config)
    settings = _run_settings(eval_set, config, weights)
    masks_dir, records = _prepare_output(output, eval_set, settings, overwrite)

    per_video, reused = {}, []
    for video in console.progress(eval_set.videos, desc=eval_set.name, unit="video", enabled=progress):
        record = None if overwrite else _finished_record(video, masks_dir, records)
        if record is not None:
            reused.append(video.name)
        else:
            labels, palette, record = _segment_video(core, video, core.device)
            _write_video(video, labels, palette, masks_dir, records, record)
        per_video[video.name] = record

    summary = _summary(eval_set, settings, per_video, reused, core.device)
    if score and eval_set.ground_truth is not None:
        summary["scores"] = score_predictions(eval_set.ground_truth, masks_dir,
                                              [v.name for v in eval_set.videos],
                                              skip_first_and_last=eval_set.skip_first_and_last,
                                              workers=score_workers)
    write_json_atomic(output / RESULTS_FILE, summary)
    (output / FINISHED_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return summary


def evaluate_davis(net: torch.nn.Module, root: Path | str, split: str = "val", year: int = 2017,
                   *, config: InferenceConfig | None = None, output: Path | str | None = None,
                   progress: bool = False) -> dict:
    """In-process DAVIS evaluation of a built network (e.g. held-out synthetic videos during
    training). Returns the ``run_evaluation`` summary; ``summary["scores"]["J&F"]`` is the
    score when the split has ground truth. Without ``output`` the masks go to a temporary
    folder that is deleted afterwards."""
    eval_set = datasets.davis(root, year, split)
    if output is not None:
        return run_evaluation(net, eval_set, output, config, overwrite=True, progress=progress)
    with tempfile.TemporaryDirectory(prefix="stcn-eval-") as tmp:
        return run_evaluation(net, eval_set, tmp, config, overwrite=True, progress=progress)


def copy_first_frame_baseline(root: Path | str, split: str = "val", year: int = 2017,
                              output: Path | str | None = None) -> dict:
    """Scores of the trivial baseline that repeats each video's first-frame mask on every
    frame: the floor a trained model must beat. Returns the ``score_predictions`` dict."""
    eval_set = datasets.davis(root, year, split)
    if eval_set.ground_truth is None:
        raise DatasetError(f"{root}: DAVIS {year} {split} has no complete ground truth to score against")
    with tempfile.TemporaryDirectory(prefix="stcn-baseline-") as tmp:
        pred_dir = Path(output) if output is not None else Path(tmp)
        for video in eval_set.videos:
            labels, palette = read_mask(video.annotations[0][1])
            folder = pred_dir / video.name
            folder.mkdir(parents=True, exist_ok=True)
            for frame in video.frames:
                write_mask(folder / (frame.stem + ".png"), labels, palette)
        return score_predictions(eval_set.ground_truth, pred_dir, [v.name for v in eval_set.videos],
                                 skip_first_and_last=eval_set.skip_first_and_last)
