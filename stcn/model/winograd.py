"""Winograd convolution for the decoder's 3x3, stride-1, padding-1 convolutions at CPU
inference.

F(m x m, 3 x 3) (Lavin & Gray 2016) computes an m x m output tile from an (m+2) x (m+2)
input tile with (m+2)^2 multiplies per input/output channel pair instead of 9 m^2:
2.25x fewer for m = 2, 4x fewer for m = 4. The work becomes

- the input transform V = B^T d B of every tile (additions, memory-bound),
- one matrix product per transform position: (tiles x C_in) @ (C_in x C_out), MKL sgemm,
- the output transform Y = A^T M A (additions).

The transforms here run on bands of tile rows so that a band's V and M stay in the CPU's
caches; their buffers are allocated once per call and reused (fresh large buffers cost a
page fault per 4 KiB). The transformed weights U = G g G^T are computed once per weight
and kept (see ``transformed_weight``).

Rounding differs from a direct convolution: with F(2) the error is of the size of the
direct convolution's own, with F(4) about ten times larger (the transforms' coefficients
reach 8 and 1/24): 1.4e-5 of the largest output at the decoder's widths. ``conv3x3``
falls back to ``F.conv2d`` wherever Winograd does not apply (autograd recording, other
devices or dtypes, no tile size given).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

# tile size m -> (B^T, G, A^T) of F(m x m, 3 x 3), interpolation points 0, +-1, (+-2,) inf.
TRANSFORMS = {
    2: ((( 1,  0, -1,  0), ( 0,  1,  1,  0), ( 0, -1,  1,  0), ( 0,  1,  0, -1)),   # noqa: E201
        ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}
# Tiles per band (all images of the batch, whole rows): about 100 keeps a band's buffers
# in cache while each matrix product still has ~100 rows (measured best at the decoder's
# sizes, 1 thread: 1/4 one tile row, 1/16 two).
BAND_TILES = 100
# Narrower outputs than this (the decoder's 1-channel prediction) stay direct: the matrix
# products would be vector products and the transforms would dominate.
MIN_OUT_CHANNELS = 16

_cache = WeakTensorKeyDictionary()   # weight -> {(tile, channels): (stamp, U)}


def applies(x: torch.Tensor, weight: torch.Tensor, tile: Optional[int]) -> bool:
    """Whether ``conv3x3`` takes the Winograd path for this input and weight."""
    return (tile is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and tuple(weight.shape[2:]) == (3, 3)
            and weight.shape[0] >= MIN_OUT_CHANNELS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def transform_weight(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """U = G g G^T for weight (C_out, C_in, 3, 3): ((m+2)^2, C_in, C_out), in float64 first
    so that U itself holds one rounding."""
    if tile not in TRANSFORMS:
        raise ValueError(f"Winograd tile size must be one of {sorted(TRANSFORMS)}, got {tile}")
    g = torch.tensor(TRANSFORMS[tile][1], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.detach().double(), g)
    return u.reshape(-1, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def transformed_weight(weight: torch.Tensor, tile: int,
                       channels: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``transform_weight(weight[:, lo:hi], tile)``, computed once per weight and kept while
    the weight lives. An in-place update (optimizer step, ``load_state_dict``) bumps the
    weight's version and a new tensor has a new address: either recomputes it."""
    key = (tile, channels)
    entries = _cache.setdefault(weight, {})
    stamp = (weight.data_ptr(), weight._version)
    hit = entries.get(key)
    if hit is None or hit[0] != stamp:
        part = weight if channels is None else weight[:, channels[0]:channels[1]]
        with torch.inference_mode(False), torch.no_grad():
            hit = entries[key] = (stamp, transform_weight(part, tile))
    return hit[1]


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            tile: Optional[int] = None, *, relu_input: bool = False,
            channels: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``F.conv2d(relu(x) if relu_input else x, weight[:, lo:hi], bias, padding=1)`` with
    ``channels`` = (lo, hi) (default: all of weight's input channels); by Winograd F(tile)
    where it applies (see ``applies``), else directly. x (N, C, H, W), any H and W; the
    Winograd result is channels-last."""
    part = weight if channels is None else weight[:, channels[0]:channels[1]]
    if not applies(x, weight, tile):
        return F.conv2d(F.relu(x) if relu_input else x, part, bias, padding=1)
    return winograd_conv3x3(x, transformed_weight(weight, tile, channels), bias, tile,
                            relu_input=relu_input)


def _combine(coefs: Sequence[float], terms: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """out = sum(c * t); a term with coefficient 1 goes first (every row of the transforms
    has one), so that no pass is spent on a multiplication alone."""
    nonzero = sorted(((float(c), t) for c, t in zip(coefs, terms) if c != 0),
                     key=lambda ct: ct[0] != 1)
    (c0, t0), rest = nonzero[0], nonzero[1:]
    if not rest:
        out.copy_(t0) if c0 == 1 else torch.mul(t0, c0, out=out)
        return
    if c0 == 1:
        torch.add(t0, rest[0][1], alpha=rest[0][0], out=out)
    else:
        torch.mul(t0, c0, out=out)
        out.add_(rest[0][1], alpha=rest[0][0])
    for c, t in rest[1:]:
        out.add_(t, alpha=c)


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor], tile: int,
                     *, relu_input: bool = False) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1, of x (N, C, H, W) with transformed
    weights u (``transform_weight``): (N, K, H, W), channels-last.

    With torch's thread count T > 1 the tile rows are split into T parts, each run by its
    own Python thread with one intra-op thread: the transforms are ~60 small operations
    per band, and with T intra-op threads every one of them is a fork-join of all T,
    which a busy machine turns into waits for descheduled threads (measured: the decoder
    5-10x slower than direct convolutions at load 4 on 2 cores)."""
    m = tile
    n, c, h, w = x.shape
    th, tw = -(-h // m), -(-w // m)                   # tiles down and across
    out = x.new_empty(n, th * m, tw * m, u.shape[2])
    band = max(1, BAND_TILES // (n * tw))             # tile rows per band
    parts = min(torch.get_num_threads(), -(-th // band))
    job = (x.permute(0, 2, 3, 1), u, bias, tile, relu_input, out, band)   # x as N, H, W, C
    if parts <= 1:
        _run_bands(*job, 0, th)
    else:
        cuts = [th * i // parts for i in range(parts + 1)]
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # process-wide in torch: restored below
        try:
            futures = [_pool(parts).submit(_run_part, modes, job, lo, hi)
                       for lo, hi in zip(cuts[:-1], cuts[1:])]
            for future in futures:
                future.result()
        finally:
            torch.set_num_threads(threads)
    if th * m != h or tw * m != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


_pools: dict = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="winograd")
    return _pools[workers]


def _run_part(modes, job, lo: int, hi: int) -> None:
    # Grad and inference modes are per thread: take the caller's (out is theirs to write).
    with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
        _run_bands(*job, lo, hi)


def _run_bands(xl: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor], tile: int,
               relu_input: bool, out: torch.Tensor, band: int, first: int, end: int) -> None:
    """Tile rows first..end-1 of the convolution of xl (N, H, W, C) into out (N, H', W', K)."""
    bt, _, at = TRANSFORMS[tile]
    m, a = tile, tile + 2
    n, h, w, c = xl.shape
    k = u.shape[2]
    tw = out.shape[2] // m
    wp = tw * m + 2                                   # padded width
    # The output transform's column where every row of A^T is 1: adding the bias to that
    # transform position adds it to every output pixel (one small pass instead of a full one).
    bias_at = next(j for j in range(a) if all(row[j] == 1 for row in at)) * (a + 1)
    padded = xl.new_zeros(n, band * m + 2, wp, c)     # a band's input rows, zero-padded
    rows_buf, v_buf, m_buf, o_buf = (xl.new_empty(size) for size in (
        a * n * band * wp * c, a * a * n * band * tw * c, a * a * n * band * tw * k,
        m * a * n * band * tw * k))
    for t0 in range(first, end, band):
        nb = min(end - t0, band)
        y0 = t0 * m - 1                               # image row of padded row 0
        lo, hi = max(y0, 0), min(y0 + nb * m + 2, h)
        if lo > y0:
            padded[:, :lo - y0].zero_()
        if y0 + nb * m + 2 > hi:
            padded[:, hi - y0:].zero_()
        inner = padded[:, lo - y0:hi - y0, 1:w + 1]
        if relu_input:
            torch.clamp(xl[:, lo:hi], min=0, out=inner)
        else:
            inner.copy_(xl[:, lo:hi])

        # V = B^T d B: along the rows of the tiles, then along their columns.
        rows = rows_buf[:a * n * nb * wp * c].view(a, n, nb, wp, c)
        taps = [padded[:, j::m][:, :nb] for j in range(a)]
        for r in range(a):
            _combine(bt[r], taps, rows[r])
        v = v_buf[:a * a * n * nb * tw * c].view(a, a, n, nb, tw, c)
        taps = [rows[:, :, :, j::m][:, :, :, :tw] for j in range(a)]
        for s in range(a):
            _combine(bt[s], taps, v[:, s])

        p = n * nb * tw
        prod = torch.bmm(v.view(a * a, p, c), u, out=m_buf[:a * a * p * k].view(a * a, p, k))
        if bias is not None:
            prod[bias_at].add_(bias)
        prod = prod.view(a, a, n, nb, tw, k)

        # Y = A^T M A, the columns written straight into the output's tile positions.
        half = o_buf[:m * a * p * k].view(m, a, n, nb, tw, k)
        taps = [prod[i] for i in range(a)]
        for r in range(m):
            _combine(at[r], taps, half[r])
        dest = out[:, t0 * m:(t0 + nb) * m].view(n, nb, m, tw, m, k).permute(2, 0, 1, 3, 4, 5)
        taps = [half[:, j] for j in range(a)]
        for s in range(m):
            _combine(at[s], taps, dest[..., s, :])
