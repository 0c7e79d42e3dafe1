"""The fidelity benchmark (pipelines.fidelity, tools/bench_fidelity): its per-clip measures,
its tolerance, our side end to end on tiny whitened sets, and the published side when a
checkout of the published code is named by STCN_PUBLISHED (with STCN_TORCHVISION and
STCN_THINPLATE when those packages are not installed)."""
import math
import os

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import load_tool
from pipelines.fidelity import (
    Estimate,
    Scenario,
    agrees,
    clip_record,
    fill_share,
    gap_histogram,
    prepare_data,
    report,
    run_fidelity,
    summarize,
    summary_lines,
    tolerance,
)

TINY = (72, 128)  # (H, W) of the tiny synthetic sets


@pytest.fixture(scope="module")
def tiny_roots(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("fidelity"), ["davis", "static"], size=TINY)


def test_fill_share_counts_mean_and_black_fill_not_jittered_white():
    frames = np.full((3, 10, 10, 3), 255, np.uint8)
    frames[0, :5] = (124, 116, 104)      # affine fill: 50% of frame 0
    frames[1, :, :2] = 0                 # TPS fill (black): 20% of frame 1
    frames[2] = 222                      # white after a 0.87 brightness jitter: no fill
    assert fill_share(frames) == pytest.approx((50 + 20) / 300)


def test_clip_record_measures_area_iou_and_target():
    target = np.zeros((3, 10, 10), bool)
    target[0, :4, :4] = True             # 16 px
    target[1, :4, 2:6] = True            # 16 px, 8 shared with frame 0
    target[2, 5:, 5:] = True             # disjoint
    rec = clip_record([3, 4, 4], np.full((3, 10, 10, 3), 255, np.uint8), target, True)
    assert rec["area"] == pytest.approx((16 + 16 + 25) / 300)
    assert rec["iou01"] == pytest.approx(8 / 24) and rec["iou02"] == 0.0
    assert rec["target"] and rec["second"] and rec["fill"] == 0.0
    empty = clip_record([0, 1, 2], np.full((3, 4, 4, 3), 255, np.uint8), None, False)
    assert not empty["target"] and math.isnan(empty["area"])


def test_summary_repeat_rate_span_and_gap_histogram():
    white = np.full((3, 2, 2, 3), 255, np.uint8)
    recs = [clip_record(i, white, None, False) for i in ([0, 1, 1], [5, 3, 1], [2, 2, 4], [0, 2, 4])]
    s = summarize(recs, video=True)
    assert s["repeat rate (a frame twice)"].value == 0.5
    assert s["mean span (listed frames)"].value == pytest.approx((1 + 4 + 2 + 4) / 4)
    assert s["no-target rate"].value == 1.0
    assert gap_histogram(recs).tolist() == [2, 1, 5]


def test_tolerance_is_sampling_noise_at_the_clip_counts():
    a, b = Estimate(0.30, 1000, proportion=True), Estimate(0.33, 1000, proportion=True)
    p = 0.315
    assert tolerance(a, b, 3) == pytest.approx(3 * math.sqrt(p * (1 - p) * 2 / 1000))
    assert agrees(a, b)                                            # 3 pt < 6.2 pt
    assert not agrees(a, Estimate(0.0, 1000, proportion=True))     # the 30% vs 0%
    assert agrees(Estimate(0.0, 50, proportion=True), Estimate(0.0, 80, proportion=True))
    m1, m2 = Estimate.mean([10, 12, 11, 13]), Estimate.mean([11.2] * 3 + [11.3])
    assert tolerance(m1, m2, 2) == pytest.approx(2 * math.sqrt(m1.std ** 2 / 4 + m2.std ** 2 / 4))
    assert not agrees(Estimate(10.0, 4000, 1.0), Estimate(11.2, 4000, 1.0))
    assert agrees(Estimate(10.0, 4, 1.0), Estimate(11.2, 4, 1.0))


def test_prepared_sets_are_white_and_reused(tiny_roots):
    jpgs = sorted(tiny_roots["davis"].rglob("*.jpg"))
    assert jpgs and all(cv2.imread(str(p)).min() == 255 for p in jpgs[:5])
    pngs = sorted(tiny_roots["davis"].rglob("Annotations/480p/*/*.png"))
    assert any(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).any() for p in pngs)  # masks kept
    before = jpgs[0].stat().st_mtime_ns
    prepare_data(tiny_roots["davis"].parent, ["davis"], size=TINY)
    assert jpgs[0].stat().st_mtime_ns == before


def test_ours_side_end_to_end(tiny_roots):
    lines = []
    out = run_fidelity(tiny_roots["davis"].parent, 8, scenarios=(Scenario("davis", 5),
                       Scenario("static")), size=TINY, progress=False, echo=lines.append)
    ours = out["davis max skip 5"]["ours"]
    assert out["davis max skip 5"]["published"] is None and len(ours) == 8
    j = 5  # J = min(N, max skip): the tiny videos have more than 5 frames
    assert all(abs(r["indices"][k + 1] - r["indices"][k]) <= j + 1 for r in ours for k in (0, 1))
    assert any(r["fill"] > 0 for r in ours)                 # rotations pull in fill
    assert all(r["fill"] < 0.5 for r in ours)
    static = out["static"]["ours"]
    assert all(r["indices"] == [0, 0, 0] for r in static) and any(r["target"] for r in static)
    text = "\n".join(lines)
    assert "### davis max skip 5 (0 published clips, 8 ours)" in text and "### static" in text
    assert "| repeat rate (a frame twice) | - |" in text and "gap histogram" in text
    row = next(line for line in lines if line.startswith("| davis max skip 5 (8) |"))
    assert row.count(" / ") == 8 and row.endswith("| (no published side) |")


def test_report_flags_a_difference():
    white = np.full((3, 2, 2, 3), 255, np.uint8)
    pub = [clip_record([0, 1, 1] if i % 3 == 0 else [0, 1, 2], white, None, False)
           for i in range(300)]
    ours = [clip_record([0, 1, 2], white, None, False) for _ in range(300)]
    row = next(line for line in report(Scenario("youtube", 5), pub, ours)
               if line.startswith("| repeat"))
    # the tolerance: 3 x sqrt(1/6 * 5/6 * 2/300)
    assert row.split("|")[2:6] == [" 33.33% ", " 0.00% ", " -33.33 pt ", " 9.13 pt "]
    assert row.endswith("**NO** |")
    hist = next(line for line in report(Scenario("youtube", 5), pub, ours) if "0: " in line)
    assert "0: 16.67% / 0.00% NO" in hist and "1: 83.33% / 100.00% NO" in hist
    (summary,) = [line for line in summary_lines({"youtube max skip 5": {"published": pub, "ours": ours}},
                                           [Scenario("youtube", 5)]) if line.startswith("| youtube")]
    assert "33.33 / 0.00% (!)" in summary and summary.endswith("| differs at gap 0, 1 |")


def test_tool_prints_the_table_and_writes_the_records(tmp_path):
    import json
    main = load_tool("bench_fidelity").main
    result = CliRunner().invoke(main, ["--scenario", "youtube:5", "--clips", "3", "-q",
                                       "--workdir", str(tmp_path / "data"),
                                       "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    assert "### youtube max skip 5 (0 published clips, 3 ours)" in result.output
    records = json.loads((tmp_path / "out.json").read_text())["youtube max skip 5"]
    assert records["published"] is None and len(records["ours"]) == 3
    # 40 raw frames every 5th: 8 listed, J = 1: every gap is 0, 1 or 2
    assert all(abs(r["indices"][k + 1] - r["indices"][k]) <= 2
               for r in records["ours"] for k in (0, 1))


def test_tool_rejects_a_bad_scenario():
    main = load_tool("bench_fidelity").main
    result = CliRunner().invoke(main, ["--scenario", "davis"])
    assert result.exit_code != 0 and "KIND:MAX_SKIP" in result.output


@pytest.mark.skipif(not os.environ.get("STCN_PUBLISHED"),
                    reason="STCN_PUBLISHED (a checkout of the published STCN code) is not set")
def test_published_side_runs_on_the_same_videos(tiny_roots):
    out = run_fidelity(tiny_roots["davis"].parent, 6, os.environ["STCN_PUBLISHED"],
                       (Scenario("davis", 5), Scenario("static")),
                       os.environ.get("STCN_TORCHVISION"), os.environ.get("STCN_THINPLATE"),
                       size=TINY, progress=False, echo=lambda line: None)
    pub = out["davis max skip 5"]["published"]
    assert len(pub) == 6 and any(r["fill"] > 0 for r in pub) and any(r["target"] for r in pub)
    assert all(abs(r["indices"][k + 1] - r["indices"][k]) <= 6 for r in pub for k in (0, 1))
    assert len(out["static"]["published"]) == 6


def test_codec_bench_orders_the_settings(tmp_path):
    from pipelines.codec_bench import SETTINGS, format_table, loader_rate, make_clips, measure
    samples = make_clips(tmp_path, 4, size=TINY)
    clips = [c["frames"] for c in samples]
    assert clips[0].shape == (3, 384, 384, 3)
    assert loader_rate(samples, SETTINGS[2], tmp_path, repeats=1) > 0
    rows = {s.name: measure(clips, s, repeats=1) for s in SETTINGS}
    q90, q95 = rows["JPEG q90 4:2:0"], rows["JPEG q95 4:4:4"]
    assert rows["JPEG q90 4:4:4 (default)"]["psnr"] > q90["psnr"]
    assert 30 < q90["psnr"] < q95["psnr"] < math.inf and q90["bytes"] < q95["bytes"]
    assert rows["PNG (lossless, level 1)"]["psnr"] == math.inf
    assert rows["WebP (lossless)"]["psnr"] == math.inf
    table = format_table(list(rows.values()))
    assert len(table) == 2 + len(SETTINGS) and "| JPEG q90 4:2:0 |" in table[2]
    assert table[2].split("|")[4].strip() == "1.00"  # bytes ratio of the reference row


def test_shard_frames_are_jpeg_444_by_default():
    import simplejpeg

    from shards.codec import FRAMES, encode_sample
    rng = np.random.default_rng(0)
    sample = {"__key__": "k", "frames": rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
              "masks": np.zeros((3, 16, 16), np.uint8), "meta": {}}
    assert simplejpeg.decode_jpeg_header(encode_sample(sample)[FRAMES])[3] == "444"
    assert simplejpeg.decode_jpeg_header(
        encode_sample(sample, jpeg_sampling="420")[FRAMES])[3] == "420"
