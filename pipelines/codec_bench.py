"""`tools/bench_codec`: what the shards' frame encoding costs, on 384x384 clips of our
pipeline (synthetic DAVIS at 480p, max skip 5).

For each setting: PSNR against the clip before encoding (the lossless reference), bytes of the
frames member per clip, and the loader's decode rate of that member (clips per CPU-second of
this single-threaded process, the figure robust to a shared machine, and per wall-second).
JPEG settings are decoded as the loader decodes (`shards.codec.decode_jpeg`, into a reused
buffer), and for them a shard set is written and read back by the loader itself (one
process, batch 4, `shards.bench`); the lossless PNG and WebP rows, which the shard format
does not offer, are decoded with OpenCV.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shards import codec
from shards.bench import run_benchmark
from shards.manifest import Manifest, write_manifest
from shards.writer import write_encoded_shard

from pipelines.driver import JobConfig, make_clip, make_plan
from pipelines.synthetic import make_synthetic


@dataclass(frozen=True)
class Setting:
    name: str
    ext: str               # ".jpg", ".png", ".webp"
    params: tuple = ()     # OpenCV imencode parameters
    jpeg: bool = True      # decoded by the loader's JPEG decoder


def jpeg(quality: int, sampling: str) -> Setting:
    default = (quality, sampling) == (codec.DEFAULT_JPEG_QUALITY, codec.DEFAULT_JPEG_SAMPLING)
    return Setting(f"JPEG q{quality} {sampling[0]}:{sampling[1]}:{sampling[2]}"
                   + (" (default)" if default else ""), ".jpg",
                   (cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                    codec.JPEG_SAMPLING[sampling]))


#: q90 4:2:0 (the shards' setting before this measurement, the ratios' reference), the
#: issue's q95 4:4:4, the two steps between them (quality alone, chroma alone), and two
#: lossless references
SETTINGS = (jpeg(90, "420"), jpeg(95, "420"), jpeg(90, "444"), jpeg(95, "444"),
            Setting("PNG (lossless, level 1)", ".png", (cv2.IMWRITE_PNG_COMPRESSION, 1), False),
            Setting("WebP (lossless)", ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101), False))


def make_clips(workdir, count: int, seed: int = 0,
               size: tuple[int, int] | None = None) -> list[dict]:
    """`count` clip samples of our pipeline (frames (3, 384, 384, 3) uint8 RGB) from a
    synthetic DAVIS (480x854 frames unless `size` (H, W) is given)."""
    root = make_synthetic("davis", Path(workdir) / "davis", videos=4, frames=30, seed=seed,
                          size=size, overwrite=True)
    plan = make_plan(JobConfig("davis", str(root), "unused", clips=count, max_skip=5, seed=seed,
                               subset="all"))
    videos = len(plan.source.videos)
    return [make_clip(plan, i % videos, i // videos) for i in range(count)]


def _encode(strip_rgb: np.ndarray, setting: Setting) -> bytes:
    ok, data = cv2.imencode(setting.ext, cv2.cvtColor(strip_rgb, cv2.COLOR_RGB2BGR),
                            list(setting.params))
    if not ok:
        raise ValueError(f"OpenCV cannot encode {setting.name}")
    return data.tobytes()


def _decoder(setting: Setting, shape):
    buffer = np.empty(shape, np.uint8)
    if setting.jpeg:
        return lambda data: codec.decode_jpeg(data, buffer)
    return lambda data: cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8),
                                                  cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def loader_rate(clips: list[dict], setting: Setting, workdir, batch_size: int = 4,
                repeats: int = 3) -> float:
    """Clips/s of the shard loader (one process, `shards.bench`) over a set of `clips`
    written with a JPEG `setting`."""
    quality, factor = setting.params[1], setting.params[3]
    sampling = next(k for k, v in codec.JPEG_SAMPLING.items() if v == factor)
    url = str(Path(workdir) / setting.name.split(" (")[0].replace(" ", "_").replace(":", ""))
    infos = [write_encoded_shard(f"{url}/shard-{i // 100:06d}.tar",
                                 [codec.encode_sample(c, quality, sampling)
                                  for c in clips[i:i + 100]])
             for i in range(0, len(clips), 100)]
    write_manifest(url, Manifest(shards=infos, config={"generator": "pipelines.codec_bench"}))
    return run_benchmark(url, batch_size, workers=0, repeats=repeats)["tar_1_process"]


def measure(clips: list[np.ndarray], setting: Setting, repeats: int = 3) -> dict:
    """PSNR (dB, over every pixel of every clip), bytes per clip of the frames member, and
    decode rates (clips/s per CPU-second and per wall-second, best of `repeats`)."""
    strips = [np.ascontiguousarray(c).reshape(-1, *c.shape[2:]) for c in clips]
    c0 = time.process_time()
    encoded = [_encode(s, setting) for s in strips]
    encode_rate = len(strips) / max(time.process_time() - c0, 1e-9)
    decode = _decoder(setting, strips[0].shape)
    squared = 0.0
    for strip, data in zip(strips, encoded):
        squared += float(((decode(data).astype(np.float64) - strip) ** 2).sum())
    mse = squared / sum(s.size for s in strips)
    cpu = wall = 0.0
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for data in encoded:
            decode(data)
        cpu = max(cpu, len(encoded) / max(time.process_time() - c0, 1e-9))
        wall = max(wall, len(encoded) / max(time.perf_counter() - w0, 1e-9))
    return {"setting": setting.name, "psnr": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse),
            "bytes": float(np.mean([len(d) for d in encoded])), "cpu_rate": cpu, "wall_rate": wall,
            "encode_rate": encode_rate}


def format_table(rows: list[dict]) -> list[str]:
    """Markdown table with ratios to the first row (the reference setting)."""
    ref = rows[0]
    lines = ["| setting | PSNR vs lossless (dB) | KB per clip (frames) | x bytes | decode clips/s "
             "(per CPU-s) | x decode speed | decode clips/s (wall) | encode clips/s (per CPU-s) "
             "| loader clips/s (wall, batch 4) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "lossless" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
        lines.append(f"| {r['setting']} | {psnr} | {r['bytes'] / 1024:.1f} | "
                     f"{r['bytes'] / ref['bytes']:.2f} | {r['cpu_rate']:.0f} | "
                     f"{r['cpu_rate'] / ref['cpu_rate']:.2f} | {r['wall_rate']:.0f} | "
                     f"{r['encode_rate']:.0f} | "
                     + (f"{r['loader']:.0f} |" if r.get("loader") else "- |"))
    return lines


def run_codec_bench(clips: int = 100, workdir=None, repeats: int = 3, seed: int = 0,
                    echo=print) -> list[dict]:
    cv2.setNumThreads(1)  # one core, like one loader worker
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        samples = make_clips(tmp, clips, seed)
        frames = [c["frames"] for c in samples]
        rows = [measure(frames, s, repeats) for s in SETTINGS]
        for row, setting in zip(rows, SETTINGS):
            if setting.jpeg:  # the shard format stores JPEG frames only
                row["loader"] = loader_rate(samples, setting, tmp, repeats=repeats)
    echo(f"{clips} clips of 3 x 384x384 (synthetic DAVIS 480p, max skip 5), decoder "
         f"{codec.JPEG_DECODER} for JPEG; ratios are to {rows[0]['setting']}.")
    for line in format_table(rows):
        echo(line)
    return rows
