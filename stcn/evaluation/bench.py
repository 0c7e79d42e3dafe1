"""Inference speed on a synthetic in-memory video (no file IO, random weights by default),
ours next to the published code's.

The video is smooth random texture panning across the frame, with ``objects`` discs as
the first-frame mask; speed does not depend on what the pixels show, only on the size,
the number of objects and the memory settings.

The published side (``PublishedInference``) runs the published inference (its
``model.eval_network.STCN`` and ``inference_core.InferenceCore``, from a checkout the user
passes, never vendored) in its own process, with OUR network's weights (the state-dict
layouts are the same), on the same synthetic video, driven round by round over a pipe, so
the two alternate on the machine and their masks can be compared. Its code is written for
CUDA (``.cuda()`` calls, a hard-coded device): on CPU the child points those at the CPU;
its ResNets would download ImageNet weights at construction, which the child skips (the
weights are replaced anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shards.child import LineChild

from stcn.inference.core import Annotation, InferenceConfig, InferenceCore

# A pixel whose label differs from the published code's is a near tie when the published
# probability of our label is within this of the published best:
# float rounding (our channels-last convolutions, sparse readout) can flip such a pixel
# only. Random weights make such ties common (~5% of pixels at 240x432).
NEAR_TIE = 1e-5


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
    return OursInference(net, config, frames=frames, objects=objects, size=size).run()


class OursInference:
    """Our inference core on the synthetic video, warmed up at construction; ``run`` times
    one whole video (``keep_masks``: the label maps come back under "masks")."""

    def __init__(self, net: torch.nn.Module, config: InferenceConfig = InferenceConfig(), *,
                 frames: int = 40, objects: int = 3, size: tuple[int, int] = (480, 854)):
        self.core = InferenceCore(net, config)
        self.config, self.frames, self.objects, self.size = config, frames, objects, size
        video, mask = synthetic_video(frames, objects, size)
        self.video = video.to(self.core.device)
        self.annotation = [Annotation(0, mask, tuple(range(1, objects + 1)))]
        self.core.segment(self.video[:min(3, frames)], self.annotation, objects)  # warm-up

    def run(self, keep_masks: bool = False) -> dict:
        device = self.core.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        masks = self.core.segment(self.video, self.annotation, self.objects)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        result = {"frames": self.frames, "seconds": seconds, "fps": self.frames / seconds,
                  "cpu_seconds": time.process_time() - start_cpu,
                  "device": str(device), "amp": self.config.amp, "size": list(self.size),
                  "objects": self.objects}
        if device.type == "cuda":
            result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        if keep_masks:
            result["masks"] = np.stack([masks[t] for t in range(self.frames)])
        return result


class PublishedInference:
    """The published inference in a child process (``python -m stcn.evaluation.bench``) on
    the same synthetic video with ``net``'s weights; ``run`` times one whole video there
    (as the published eval_davis.py times it: from building its InferenceCore to the label
    maps, inputs already on the device)."""

    def __init__(self, checkout: str, net: torch.nn.Module, config: InferenceConfig, *,
                 frames: int, objects: int, size: tuple[int, int], threads: int | None = None,
                 torchvision_dir: str | None = None):
        self._tmp = tempfile.TemporaryDirectory()
        weights = Path(self._tmp.name) / "weights.pth"
        torch.save(net.state_dict(), weights)
        self.masks_path = Path(self._tmp.name) / "masks.npz"
        self.ours_path = Path(self._tmp.name) / "ours.npy"
        device = next(net.parameters()).device
        request = {"checkout": str(checkout), "weights": str(weights), "frames": frames,
                   "objects": objects, "size": list(size), "top_k": config.top_k,
                   "mem_every": config.mem_every, "include_last": config.include_last,
                   "amp": config.amp is not None, "device": str(device),
                   "threads": threads or torch.get_num_threads(), "masks": str(self.masks_path),
                   "ours": str(self.ours_path),
                   "torchvision_dir": torchvision_dir}
        self.child = LineChild("stcn.evaluation.bench", request, "the published inference")
        self.child.ask("warm-up")

    def run(self, keep_masks: bool = False, ours: np.ndarray | None = None) -> dict:
        """With ``keep_masks`` the label maps come back under "masks"; given ``ours`` (our
        label maps), also "gap": per pixel, the published probability of its best label
        minus that of ours (0 where they agree)."""
        if ours is not None:
            np.save(self.ours_path, ours)
        result = self.child.ask("masks" if keep_masks else "run")
        if keep_masks:
            with np.load(self.masks_path) as saved:
                result["masks"] = saved["labels"]
                if "gap" in saved:
                    result["gap"] = saved["gap"]
        return result

    def close(self) -> None:
        self.child.close(timeout=120)
        self._tmp.cleanup()


def _torchvision_models(torchvision_dir: str | None) -> None:
    """The published key encoder builds torchvision's ResNet-50 with pretrained=True: give
    it torchvision's own ResNet module (from the installed torchvision, or from an unpacked
    wheel in `torchvision_dir` without its compiled operators) with no weights to fetch."""
    if torchvision_dir:
        package = types.ModuleType("torchvision")
        package.__path__ = [str(Path(torchvision_dir) / "torchvision")]
        sys.modules["torchvision"] = package
    else:
        import torchvision as package
    models = types.ModuleType("torchvision.models")
    models.__path__ = [str(Path(package.__path__[0]) / "models")]
    sys.modules["torchvision.models"] = package.models = models
    from torchvision.models import resnet
    models.resnet50 = lambda pretrained=False, **kwargs: resnet.resnet50(weights=None)


def _published_child(checkout, weights, frames, objects, size, top_k, mem_every, include_last,
                     amp, device, threads, masks, ours, torchvision_dir=None) -> None:
    """The child's loop (see PublishedInference): one JSON line per stdin line."""
    torch.set_num_threads(threads)
    torch.autograd.set_grad_enabled(False)  # as the published eval scripts do
    device = torch.device(device)
    sys.path.insert(0, checkout)
    _torchvision_models(torchvision_dir)
    from model import mod_resnet
    mod_resnet.load_weights_sequential = lambda *args, **kwargs: None  # no ImageNet download
    mod_resnet.model_zoo = types.SimpleNamespace(load_url=lambda *args, **kwargs: None)
    import inference_core
    from model.eval_network import STCN as PublishedSTCN
    if device.type != "cuda":  # its code says .cuda() and device='cuda'
        torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)

        class _Torch(types.ModuleType):
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def zeros(*args, device=None, **kwargs):
                return torch.zeros(*args, device=_device, **kwargs)
        _device = device
        inference_core.torch = _Torch("torch")
    net = PublishedSTCN().to(device).eval()
    net.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    video, mask = synthetic_video(frames, objects, tuple(size))
    rgb = video.unsqueeze(0).to(device)                                  # 1, T, 3, H, W
    one_hot = torch.stack([(mask == k + 1).float() for k in range(objects)])[:, None].to(device)
    autocast = (torch.autocast(device_type="cuda", enabled=True) if amp
                else contextlib.nullcontext())

    def segment(length: int):
        """Label maps (T, H, W), and the core (its probabilities)."""
        with autocast:
            core = inference_core.InferenceCore(net, rgb[:, :length], objects, top_k=top_k,
                                                mem_every=mem_every, include_last=include_last)
            core.interact(one_hot, 0, length)
            out = torch.zeros((length, *size), dtype=torch.uint8, device=device)
            for t in range(length):
                prob = core.prob[:, t]
                left, right, top, bottom = core.pad
                prob = prob[..., top:prob.shape[-2] - bottom, left:prob.shape[-1] - right]
                out[t] = torch.argmax(prob[:, 0], dim=0)
            return out.cpu().numpy(), core

    def gap_to(core, labels: np.ndarray) -> np.ndarray:
        """Per pixel: the best probability minus that of ``labels`` (T, H, W)."""
        left, right, top, bottom = core.pad
        prob = core.prob[..., top:core.prob.shape[-2] - bottom, left:core.prob.shape[-1] - right]
        prob = prob[:, :, 0].float()
        theirs = prob.gather(0, torch.from_numpy(labels).long().to(prob.device)[None])[0]
        return (prob.max(0).values - theirs).cpu().numpy()

    out_pipe = sys.stdout
    sys.stdout = sys.stderr  # whatever the published code prints stays off the pipe
    for line in sys.stdin:
        what = line.strip()
        if what == "warm-up":
            segment(min(3, frames))
            out_pipe.write(json.dumps({"warm": True}) + "\n")
            out_pipe.flush()
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        labels, core = segment(frames)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        result = {"frames": frames, "seconds": seconds, "fps": frames / seconds,
                  "cpu_seconds": time.process_time() - start_cpu,
                  "device": str(device), "amp": "fp16" if amp else None, "size": list(size),
                  "objects": objects}
        if device.type == "cuda":
            result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        if what == "masks":
            gap = {"gap": gap_to(core, np.load(ours))} if os.path.exists(ours) else {}
            np.savez(masks, labels=labels, **gap)
        del core
        out_pipe.write(json.dumps(result) + "\n")
        out_pipe.flush()


@torch.no_grad()
def tame_random_keys(net: torch.nn.Module, objects: int = 3, size: tuple[int, int] = (480, 854),
                     norm: float = 8.0) -> None:
    """Scale a RANDOMLY initialised network's key projection so the keys of the synthetic
    video's first frame have norms of at most `norm`. Random keys are long enough that
    exp() of their affinities overflows in float32 in the published top-k softmax (it
    does not subtract the maximum; trained keys never get there), which makes its masks
    all background; tamed, both implementations compute finite masks that can be
    compared. Speed does not change."""
    video, _ = synthetic_video(1, objects, size)
    device = next(net.parameters()).device
    frame = F.pad(video[:1].to(device), (0, -size[1] % 16, 0, -size[0] % 16))
    was_training = net.training
    net.eval()
    key = net.encode_key(frame)[0]
    net.train(was_training)
    longest = float(key.norm(dim=1).max())
    if longest > norm:
        net.key_proj.key_proj.weight.mul_(norm / longest)
        net.key_proj.key_proj.bias.mul_(norm / longest)


def tie_check(ours: np.ndarray, published: dict) -> dict:
    """Where our label maps differ from the published ones (``published``: "masks" and
    "gap" from its run): "masks_differing_beyond_ties", how many differing pixels are not
    near ties (the published probability of our label within ``NEAR_TIE`` of its best),
    and "largest_gap_at_differing", the largest such published gap."""
    if ours.shape != published["masks"].shape or "gap" not in published:
        return {"masks_differing_beyond_ties": None, "largest_gap_at_differing": None}
    gaps = published["gap"][ours != published["masks"]]
    return {"masks_differing_beyond_ties": int((gaps > NEAR_TIE).sum()),
            "largest_gap_at_differing": float(gaps.max()) if gaps.size else None}


def compare_inference(net: torch.nn.Module, config: InferenceConfig = InferenceConfig(), *,
                      published: str | None = None, frames: int = 40, objects: int = 3,
                      size: tuple[int, int] = (480, 854), rounds: int = 1,
                      threads: int | None = None, torchvision_dir: str | None = None) -> dict:
    """Ours and (with `published`, a checkout) the published inference on the same video
    and weights, alternating `rounds` timed runs each after a warm-up; each side's figure
    is its median round. Returns {"ours": result, "published": result or None, "ratio":
    ours FPS / published FPS or None, "masks_equal": bool or None (every label map of the
    first round equal), "cpu_ratio": published CPU seconds / ours} and, with `published`,
    "masks_differing_pixels" and ``tie_check``'s figures."""
    ours = OursInference(net, config, frames=frames, objects=objects, size=size)
    pub = (PublishedInference(published, net, config, frames=frames, objects=objects,
                              size=size, threads=threads, torchvision_dir=torchvision_dir)
           if published else None)
    ours_runs, pub_runs = [], []
    try:
        for r in range(rounds):
            ours_runs.append(ours.run(keep_masks=r == 0))
            if pub is not None:
                pub_runs.append(pub.run(keep_masks=r == 0,
                                        ours=ours_runs[-1]["masks"] if r == 0 else None))
    finally:
        if pub is not None:
            pub.close()

    def median(runs):
        best = sorted(runs, key=lambda x: x["fps"])[len(runs) // 2]
        return {k: v for k, v in best.items() if k not in ("masks", "gap")}
    result = {"ours": median(ours_runs), "published": None, "ratio": None, "cpu_ratio": None,
              "masks_equal": None}
    if pub_runs:
        result["published"] = median(pub_runs)
        result["ratio"] = result["ours"]["fps"] / result["published"]["fps"]
        # CPU seconds of each process: on a shared machine, the steadier figure
        result["cpu_ratio"] = (result["published"]["cpu_seconds"]
                               / max(result["ours"]["cpu_seconds"], 1e-9))
        a, b = ours_runs[0]["masks"], pub_runs[0]["masks"]
        result["masks_equal"] = bool(a.shape == b.shape and np.array_equal(a, b))
        result["masks_differing_pixels"] = int((a != b).sum()) if a.shape == b.shape else None
        result.update(tie_check(a, pub_runs[0]))
    return result


if __name__ == "__main__":  # the published inference's process (see PublishedInference)
    _published_child(**json.loads(sys.argv[1]))
