"""Evaluation on DAVIS, YouTubeVOS and generic video folders.

Readers (``davis``, ``youtube``, ``generic``) describe a split as an ``EvalSet``;
``run_evaluation`` segments it with a built network, writes indexed PNGs, times the
inference, scores with vos-benchmark when ground truth exists and saves ``results.json``.
``evaluate_davis`` and ``copy_first_frame_baseline`` are the in-process entry points the
trainer and the demo use for held-out J&F.
"""

from stcn.evaluation.datasets import EvalSet, VideoSpec, davis, generic, load_video, youtube
from stcn.evaluation.driver import (
                                   copy_first_frame_baseline,
                                   evaluate_davis,
                                   format_scores,
                                   format_summary,
                                   network_sha256,
                                   run_evaluation,
                                   write_results,
)
from stcn.evaluation.files import DatasetError, davis_palette, write_json_atomic
from stcn.evaluation.scoring import score_predictions
from stcn.model.weights import build_network  # one home each: the network builder, the device rule
from stcn.train.distributed import resolve_device

__all__ = ["DatasetError", "EvalSet", "VideoSpec", "build_network", "copy_first_frame_baseline",
           "davis", "davis_palette", "evaluate_davis", "format_scores", "format_summary", "generic",
           "load_video", "network_sha256", "resolve_device", "run_evaluation", "score_predictions",
           "write_json_atomic", "write_results", "youtube"]
