"""The demo (jobs/local/demo.sh) in miniature: every real tool, from synthetic data to scores."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole demo: minutes of CPU training

REPO = Path(__file__).resolve().parents[1]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEMO_SCALE="mini", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["bash", str(REPO / "jobs/local/demo.sh"), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_demo_runs_every_step_and_prints_the_summary(demo):
    out, stdout = demo
    names = ["generate synthetic sets", "make shards", "train stage 0", "train stage 3",
             "evaluate untrained network", "evaluate trained network", "copy-first-frame baseline", "report"]
    for step, name in enumerate(names, start=1):
        assert re.search(rf"\[{step}/8\] {name}.*elapsed \d+:\d\d, about \d+:\d\d left", stdout), name
    # Each step's wall and CPU time: printed when it ends, recorded in steps.tsv, summed at the end.
    assert len(re.findall(r"done in \d+:\d\d \(\d+\.\d CPU seconds\)", stdout)) == 7
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == names and all(s[3] == "run" for s in steps)
    assert all(float(s[2]) > 0 for s in steps if s[0].startswith("train"))  # the tools' CPU time
    # the report's own CPU time only (the demo execs it: it inherits the earlier steps' times)
    assert float(steps[-1][2]) < sum(float(s[2]) for s in steps[:-1])
    total = sum(int(float(s[1])) for s in steps)
    assert re.search(rf"STCN demo finished in {total // 60}:{total % 60:02d} \(\d+ CPU seconds\)", stdout)
    # What each real tool left behind.
    assert (out / "data/davis/2017/trainval/ImageSets/2017/val.txt").is_file()
    for shard_set in ["static", "davis/skip5", "youtube/skip25"]:
        assert (out / "shards" / shard_set / "manifest.json").is_file(), shard_set
    assert (out / "runs/s0/stcn_stage0.pth").is_file()
    assert (out / "runs/s03/stcn_stage3.pth").is_file()
    assert list((out / "runs/s03/tensorboard").rglob("events.out.tfevents.*"))
    # The printed J&F figures (standard, without empty-vs-empty) are the ones the evaluations saved.
    saved = {}
    for label, name in [("trained (stage 0 -> 3)", "trained"), ("untrained (random weights)", "untrained"),
                        ("copy the first-frame mask", "copy_first_frame")]:
        scores = json.loads((out / "eval" / name / "results.json").read_text())["scores"]
        saved[name] = (scores["J&F"], scores["without_empty"]["J&F"])
        printed = re.search(rf"    {re.escape(label)}\s+(-?\d+\.\d)\s+(-?\d+\.\d)\n", stdout).groups()
        assert all(abs(float(p) - v) < 0.051 for p, v in zip(printed, saved[name])), \
            (label, printed, saved[name])
    # The verdict follows the figures, whichever way they went.
    learned = all(saved["trained"][k] > saved[o][k]
                  for o in ("untrained", "copy_first_frame") for k in (0, 1))
    assert ("verdict: the trained network beats" in stdout) == learned
    assert ("do NOT show that the network learned" in stdout) == (not learned)
    assert f"tensorboard --logdir {out / 'runs'}" in stdout
    assert f"report:                       {out / 'report' / 'index.html'}" in stdout
    assert re.search(r"inference speed \(trained\):\s+\d+\.\d FPS", stdout)


def test_copy_first_frame_baseline_scores_the_copied_masks(demo):
    from stcn.evaluation import copy_first_frame_baseline

    out, _ = demo
    saved = json.loads((out / "eval/copy_first_frame/results.json").read_text())["scores"]
    assert saved["J&F"] == pytest.approx(copy_first_frame_baseline(out / "data/heldout", "val")["J&F"])
    first = sorted((out / "data/heldout/2017/trainval/Annotations/480p").glob("val-*/00000.png"))[0]
    copied = sorted((out / "eval/copy_first_frame" / first.parent.name).glob("*.png"))
    assert len(copied) > 1 and all(p.read_bytes() == copied[0].read_bytes() for p in copied)


def test_demo_rerun_reuses_finished_steps(demo):
    out, _ = demo
    result = run_demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already generated" in result.stdout
    assert "already made" in result.stdout
    assert "stage 0 already trained" in result.stdout and "stage 3 already trained" in result.stdout


def test_report_holds_every_part(demo):
    out, _ = demo
    page = (out / "report" / "index.html").read_text()
    videos = sorted(p.name for p in (out / "data/heldout/2017/trainval/JPEGImages/480p").glob("val-*"))
    assert videos and all(f"<h3>{v}</h3>" in page for v in videos)  # one strip per held-out video
    for part in ("Held-out J&amp;F", "Training curves", "Shard clips", "Steps", "TensorBoard", "Verdict"):
        assert part in page, part
    assert f"tensorboard --logdir {out / 'runs'}" in page
    images = re.findall(r"<img src='([^']+)'", page)
    assert images, "the report shows no image"
    for image in images:
        assert (out / "report" / image).stat().st_size > 0, image
    # the curves hold both stages' points
    curve = (out / "report" / "curve0.svg").read_text()
    assert curve.count("<polyline") == 2 and "stage 0" in curve and "stage 3" in curve
    # a strip has a row per mask source: ground truth, trained, untrained, copy
    import cv2
    strip = cv2.imread(str(out / "report" / "video0.png"))
    assert strip.shape[0] >= 4 * 144


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (.ci/setup installs it)")
def test_report_loads_in_a_real_browser(demo):
    """Headless Chromium opens the report from disk (no server): every image decodes and the
    J&F table has its three rows (the page's own load-time check writes the result into it)."""
    out, _ = demo
    page = out / "report" / "index.html"
    images = len(re.findall(r"<img ", page.read_text()))
    result = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                             "--allow-file-access-from-files",
                             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=180)
    check = re.search(r'<p id="self-check" data-ok="(\w+)">([^<]*)</p>', result.stdout)
    assert check, result.stdout[-2000:] + result.stderr[-2000:]
    expected = f"self-check: images={images} decoded={images} broken=[] jf_rows=3"
    assert check.group(2) == expected, check.group(2)
    assert check.group(1) == "yes"
