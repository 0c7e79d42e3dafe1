"""Evaluation driver: segment every video of an ``EvalSet``, write PNGs, time, score, report.

Output folder layout (``<masks>`` is ``<output>`` or ``<output>/Annotations`` for YouTubeVOS):
    <masks>/<video>/<frame>.png   indexed PNGs, source palette (DAVIS palette fallback)
    <output>/.records/            per-video timing records and the run's settings
    <output>/results.json         the summary (timing, settings, scores), written atomically
    <output>/results.csv          the per-video table (timing, J&F both ways), next to it
    <output>/FINISHED             written last: the run completed

Nothing partial looks complete: a video's PNGs are written to ``<masks>/.partial-<video>``
and renamed into place once all are written (after its timing record), ``results.json``
and ``FINISHED`` are removed when a run starts and rewritten when it ends. A rerun reuses
the finished videos and segments the rest. Reuse is keyed on content, not names: the
network's weights (a sha256 of its parameters, so new weights saved at the same path
are noticed), the inference options, and per video a sha256 of its input files and
settings (frames, input masks, frames to write, processing size). Other weights or
options stop the run with the differences named (``overwrite`` starts from scratch);
a video whose inputs changed is segmented again.

Timing follows the published protocol: file IO is excluded, the clock runs from the
video's frames being on the device to its label maps being back on the CPU, with CUDA
synchronised at both ends. FPS is amortised: all frames of all videos / total time.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shards import console
from shards.storage import write_bytes_atomic

from stcn.evaluation import datasets
from stcn.evaluation.datasets import EvalSet, VideoSpec
from stcn.evaluation.files import DatasetError, read_mask, write_json_atomic, write_mask
from stcn.evaluation.scoring import score_predictions
from stcn.inference.core import InferenceConfig, InferenceCore

RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"
FINISHED_FILE = "FINISHED"
RECORDS_DIR = ".records"
PARTIAL_PREFIX = ".partial-"


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
    else:  # no ground truth: the per-video table has the timing only
        lines.append(f"{'video':<24} {'frames':>6} {'objects':>7} {'FPS':>8}")
        lines += [f"{name:<24} {r['frames']:6d} {r['objects']:7d} {r['fps']:8.2f}"
                  for name, r in summary["per_video"].items()]
    return "\n".join(lines)


def _cells(figures: dict | None) -> str:
    if not figures or figures.get("J") is None:
        return f"{'-':>6} {'-':>6} {'-':>6}"
    return f"{figures['J&F']:6.1f} {figures['J']:6.1f} {figures['F']:6.1f}"


def format_scores(scores: dict) -> str:
    """The per-video table: standard J&F, J, F; the same without empty-vs-empty frames
    (marked *); how many object-frames that left out. Then the means and what * means."""
    lines = [f"{'video':<24} {'J&F':>6} {'J':>6} {'F':>6}   {'J&F*':>6} {'J*':>6} {'F*':>6}  left out"]
    for name, v in scores["per_video"].items():
        if v["J"] is not None:
            left = v["left_out"]
            lines.append(f"{name:<24} {_cells(v)}   {_cells(v['without_empty'])}  "
                         f"{left['object_frames']}/{left['of']}")
    left = scores["left_out"]
    lines.append(f"{'mean over objects':<24} {_cells(scores)}   {_cells(scores['without_empty'])}  "
                 f"{left['object_frames']}/{left['of']}")
    lines.append(f"* leaves out {left['object_frames']} of {left['of']} scored object-frames: "
                 f"{left['rule']} (the standard figures count them as perfect)")
    return "\n".join(lines)


CSV_COLUMNS = ("video", "objects", "frames", "seconds", "fps", "J&F", "J", "F", "J&F_without_empty",
               "J_without_empty", "F_without_empty", "left_out_object_frames", "scored_object_frames")


def per_video_rows(scores: dict | None = None, timing: dict | None = None) -> list[dict]:
    """One row per video (CSV_COLUMNS) from the per-video timing records and/or scores."""
    names = list(timing or {}) + [v for v in (scores or {}).get("per_video", {}) if v not in (timing or {})]
    rows = []
    for name in names:
        row = {"video": name}
        record = (timing or {}).get(name)
        if record:
            row.update(objects=record["objects"], frames=record["frames"],
                       seconds=round(record["seconds"], 4), fps=round(record["fps"], 3))
        score = (scores or {}).get("per_video", {}).get(name)
        if score and score["J"] is not None:
            row.update({k: round(score[k], 3) for k in ("J&F", "J", "F")})
            row.update({f"{k}_without_empty": round(score["without_empty"][k], 3) for k in ("J&F", "J", "F")})
            row.update(objects=len(score["objects"]),
                       left_out_object_frames=score["left_out"]["object_frames"],
                       scored_object_frames=score["left_out"]["of"])
        rows.append(row)
    return rows


def write_results(json_path: Path | str, payload: dict, scores: dict | None = None,
                  timing: dict | None = None) -> Path:
    """``payload`` as JSON at ``json_path`` and the per-video table as CSV beside it (same
    name, .csv), both atomically. Returns the CSV path."""
    json_path = Path(json_path)
    write_json_atomic(json_path, payload)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_video_rows(scores, timing))
    csv_path = json_path.with_suffix(".csv")
    write_bytes_atomic(str(csv_path), text.getvalue().encode())
    return csv_path


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network_sha256(net: torch.nn.Module) -> str:
    """sha256 of the network's parameters and buffers (names, dtypes, shapes, values): the
    weights actually evaluated, wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def video_input_sha256(video: VideoSpec) -> str:
    """sha256 of what a video's result depends on besides network and options: the bytes
    of its frames and input masks (by position, so a moved data set still matches) and
    its settings (frames to write, processing size, binary masks)."""
    digest = hashlib.sha256()
    settings = {"frames": [p.name for p in video.frames],
                "annotations": [(i, p.name) for i, p in video.annotations],
                "output_frames": sorted(video.output_frames) if video.output_frames is not None else None,
                "binary": video.binary, "short_side": video.short_side}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in [*video.frames, *(p for _, p in video.annotations)]:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _run_settings(eval_set: EvalSet, config: InferenceConfig, net: torch.nn.Module,
                  weights: str | None) -> dict:
    return {"data_set": eval_set.name, "inference": dataclasses.asdict(config),
            "network_sha256": network_sha256(net), "weights": None if weights is None else str(weights)}


# What must match for earlier results to be reused ("weights" only labels the run).
REUSE_KEYS = {"data_set": "data set", "inference": "inference options",
              "network_sha256": "network weights (sha256 of the parameters)"}


def _differences(previous: dict, settings: dict) -> list[str]:
    differences = []
    for key, what in REUSE_KEYS.items():
        before, now = previous.get(key), settings[key]
        if before == now:
            continue
        if isinstance(before, dict) and isinstance(now, dict):
            changed = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}"
                                for k in sorted(set(before) | set(now))
                                if before.get(k) != now.get(k))
            differences.append(f"{what}: {changed}")
        elif key == "network_sha256":
            differences.append(f"{what}: {str(before)[:12]} ({previous.get('weights')}) -> "
                               f"{now[:12]} ({settings.get('weights')})")
        else:
            differences.append(f"{what}: {before!r} -> {now!r}")
    return differences


def _prepare_output(output: Path, eval_set: EvalSet, settings: dict, overwrite: bool) -> tuple[Path, Path]:
    """Create the folders, drop stale completion markers and partial videos, check settings."""
    masks_dir = output / eval_set.mask_subdir if eval_set.mask_subdir else output
    records = output / RECORDS_DIR
    for marker in (output / FINISHED_FILE, output / RESULTS_FILE, output / RESULTS_CSV):
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
    if settings_file.exists() and any(records.glob("video-*.json")):
        differences = _differences(json.loads(settings_file.read_text()), settings)
        if differences:
            raise DatasetError(f"{output}: holds results made with other settings ("
                               + "; ".join(differences) + "); rerun with --overwrite to replace "
                               "them, or choose another --out")
    write_json_atomic(settings_file, settings)
    return masks_dir, records


def _finished_record(video: VideoSpec, masks_dir: Path, records: Path, input_sha256: str) -> dict | None:
    """The record of an earlier result of this video made from the same inputs, if any."""
    record = records / f"video-{video.name}.json"
    if record.exists() and (masks_dir / video.name).is_dir():
        record = json.loads(record.read_text())
        if record.get("input_sha256") == input_sha256:
            return record
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
    saved as ``output/results.json`` (and its per-video table as ``results.csv``).
    ``weights`` only labels the run (e.g. a path); reuse checks the network's content."""
    output = Path(output)
    config = config or InferenceConfig(mem_every=eval_set.default_mem_every)
    core = InferenceCore(net, config)
    settings = _run_settings(eval_set, config, net, weights)
    masks_dir, records = _prepare_output(output, eval_set, settings, overwrite)

    per_video, reused = {}, []
    for video in console.progress(eval_set.videos, desc=eval_set.name, unit="video", enabled=progress):
        input_sha256 = video_input_sha256(video)
        record = None if overwrite else _finished_record(video, masks_dir, records, input_sha256)
        if record is not None:
            reused.append(video.name)
            console.debug(f"{video.name}: reused the earlier result (same weights, options, inputs)")
        else:
            labels, palette, record = _segment_video(core, video, core.device)
            record["input_sha256"] = input_sha256
            console.debug(f"{video.name}: {record['frames']} frames, {record['objects']} objects, "
                          f"{record['fps']:.2f} FPS")
            _write_video(video, labels, palette, masks_dir, records, record)
        per_video[video.name] = record

    summary = _summary(eval_set, settings, per_video, reused, core.device)
    if score and eval_set.ground_truth is not None:
        summary["scores"] = score_predictions(eval_set.ground_truth, masks_dir,
                                              [v.name for v in eval_set.videos],
                                              skip_first_and_last=eval_set.skip_first_and_last,
                                              workers=score_workers)
    write_results(output / RESULTS_FILE, summary, summary["scores"], per_video)
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
