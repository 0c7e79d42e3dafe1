"""The demo report's verdict and warnings come from the saved figures (stcn/evaluation/report.py)."""

import json

import pytest

from stcn.evaluation.report import collect, summary_lines, verdict, write_report


def fake_demo(root, figures, empty_share=0.0):
    """eval/<name>/results.json with (standard, without-empty) J&F; runs/s03/summary.json."""
    for name, (standard, without) in figures.items():
        folder = root / "eval" / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"fps": 1.0, "scores": {
            "J&F": standard, "J": standard, "F": standard, "without_empty": {"J&F": without},
            "left_out": {"object_frames": 0, "of": 10}, "per_video": {}}}))
    (root / "runs" / "s03").mkdir(parents=True)
    (root / "runs" / "s03" / "summary.json").write_text(json.dumps(
        {"status": "completed", "clips_seen": 40, "clips_without_target_share": empty_share}))
    (root / "steps.tsv").write_text("train stage 3\t65\t120.5\trun\n")
    return collect(root)


@pytest.mark.parametrize("trained, learned",
                         [((30.0, 25.0), True), ((30.0, 5.0), False), ((8.0, 25.0), False)])
def test_verdict_needs_both_baselines_beaten_on_both_variants(tmp_path, trained, learned):
    demo = fake_demo(tmp_path, {"trained": trained, "untrained": (2.0, 1.0),
                                "copy_first_frame": (10.0, 10.0)})
    assert verdict(demo)[0] is learned
    text = "\n".join(summary_lines(demo))
    assert ("verdict: the trained network beats" in text) is learned
    assert ("does NOT beat" in text) is not learned
    assert "STCN demo finished in 1:05 (120 CPU seconds)" in text
    page = write_report(demo, tmp_path / "report").read_text()
    assert ("These figures do NOT show" in page) is not learned
    assert page.count("<tr><td>") == 3 + 2  # J&F rows, the step and the total


def test_mostly_empty_clips_are_reported(tmp_path):
    demo = fake_demo(tmp_path, {"trained": (30.0, 25.0), "untrained": (2.0, 1.0),
                                "copy_first_frame": (10.0, 10.0)}, empty_share=0.5)
    summary = "\n".join(summary_lines(demo))
    assert "WARNING stage 3: 50% of the 40 clips it streamed had no target object" in summary
    assert "Data warning: stage 3: 50% of the 40 clips" in write_report(demo, tmp_path / "report").read_text()
    assert verdict(fake_demo(tmp_path / "missing", {"untrained": (2.0, 1.0)}))[0] is False
