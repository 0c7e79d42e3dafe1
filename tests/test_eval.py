"""End-to-end evaluation on the synthetic DAVIS / YouTubeVOS layouts, scoring and bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import load_tool
from pipelines.synthetic import make_synthetic
from stcn import evaluation
from stcn.evaluation import driver

REPO = Path(__file__).resolve().parents[1]
SIZE = (32, 64)


@pytest.fixture(scope="module")
def eval_cli():
    return load_tool("eval")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic("davis", root / "davis", videos=3, frames=4, objects=2, seed=0, size=SIZE)
    make_synthetic("youtube", root / "youtube", videos=1, frames=11, objects=2, seed=0, size=SIZE)
    return root


@pytest.fixture(scope="module", autouse=True)
def shared_random_network(net):
    """The CLI builds one randomly initialised network per call; share one to keep tests fast."""
    build = evaluation.build_network

    def build_or_share(device, weights=None, **options):
        return net if weights is None else build(device, weights, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "build_network", build_or_share)
        yield


@pytest.fixture(scope="module")
def youtube_runs(eval_cli, data, tmp_path_factory):
    """tools/eval youtube once with the meta.json frames at a reduced processing size, and
    once with every frame at the stored size."""
    out = tmp_path_factory.mktemp("youtube-out")
    root = data / "youtube"
    # Processing at a shorter side of 16 makes the resize back to 32x64 observable.
    result = run(eval_cli, "youtube", "--root", root, "--out", out / "meta", "--resolution", "16")
    assert result.exit_code == 0, result.output
    result = run(eval_cli, "youtube", "--root", root, "--out", out / "all", "--resolution", "0",
                 "--output-all")
    assert result.exit_code == 0, result.output
    return out


def run(cli, *args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result


def pngs(folder: Path):
    return sorted(p.name for p in folder.glob("*.png"))


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_davis_val_writes_palette_pngs_and_scores(eval_cli, data, tmp_path):
    out = tmp_path / "out"
    result = run(eval_cli, "davis", "--root", data / "davis", "--out", out)
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output and "FPS" in result.output
    video_dir = next(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    source = data / "davis/2017/trainval/Annotations/480p" / video_dir.name
    assert pngs(video_dir) == pngs(source)
    written, original = Image.open(video_dir / "00001.png"), Image.open(source / "00000.png")
    assert written.mode == "P" and written.getpalette() == original.getpalette()
    assert written.size == original.size
    summary = json.loads((out / "results.json").read_text())
    assert (out / "FINISHED").exists()
    assert summary["frames"] == 4 and summary["fps"] > 0 and video_dir.name in summary["per_video"]
    scores = summary["scores"]
    assert 0 <= scores["J&F"] <= 100 and scores["per_video"][video_dir.name]["J"] is not None


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_davis_2016_and_test_dev(eval_cli, data, tmp_path):
    result = run(eval_cli, "davis", "--root", data / "davis", "--year", "2016", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a/results.json").read_text())["scores"] is not None
    result = run(eval_cli, "davis", "--root", data / "davis", "--split", "test-dev", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "b/results.json").read_text())
    assert summary["scores"] is None and summary["inference"]["mem_every"] == 3
    # test-dev ground truth is scored separately through `score`.
    gt = data / "davis/2017/test-dev_ground_truth/Annotations/480p"
    result = run(eval_cli, "score", "--gt", gt, "--pred", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "J&F" in json.loads((tmp_path / "b/scores.json").read_text())


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_youtube_writes_meta_frames_at_original_size_with_original_ids(data, youtube_runs):
    meta = json.loads((data / "youtube/valid/meta.json").read_text())["videos"]
    video, info = next(iter(meta.items()))
    wanted = sorted({f + ".png" for obj in info["objects"].values() for f in obj["frames"]})
    assert pngs(youtube_runs / "meta/Annotations" / video) == wanted
    ids = set()
    for name in wanted:
        image = Image.open(youtube_runs / "meta/Annotations" / video / name)
        assert image.mode == "P" and image.size == (SIZE[1], SIZE[0])
        ids |= set(np.unique(np.array(image)).tolist())
    assert ids <= {0} | {int(k) for k in info["objects"]}
    assert len(pngs(youtube_runs / "all/Annotations" / video)) == 11


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_late_objects_follow_their_annotation(data, youtube_runs):
    root = data / "youtube"
    meta = json.loads((root / "valid/meta.json").read_text())["videos"]
    video, info = next(iter(meta.items()))
    late = {int(k): obj["frames"][0] for k, obj in info["objects"].items() if obj["frames"][0] != "00000"}
    assert late, "the synthetic YouTubeVOS set has objects appearing later"
    assert sorted(info["objects"]) != [str(i) for i in range(1, len(info["objects"]) + 1)], \
        "the synthetic ids are non-contiguous"
    for object_id, first in late.items():
        given = np.array(Image.open(root / "valid/Annotations" / video / f"{first}.png"))
        for frame in sorted((youtube_runs / "all/Annotations" / video).glob("*.png")):
            predicted = np.array(Image.open(frame))
            if frame.stem < first:
                assert not (predicted == object_id).any()
            elif frame.stem == first:
                assert (predicted[given == object_id] == object_id).all()


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_score_youtube_against_ground_truth(eval_cli, data, youtube_runs, tmp_path):
    result = run(eval_cli, "score", "--gt", data / "youtube/valid_ground_truth/Annotations",
                 "--pred", youtube_runs / "all/Annotations", "--keep-first-last",
                 "--json-out", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert "--json-out is deprecated" in result.output and "use --out" in result.output
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["skip_first_and_last"] is False and scores["objects"] == 2
    assert 0 <= scores["J&F"] <= 100


def test_generic_folder(eval_cli, data, tmp_path):
    src = data / "davis/2017/trainval"
    video = (src / "ImageSets/2017/val.txt").read_text().split()[0]
    shutil.copytree(src / "JPEGImages/480p" / video, tmp_path / "in/JPEGImages/clip")
    (tmp_path / "in/Annotations/clip").mkdir(parents=True)
    shutil.copy(src / "Annotations/480p" / video / "00000.png", tmp_path / "in/Annotations/clip")
    result = run(eval_cli, "generic", "--root", tmp_path / "in", "--out", tmp_path / "out",
                 "--resolution", "0")
    assert result.exit_code == 0, result.output
    assert pngs(tmp_path / "out/clip") == ["00000.png", "00001.png", "00002.png", "00003.png"]


def test_in_process_api_and_first_frame_baseline(data, net):
    baseline = evaluation.copy_first_frame_baseline(data / "davis")
    assert 0 < baseline["J&F"] <= 100
    summary = evaluation.evaluate_davis(net, data / "davis")
    assert 0 <= summary["scores"]["J&F"] <= 100
    assert net.training is False


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_rerun_reuses_finished_videos_and_refuses_other_settings(eval_cli, data, tmp_path):
    args = ["davis", "--root", data / "davis", "--out", tmp_path]
    assert run(eval_cli, *args).exit_code == 0
    result = run(eval_cli, *args)
    assert result.exit_code == 0 and "reused 1 finished videos" in result.output
    result = run(eval_cli, *args, "--top-k", "5")
    assert result.exit_code != 0 and "other settings" in result.output
    assert not (tmp_path / "FINISHED").exists()
    # the decoder's convolution algorithm is a setting too (rounding differs)
    result = run(eval_cli, *args, "--winograd", "off")
    assert result.exit_code != 0 and "other settings" in result.output and "winograd" in result.output
    result = run(eval_cli, *args, "--top-k", "5", "--overwrite")
    assert result.exit_code == 0 and "reused" not in result.output and (tmp_path / "FINISHED").exists()


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_interrupted_run_leaves_nothing_looking_complete(data, net, tmp_path, monkeypatch):
    eval_set = evaluation.davis(data / "davis")
    calls = []

    def failing_write(path, labels, palette):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        evaluation.files.write_mask(path, labels, palette)

    monkeypatch.setattr(driver, "write_mask", failing_write)
    with pytest.raises(OSError):
        evaluation.run_evaluation(net, eval_set, tmp_path, progress=False)
    video = eval_set.videos[0].name
    assert not (tmp_path / video).exists() and not (tmp_path / "results.json").exists()
    assert not (tmp_path / "FINISHED").exists()
    monkeypatch.undo()
    evaluation.run_evaluation(net, eval_set, tmp_path, progress=False)
    assert len(pngs(tmp_path / video)) == 4 and not list(tmp_path.glob(".partial-*"))


# -- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def davis_copy(data, tmp_path):
    root = tmp_path / "davis"
    shutil.copytree(data / "davis/2017", root / "2017")
    tree = root / "2017/trainval"
    video = (tree / "ImageSets/2017/val.txt").read_text().split()[0]
    return root, tree, video


def test_missing_first_frame_mask(eval_cli, davis_copy, tmp_path):
    root, tree, video = davis_copy
    missing = tree / "Annotations/480p" / video / "00000.png"
    missing.unlink()
    result = run(eval_cli, "davis", "--root", root, "--out", tmp_path / "o")
    assert result.exit_code != 0 and str(missing) in result.output and "first-frame mask" in result.output


def test_mask_size_mismatch(eval_cli, davis_copy, tmp_path):
    root, tree, video = davis_copy
    mask = tree / "Annotations/480p" / video / "00000.png"
    image = Image.open(mask)
    image.resize((20, 10)).save(mask)
    result = run(eval_cli, "davis", "--root", root, "--out", tmp_path / "o")
    assert result.exit_code != 0 and str(mask) in result.output and "does not match" in result.output
    assert not (tmp_path / "o/FINISHED").exists()


def test_empty_video_folder(eval_cli, davis_copy, tmp_path):
    root, tree, video = davis_copy
    folder = tree / "JPEGImages/480p" / video
    for frame in folder.iterdir():
        frame.unlink()
    result = run(eval_cli, "davis", "--root", root, "--out", tmp_path / "o")
    assert result.exit_code != 0 and str(folder) in result.output and "empty video folder" in result.output


def test_checkpoint_with_wrong_keys(eval_cli, data, tmp_path):
    checkpoint = tmp_path / "wrong.pth"
    torch.save({"not_a_stcn_key": torch.zeros(1)}, checkpoint)
    result = run(eval_cli, "davis", "--root", data / "davis", "--out", tmp_path / "o", "--model", checkpoint)
    assert result.exit_code != 0 and str(checkpoint) in result.output


def test_amp_refused_on_cpu(eval_cli, data, tmp_path):
    result = run(eval_cli, "davis", "--root", data / "davis", "--out", tmp_path / "o", "--amp",
                 "--device", "cpu")
    assert result.exit_code != 0 and "CUDA only" in result.output


def test_score_reports_missing_prediction(eval_cli, data, tmp_path):
    gt = data / "davis/2017/trainval/Annotations/480p"
    video = next(p.name for p in gt.iterdir())
    (tmp_path / video).mkdir()
    Image.open(gt / video / "00000.png").save(tmp_path / video / "00000.png")
    result = run(eval_cli, "score", "--gt", gt, "--pred", tmp_path)
    assert result.exit_code != 0 and "predicted mask missing" in result.output


# -- reuse keyed on content, J&F both ways, per-video CSV --------------------------------------

@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_reuse_needs_the_same_weights_content_and_inputs(data, net, tmp_path):
    """Other weights under the same label are refused (named), a video whose input files
    changed is segmented again, an unchanged rerun reuses."""
    import copy

    eval_set = evaluation.davis(data / "davis")
    evaluation.run_evaluation(net, eval_set, tmp_path, weights="stcn.pth", progress=False)
    assert evaluation.run_evaluation(net, eval_set, tmp_path, weights="stcn.pth",
                                     progress=False)["reused_videos"] == [v.name for v in eval_set.videos]
    retrained = copy.deepcopy(net)
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)
    with pytest.raises(evaluation.DatasetError, match="network weights"):
        evaluation.run_evaluation(retrained, eval_set, tmp_path, weights="stcn.pth", progress=False)
    assert evaluation.network_sha256(retrained) != evaluation.network_sha256(net)

    root = tmp_path / "moved"
    shutil.copytree(data / "davis", root)
    moved = evaluation.davis(root)
    assert evaluation.run_evaluation(net, moved, tmp_path, weights="stcn.pth",
                                     progress=False)["reused_videos"], "same bytes elsewhere: reused"
    frame = moved.videos[0].frames[1]
    pixels = np.array(Image.open(frame))
    Image.fromarray(255 - pixels).save(frame)
    assert evaluation.run_evaluation(net, moved, tmp_path, weights="stcn.pth",
                                     progress=False)["reused_videos"] == []


def _write_masks(folder: Path, masks):
    folder.mkdir(parents=True)
    for i, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8)).save(folder / f"{i:05d}.png")


def test_jf_without_empty_frames_and_what_was_left_out(tmp_path):
    """Object 1 is in 2 of 10 frames and missed there; the standard J counts the 8 frames
    where it is absent from both masks as perfect (80), the second figure leaves them out
    (0). The standard figures equal vos-benchmark's own."""
    from vos_benchmark.benchmark import VideoEvaluator

    gt, pred = [], []
    for t in range(10):
        g = np.zeros((24, 24), np.uint8)
        p = np.zeros((24, 24), np.uint8)
        g[2:20, 2:10] = 2                 # object 2: always there, found exactly
        p[2:20, 2:10] = 2
        if t < 2:
            g[4:10, 14:20] = 1            # object 1: only at the start, predicted elsewhere
            p[16:22, 14:20] = 1
        gt.append(g)
        pred.append(p)
    _write_masks(tmp_path / "gt/sparse", gt)
    _write_masks(tmp_path / "pred/sparse", pred)
    scores = evaluation.score_predictions(tmp_path / "gt", tmp_path / "pred", skip_first_and_last=False)
    one = scores["per_video"]["sparse"]["objects"][1]
    assert one["J"] == pytest.approx(80.0) and one["J_without_empty"] == pytest.approx(0.0)
    assert (one["frames"], one["empty_frames"]) == (10, 8)
    assert scores["J"] == pytest.approx(90.0) and scores["without_empty"]["J"] == pytest.approx(50.0)
    assert scores["left_out"]["object_frames"] == 8 and scores["left_out"]["of"] == 20
    _, iou, boundary = VideoEvaluator(str(tmp_path / "gt"), str(tmp_path / "pred"), False)("sparse")
    for obj, figures in scores["per_video"]["sparse"]["objects"].items():
        assert figures["J"] == pytest.approx(iou[obj]) and figures["F"] == pytest.approx(boundary[obj])
    table = evaluation.format_scores(scores)
    assert "sparse" in table and "leaves out 8 of 20 scored object-frames" in table


def test_eval_prints_per_video_table_and_writes_it_as_csv(eval_cli, data, tmp_path):
    import csv

    result = run(eval_cli, "davis", "--root", data / "davis", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results.json").read_text())
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["video"] for r in rows] == list(summary["per_video"])
    for row in rows:
        scores = summary["scores"]["per_video"][row["video"]]
        assert float(row["J&F"]) == pytest.approx(scores["J&F"], abs=1e-3)
        assert float(row["J&F_without_empty"]) == pytest.approx(scores["without_empty"]["J&F"], abs=1e-3)
        assert int(row["frames"]) == summary["per_video"][row["video"]]["frames"]
        assert any(line.startswith(row["video"]) for line in result.output.splitlines())
    assert "J&F*" in result.output and "results.csv" in result.output


@pytest.mark.slow  # segments whole synthetic sets on CPU
def test_unscored_sets_get_a_timing_table_and_csv(eval_cli, data, tmp_path):
    import csv

    result = run(eval_cli, "davis", "--root", data / "davis", "--split", "test-dev", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results.json").read_text())
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["video"] for r in rows] == list(summary["per_video"]) and rows[0]["J&F"] == ""
    for name, record in summary["per_video"].items():
        assert any(line.split()[:2] == [name, str(record["frames"])] for line in result.output.splitlines())
