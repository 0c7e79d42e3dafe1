"""`tools/bench_pipeline`: clips/s per core of the shard pipeline, and of the published
online loader's per-clip work measured in the same run, on synthetic data in the official
layouts (DAVIS 480p and the static sets at their real sizes).

Everything under "REFERENCE" is benchmark-only code: a re-implementation of what the
published STCN loader does per clip (PIL transforms in torchvision's order, colour jitter,
a dense full-resolution thin-plate-spline warp, tensor conversion and normalisation, with
numpy standing in for torch). It exists to measure the speed-up, nothing imports it.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageEnhance

from shards import codec

from pipelines.driver import JobConfig, make_clip, make_plan

#: the synthetic sets do not hold the videos of the published train lists
SYNTHETIC_SUBSET = {"davis": {"subset": "all"}, "youtube": {"subset": "all"}}


def _rate(make, clips: int, repeats: int = 3) -> tuple[float, float]:
    """(clips per CPU-second, clips per wall-second) of this single-threaded process, best
    of `repeats` rounds. The CPU figure is clips/s per core, robust to other jobs sharing
    the machine (the wall figure is then that of a fraction of a core)."""
    cpu = wall = 0.0
    for r in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for i in range(clips):
            make(r * clips + i)
        cpu = max(cpu, clips / max(time.process_time() - start_cpu, 1e-9))
        wall = max(wall, clips / max(time.perf_counter() - start_wall, 1e-9))
    return cpu, wall


def bench_ours(kind: str, root: Path, clips: int) -> tuple[tuple[float, float], float]:
    """((clips/s per core, wall clips/s), encoded bytes per clip) of the shard pipeline:
    read, decode, sample, warp, JPEG/mask encode."""
    plan = make_plan(JobConfig(kind, str(root), "unused", clips=10 ** 6, max_skip=25,
                               **SYNTHETIC_SUBSET.get(kind, {})))
    count = len(plan.source.items if kind == "static" else plan.source.videos)
    sizes = []

    def one(i: int):
        sample = make_clip(plan, i % count, i // count)
        sizes.append(sum(len(v) for k, v in codec.encode_sample(sample).items() if k != "__key__"))
    rate = _rate(one, clips)
    return rate, float(np.mean(sizes)) + 3 * 1536  # + tar headers of the three members


# --------------------------------------------------------------------------- REFERENCE
# Benchmark-only re-implementation of the published online loader (see module doc).

IM_MEAN = (124, 116, 104)
NORM_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
NORM_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _ref_affine(img, rng, degrees, scale, shear, fill, resample):
    """torchvision RandomAffine on a PIL image: inverse affine about the centre."""
    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(*scale)
    sh = rng.uniform(-shear, shear)
    w, h = img.size
    cx, cy = w * 0.5, h * 0.5
    a, b = math.radians(angle), math.radians(sh)
    m = np.array([[math.cos(a - b) / math.cos(b), -math.cos(a - b) * math.tan(b) / math.cos(b) - math.sin(a)],
                  [math.sin(a - b) / math.cos(b), -math.sin(a - b) * math.tan(b) / math.cos(b) + math.cos(a)]]) * s
    inv = np.linalg.inv(m)
    t = np.array([cx, cy]) - inv @ np.array([cx, cy])
    return img.transform((w, h), Image.AFFINE, (*inv[0], t[0], *inv[1], t[1]), resample,
                         fillcolor=fill)


def _ref_jitter(img, rng, b, c, s, hue):
    ops = []
    if b:
        ops.append(lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - b, 1 + b)))
    if c:
        ops.append(lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - c, 1 + c)))
    if s:
        ops.append(lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - s, 1 + s)))
    if hue:
        def shift(im):
            h, sat, v = im.convert("HSV").split()
            arr = (np.asarray(h, np.int16) + int(rng.uniform(-hue, hue) * 255)) % 256
            return Image.merge("HSV", (Image.fromarray(arr.astype(np.uint8)), sat, v)).convert("RGB")
        ops.append(shift)
    for i in rng.permutation(len(ops)):
        img = ops[i](img)
    return img


def _ref_gray(img, rng):
    return img.convert("L").convert("RGB") if rng.random() < 0.05 else img


def _ref_flip(img, flip):
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


def _ref_tps(img, mask, rng, std=0.02, n=12):
    """The published warp: TPS solved on 12 points, evaluated densely at every pixel."""
    img, mask = np.asarray(img), np.asarray(mask)
    h, w = mask.shape
    src = np.stack([rng.choice(h, n, replace=False) / h, rng.choice(w, n, replace=False) / w], 1)
    dst = src + rng.normal(scale=std, size=src.shape)

    def kernel(a, b):
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
        return d ** 2 * np.log(d + 1e-6)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = kernel(dst, dst)
    system[:n, n], system[n, :n] = 1, 1
    system[:n, n + 1:], system[n + 1:, :n] = dst, dst.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = src - dst
    theta = np.linalg.solve(system, rhs)
    gx, gy = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    disp = kernel(grid, dst) @ theta[:n] + theta[n] + grid @ theta[n + 1:]
    full = (grid + disp).reshape(h, w, 2)
    mx, my = (full[..., 0] * w).astype(np.float32), (full[..., 1] * h).astype(np.float32)
    return (Image.fromarray(cv2.remap(img, mx, my, cv2.INTER_LINEAR)),
            Image.fromarray(cv2.remap(mask, mx, my, cv2.INTER_NEAREST)))


def _ref_finish(img):
    return ((np.asarray(img, np.float32) / 255 - NORM_MEAN) / NORM_STD).transpose(2, 0, 1)


def reference_static_clip(image_path, mask_path, rng):
    im = Image.open(image_path).convert("RGB")
    gt = Image.open(mask_path).convert("L")
    flip = rng.random() < 0.5
    clip_seed = int(rng.integers(2 ** 31))
    frames, masks = [], []
    for _ in range(3):
        r = np.random.default_rng(clip_seed)
        this_im = _ref_flip(_ref_affine(im, r, 0, (0.8, 1.5), 0, IM_MEAN, Image.BICUBIC), flip)
        this_im = _ref_gray(_ref_jitter(this_im, r, 0.1, 0.05, 0.05, 0.05), r)
        r = np.random.default_rng(clip_seed)
        this_gt = _ref_flip(_ref_affine(gt, r, 0, (0.8, 1.5), 0, 0, Image.NEAREST), flip)
        pair_seed = int(rng.integers(2 ** 31))
        for target, fill, resample in ((0, IM_MEAN, Image.BICUBIC), (1, 0, Image.NEAREST)):
            r = np.random.default_rng(pair_seed)
            x = this_im if target == 0 else this_gt
            x = _ref_affine(x, r, 20, (0.9, 1.1), 10, fill, resample)
            w, h = x.size
            size = (384, int(384 * h / w)) if w <= h else (int(384 * w / h), 384)
            x = x.resize(size, resample)
            ox, oy = int(r.integers(0, size[0] - 383)), int(r.integers(0, size[1] - 383))
            x = x.crop((ox, oy, ox + 384, oy + 384))
            if target == 0:
                this_im = _ref_jitter(x, r, 0.1, 0.05, 0.05, 0)
            else:
                this_gt = x
        if rng.random() < 0.33:
            this_im, this_gt = _ref_tps(this_im, this_gt, rng)
        frames.append(_ref_finish(this_im))
        masks.append(np.asarray(this_gt, np.float32) / 255)
    return np.stack(frames), np.stack(masks)


def reference_video_clip(image_paths, mask_paths, rng, crop_scale=(0.36, 1.0)):
    flip = rng.random() < 0.5
    clip_seed = int(rng.integers(2 ** 31))
    frames, masks = [], []
    for image_path, mask_path in zip(image_paths, mask_paths):
        outs = []
        for path, mode, resample in ((image_path, "RGB", Image.BICUBIC), (mask_path, "P", Image.NEAREST)):
            r = np.random.default_rng(clip_seed)
            x = _ref_flip(Image.open(path).convert(mode), flip)
            w, h = x.size
            for _ in range(10):
                area = w * h * r.uniform(*crop_scale)
                ratio = math.exp(r.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
                if 0 < cw <= w and 0 < ch <= h:
                    cx, cy = int(r.integers(0, w - cw + 1)), int(r.integers(0, h - ch + 1))
                    break
            else:
                cx, cy, cw, ch = 0, 0, w, h
            x = x.resize((384, 384), resample, box=(cx, cy, cx + cw, cy + ch))
            if mode == "RGB":
                x = _ref_gray(_ref_jitter(x, r, 0.1, 0.03, 0.03, 0), r)
            outs.append(x)
        pair_seed = int(rng.integers(2 ** 31))
        r = np.random.default_rng(pair_seed)
        im = _ref_jitter(_ref_affine(outs[0], r, 15, (1, 1), 10, IM_MEAN, Image.BICUBIC), r, 0.01, 0.01, 0.01, 0)
        r = np.random.default_rng(pair_seed)
        gt = _ref_affine(outs[1], r, 15, (1, 1), 10, 0, Image.NEAREST)
        frames.append(_ref_finish(im))
        masks.append(np.asarray(gt))
    masks = np.stack(masks)
    labels = [l for l in np.unique(masks[0]) if l != 0]
    target = labels[int(rng.integers(len(labels)))] if labels else -1
    return np.stack(frames), (masks == target).astype(np.float32)


def bench_reference(kind: str, root: Path, clips: int) -> tuple[float, float]:
    plan = make_plan(JobConfig(kind, str(root), "unused", clips=1, max_skip=25,
                               **SYNTHETIC_SUBSET.get(kind, {})))
    rng = np.random.default_rng(0)
    if kind == "static":
        items = plan.source.items
        return _rate(lambda i: reference_static_clip(items[i % len(items)].image,
                                                     items[i % len(items)].mask, rng), clips)
    tree = plan.source

    def one(i):
        video = tree.videos[i % len(tree.videos)]
        n = len(video.frames)
        start = int(rng.integers(0, n - 2))
        names = [video.frames[start + k] for k in range(3)]
        reference_video_clip([tree.image_dir / video.name / f"{f}.jpg" for f in names],
                             [tree.mask_dir / video.name / f"{f}.png" for f in names], rng)
    return _rate(one, clips)


# --------------------------------------------------------------------------- the benchmark

def run_benchmark(clips: int = 60, reference_clips: int = 15, workdir: str | None = None,
                  echo=print) -> dict:
    """Make synthetic DAVIS (480p) and static sets, then measure both pipelines on one core."""
    from pipelines.synthetic import make_synthetic
    cv2.setNumThreads(1)
    results = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        roots = {"davis": make_synthetic("davis", Path(tmp) / "davis", videos=4, frames=30, seed=0),
                 "static": make_synthetic("static", Path(tmp) / "static", videos=6, seed=0)}
        for kind, root in roots.items():
            (ours, ours_wall), size = bench_ours(kind, root, clips)
            reference, reference_wall = bench_reference(kind, root, reference_clips)
            results[kind] = {"clips_per_s": ours, "wall_clips_per_s": ours_wall,
                             "reference_clips_per_s": reference,
                             "reference_wall_clips_per_s": reference_wall,
                             "bytes_per_clip": size}
            echo(f"{kind:6s} shard pipeline {ours:5.1f} clips/s/core (JPEG encode included; "
                 f"wall {ours_wall:5.1f}), published loader re-implementation {reference:5.1f} "
                 f"(wall {reference_wall:5.1f}), x{ours / reference:.1f}; "
                 f"{size / 1e3:.0f} KB per clip")
    return results
