"""Space-time memory reading: key affinity, softmax over memory, value readout.

Shapes use the flattened layout of the published implementation:
memory keys ``mk`` (B, CK, N) with N = T*h*w memory positions, query keys ``qk``
(B, CK, M) with M = h*w query positions, memory values ``mv`` (B, CV, N).
Every function also accepts the unflattened (B, C, T, h, w) / (B, C, h, w) forms.

The affinity is the negative squared L2 distance between keys with the query's own
norm dropped (it is the same for every memory position of one query, so the softmax
over memory positions does not see it): (2 k_m.k_q - |k_m|^2) / sqrt(CK).
The softmax always runs over dim 1, the memory positions.
"""

import math

import torch
import torch.nn.functional as F


def _flatten_positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, C, prod(...)); 3-d tensors pass through."""
    return x if x.dim() == 3 else x.flatten(start_dim=2)


def get_affinity(mk: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
    """Unnormalised affinity (B, N, M) between memory keys and query keys.

    Apply ``softmax_full`` (training) or ``softmax_top_k`` (inference) on the result.
    """
    mk = _flatten_positions(mk)
    qk = _flatten_positions(qk)
    key_dim = mk.shape[1]
    mk_sq = mk.pow(2).sum(1).unsqueeze(2)          # B, N, 1
    mk_dot_qk = mk.transpose(1, 2) @ qk            # B, N, M
    return (2 * mk_dot_qk - mk_sq) / math.sqrt(key_dim)


def softmax_full(affinity: torch.Tensor) -> torch.Tensor:
    """Softmax over all memory positions (dim 1), as in published training."""
    return torch.softmax(affinity, dim=1)


def softmax_top_k(affinity: torch.Tensor, top_k: int, inplace: bool = False) -> torch.Tensor:
    """Softmax over the ``top_k`` largest affinities of each query; others become 0.

    ``top_k`` is clipped to the number of memory positions. With ``inplace=True`` the
    input tensor is overwritten and returned, which saves one (B, N, M) allocation
    (the published inference does this); the default leaves the input untouched.
    The maximum is subtracted before ``exp`` (mathematically a no-op) so large
    affinities cannot overflow under fp16 autocast.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    k = min(top_k, affinity.shape[1])
    values, indices = torch.topk(affinity, k=k, dim=1)
    weights = torch.exp(values - values[:, :1])     # topk sorts: row 0 is the maximum
    weights = weights / weights.sum(dim=1, keepdim=True)
    out = affinity.zero_() if inplace else torch.zeros_like(affinity)
    return out.scatter_(1, indices, weights)


def readout(affinity: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    """Affinity-weighted sum of memory values: (B, CV, N) x (B, N, M) -> (B, CV, M).

    An affinity with batch 1 is shared by all B value batches (one affinity serves
    every object, it depends only on the images).
    """
    mv = _flatten_positions(mv)
    if affinity.shape[0] == 1 and mv.shape[0] != 1:
        affinity = affinity.expand(mv.shape[0], -1, -1)
    return torch.bmm(mv, affinity)


def key_terms(mk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory-side terms of ``get_affinity`` for ``top_k_readout``, computed once per
    memory frame: keys (B, CK, N) scaled by 2/sqrt(CK), and |k_m|^2 / sqrt(CK) (B, N, 1).

    With CK = 64 both scalings are by powers of two, hence exact: the affinities come out
    bit-identical to ``get_affinity``'s (so the same memory positions make the top k)."""
    mk = _flatten_positions(mk)
    scale = math.sqrt(mk.shape[1])
    return mk * (2 / scale), mk.pow(2).sum(1).unsqueeze(2) / scale


def top_k_readout(scaled_keys: torch.Tensor, norms: torch.Tensor, qk: torch.Tensor,
                  values: torch.Tensor, top_k: int) -> torch.Tensor:
    """``readout(softmax_top_k(get_affinity(mk, qk), top_k), mv)`` without the dense
    (N, M) weights: each query sums its ``top_k`` memory values only.

    scaled_keys (1, CK, N) and norms (1, N, 1) from ``key_terms``; qk (1, CK, M);
    values (N, C), position-major (C = objects x value channels). Returns (M, C).
    Equal to the dense form up to float rounding (the sums run in another order); the
    affinities, and so the chosen positions, are exactly those of ``get_affinity``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    qk = _flatten_positions(qk)
    # The published orientation (N, M) of the product, so its rounding is the same; the
    # subtraction writes it transposed, (M, N), where top-k runs along contiguous memory.
    product = scaled_keys.transpose(1, 2) @ qk
    affinity = torch.empty(product.shape[0], product.shape[2], product.shape[1],
                           dtype=torch.promote_types(product.dtype, norms.dtype),
                           device=product.device)
    torch.sub(product.transpose(1, 2), norms.transpose(1, 2), out=affinity)
    del product
    weights, indices = torch.topk(affinity[0], k=min(top_k, affinity.shape[2]), dim=1)
    del affinity
    weights = torch.exp(weights - weights[:, :1])   # topk sorts: column 0 is the maximum
    weights = weights / weights.sum(dim=1, keepdim=True)
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype),
                           mode="sum")
