"""Soft aggregation of per-object probabilities into one distribution (from STM).

Each object is decoded on its own into a probability p_i. The background gets
prod_i (1 - p_i); every entry is clamped to [1e-7, 1 - 1e-7], turned into the logit
log(p / (1 - p)), and a softmax across objects + background makes them sum to 1.
"""

import torch

CLAMP_EPS = 1e-7


def aggregate_logits(prob: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Logits with the background prepended along ``dim`` (K objects -> K + 1)."""
    background = torch.prod(1 - prob, dim=dim, keepdim=True)
    with_bg = torch.cat([background, prob], dim).clamp(CLAMP_EPS, 1 - CLAMP_EPS)
    return torch.log(with_bg / (1 - with_bg))


def aggregate(prob: torch.Tensor, keep_bg: bool = False) -> torch.Tensor:
    """Published inference aggregation; objects along dim 0, e.g. prob (K, 1, H, W).

    Returns the softmax-normalised probabilities, (K + 1, ...) with the background
    first when ``keep_bg`` is true, otherwise the K object channels only.
    """
    merged = torch.softmax(aggregate_logits(prob, dim=0), dim=0)
    return merged if keep_bg else merged[1:]
