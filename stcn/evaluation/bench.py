"""Inference speed on a synthetic in-memory video (no file IO, random weights by default).

The video is smooth random texture panning across the frame, with ``objects`` discs as
the first-frame mask; speed does not depend on what the pixels show, only on the size,
the number of objects and the memory settings.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from stcn.inference import Annotation, InferenceConfig, InferenceCore


def synthetic_video(frames: int, objects: int, size: tuple[int, int], seed: int = 0):
    """(T, 3, H, W) normalised-looking frames and a first-frame mask with ``objects`` discs."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    texture = F.interpolate(torch.randn(1, 3, h // 8 + 1, (w + 4 * frames) // 8 + 1, generator=g),
                            size=(h, w + 4 * frames), mode="bilinear", align_corners=False)[0]
    video = torch.stack([texture[:, :, 4 * t:4 * t + w] for t in range(frames)])
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = torch.zeros(h, w, dtype=torch.long)
    for k in range(objects):
        cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)) * torch.tensor([h, w])
        radius = min(h, w) * 0.12
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = k + 1
    return video, mask


def benchmark_inference(net: torch.nn.Module, config: InferenceConfig = InferenceConfig(), *,
                        frames: int = 40, objects: int = 3, size: tuple[int, int] = (480, 854)) -> dict:
    """Time ``InferenceCore.segment`` on the synthetic video (after a short warm-up run).

    Returns {"frames", "seconds", "fps", "device", "amp", "size", "objects"} and
    "peak_gpu_memory_mib" on CUDA.
    """
    core = InferenceCore(net, config)
    device = core.device
    video, mask = synthetic_video(frames, objects, size)
    video = video.to(device)
    annotation = [Annotation(0, mask, tuple(range(1, objects + 1)))]
    core.segment(video[:min(3, frames)], annotation, objects)    # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    core.segment(video, annotation, objects)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {"frames": frames, "seconds": seconds, "fps": frames / seconds, "device": str(device),
              "amp": config.amp, "size": list(size), "objects": objects}
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result
