"""Bootstrapped cross-entropy with the published schedule, and the per-frame IoU metric.

Plain CE before `start`; from `start` to `end` only the hardest fraction of pixels of each
sample is kept, that fraction falling linearly from 100% to `final_fraction`; after `end`
it stays at `final_fraction` (published: 20K, 70K, 15%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bootstrap_fraction(iteration: int, start: int, end: int, final_fraction: float) -> float:
    """Fraction of pixels kept by the bootstrapped CE at `iteration`."""
    if iteration < start:
        return 1.0
    if iteration >= end or end == start:
        return final_fraction
    progress = (iteration - start) / (end - start)
    return 1.0 - (1.0 - final_fraction) * progress


def bootstrapped_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    fraction: float,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of each sample's CE over its hardest `fraction` of pixels.

    logits: (B, C, H, W), channel 0 background. target: (B, H, W) class ids (long).
    present: optional (B, C) bool; a class that is absent for a sample (no second object)
    is left out of that sample's softmax, as if the network had no such output.
    """
    logits = logits.float()
    if present is not None:
        logits = logits.masked_fill(~present[:, :, None, None], torch.finfo(logits.dtype).min)
    per_pixel = F.cross_entropy(logits, target, reduction="none").flatten(1)  # (B, HW)
    if fraction >= 1.0:
        return per_pixel.mean()
    keep = max(1, int(per_pixel.shape[1] * fraction))
    hardest, _ = torch.topk(per_pixel, keep, dim=1, sorted=False)
    return hardest.mean()


def mask_iou(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks accumulated over the whole batch (1 when both are empty)."""
    prediction, target = prediction.bool(), target.bool()
    intersection = (prediction & target).sum().float()
    union = (prediction | target).sum().float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


__all__ = ["bootstrap_fraction", "bootstrapped_cross_entropy", "mask_iou"]
