"""Speed work keeps results: source JPEGs decode to the same pixels by the fast path, the
inference masks equal the published code's but near ties, and the benchmarks run (ours,
and the published code when STCN_PUBLISHED names a checkout, with STCN_TORCHVISION /
STCN_THINPLATE when those packages are not installed)."""
import os

import cv2
import numpy as np
import pytest

from pipelines.sources import decode_image

PUBLISHED = os.environ.get("STCN_PUBLISHED")
needs_published = pytest.mark.skipif(
    not PUBLISHED, reason="STCN_PUBLISHED (a checkout of the published STCN code) is not set")


def _jpeg(image, *params):
    ok, data = cv2.imencode(".jpg", image, list(params))
    assert ok
    return data.tobytes()


def test_source_jpegs_decode_as_opencv_does():
    rng = np.random.default_rng(0)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (61, 93, 3), np.uint8), (7, 7), 0)
    cases = {"4:2:0": _jpeg(smooth, cv2.IMWRITE_JPEG_QUALITY, 90),
             "4:4:4": _jpeg(smooth, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
             "progressive": _jpeg(smooth, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
             "gray": _jpeg(smooth[..., 0])}
    for name, data in cases.items():
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        got = decode_image(data, name)
        assert got.shape == expected.shape and np.array_equal(got, expected), name
    # a JPEG with an Exif orientation: OpenCV's reading (rotated) is kept
    exif = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00"
            b"\x06\x00\x00\x00\x00\x00\x00\x00")
    plain = cases["4:4:4"]
    rotated = plain[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + plain[2:]
    expected = cv2.imdecode(np.frombuffer(rotated, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert expected.shape[:2] == (93, 61)  # OpenCV applied the orientation
    assert np.array_equal(decode_image(rotated, "exif"), expected)
    # a truncated JPEG: refused as OpenCV refuses it, naming the file
    truncated = plain[: len(plain) * 2 // 3]
    assert cv2.imdecode(np.frombuffer(truncated, np.uint8), cv2.IMREAD_COLOR_RGB) is None
    with pytest.raises(ValueError, match="clip.jpg: not a readable image"):
        decode_image(truncated, "clip.jpg")


def test_annotation_pngs_decode_as_pil_does():
    import io

    from PIL import Image

    from pipelines.sources import decode_ids
    rng = np.random.default_rng(1)
    ids = np.zeros((37, 53), np.uint8)
    ids[5:20, 3:30], ids[18:35, 25:50] = 1, 7
    ids[rng.random(ids.shape) < 0.05] = 3

    def png(mode, **save):
        image = Image.fromarray(ids)
        if mode == "P":
            image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **save)
        return buffer.getvalue()
    ok, filtered = cv2.imencode(".png", ids)  # libpng filters the rows
    cases = {"indexed": png("P"), "indexed, interlaced": png("P", interlace=1),
             "gray": png("L"), "gray, libpng": filtered.tobytes()}
    from pipelines.sources.base import _unfiltered_png
    assert _unfiltered_png(cases["indexed"]) is not None  # the fast path is taken...
    assert _unfiltered_png(cases["gray, libpng"]) is None  # ...and declined when it must be
    for name, data in cases.items():
        expected = np.asarray(Image.open(io.BytesIO(data)))
        got = decode_ids(data, name)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name
        assert np.array_equal(got, ids), name
    # a damaged file gives PIL's verdict, not a silent misreading
    data = bytearray(cases["indexed"])
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(Exception):  # noqa: B017 (PIL's own error, whichever it is)
        decode_ids(bytes(data), "broken.png")


def test_bench_pipeline_ours(tmp_path):
    from pipelines.bench import run_benchmark
    lines = []
    out = run_benchmark(clips=2, rounds=2, kinds=("davis",), workdir=str(tmp_path),
                        size=(64, 96), echo=lines.append)
    assert out["davis"]["ours"].cpu > 0 and out["davis"]["published"] is None
    assert len(lines) == 1 and "ours" in lines[0] and "published" not in lines[0]


@needs_published
def test_bench_pipeline_against_the_published_loader(tmp_path):
    from pipelines.bench import run_benchmark
    lines = []
    out = run_benchmark(clips=2, published=PUBLISHED, published_clips=2, rounds=2,
                        torchvision_dir=os.environ.get("STCN_TORCHVISION"),
                        thinplate_dir=os.environ.get("STCN_THINPLATE"), kinds=("davis", "static"),
                        workdir=str(tmp_path), size=(96, 128), echo=lines.append)
    for kind in ("davis", "static"):
        result = out[kind]
        assert result["published"].cpu > 0
        assert result["ratio"] == pytest.approx(result["ours"].cpu / result["published"].cpu)
    assert lines and all("published" in line and "ratio x" in line for line in lines)


@needs_published
def test_inference_masks_equal_the_published_code_but_near_ties():
    """Our inference core against the published one (its own process, same video and
    weights): every differing pixel is a near tie of the published probabilities (that
    of our label within NEAR_TIE of the best); the channels-last and sparse-readout
    speed-ups may flip those only."""
    import torch

    from stcn import evaluation
    from stcn.evaluation.bench import compare_inference, tame_random_keys
    from stcn.inference.core import InferenceConfig
    net = evaluation.build_network(torch.device("cpu"), None, random_seed=0)
    size = (96, 160)
    tame_random_keys(net, 3, size)
    out = compare_inference(net, InferenceConfig(mem_every=2), published=PUBLISHED, frames=6,
                            objects=3, size=size, threads=1,
                            torchvision_dir=os.environ.get("STCN_TORCHVISION"))
    assert out["cpu_ratio"] > 0 and out["masks_differing_pixels"] is not None
    assert out["masks_differing_beyond_ties"] == 0, out
    assert out["masks_equal"] == (out["masks_differing_pixels"] == 0)


@pytest.mark.slow  # times training and inference steps
def test_bench_gpu_cpu_run_prints_one_table(tmp_path):
    """The GPU benchmark's functional check on CPU, tiny sizes: one training figure (the
    difference of a 1-step and a 2-step run) and CPU inference, in one table."""
    import subprocess

    from conftest import tool_command
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        tool_command("bench_gpu", "--device", "cpu", "--gpus", "1",
         "--workers", "0", "--size", "32", "--batch-size", "1", "--steps", "1", "--warmup", "1",
         "--clips", "8", "--frames", "2", "--height", "32", "--width", "48", "--threads", "1",
         "--workdir", tmp_path), capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    header, training, inference = rows[0], rows[1], rows[2]
    assert "step time (s)" in header[3] and "data wait" in header[4]
    assert training[0].strip() == "training" and training[1:3] == [" 1 ", " 0 "]
    assert float(training[3]) > 0 and 0.0 <= float(training[4].strip(" %")) <= 100.0
    assert inference[0].strip() == "inference FPS, AMP off" and float(inference[5].split()[0]) > 0
    assert "AMP: CUDA only" in done.stdout
    bad = subprocess.run(tool_command("bench_gpu", "--gpus", "0"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--gpus" in bad.stderr
