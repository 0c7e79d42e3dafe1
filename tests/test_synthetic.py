"""Synthetic data sets: official layouts, id rules, determinism and content sanity."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tool_command
from pipelines.synthetic import layouts, make_synthetic
from pipelines.synthetic.files import MARKER
from pipelines.synthetic.palette import davis_palette

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 112)
FRAMES = 12
YT_FRAMES = 21  # annotated frames 00000 .. 00020
OBJECTS = 3


def ids_of(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "P", f"{path} is {image.mode}, expected an indexed PNG"
    assert bytes(image.getpalette()[:48]) == davis_palette()[:48], f"{path} lacks the DAVIS palette"
    return np.array(image)


def binary_of(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "L", f"{path} is {image.mode}, expected 8-bit grayscale"
    values = np.array(image)
    assert set(np.unique(values).tolist()) <= {0, 255}, f"{path} is not a 0/255 mask"
    return values


def stems(folder: Path, ext: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*.{ext}"))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def davis(tmp_path_factory) -> Path:
    return make_synthetic("davis", tmp_path_factory.mktemp("davis") / "DAVIS", videos=3,
                          frames=FRAMES, objects=OBJECTS, seed=1, size=SIZE)


@pytest.fixture(scope="module")
def youtube(tmp_path_factory) -> Path:
    return make_synthetic("youtube", tmp_path_factory.mktemp("yt") / "YouTube", videos=3,
                          frames=YT_FRAMES, objects=OBJECTS, seed=2, size=SIZE)


@pytest.fixture(scope="module")
def bl30k(tmp_path_factory) -> Path:
    return make_synthetic("bl30k", tmp_path_factory.mktemp("bl") / "BL30K", videos=4,
                          frames=6, objects=2, seed=3, size=(96, 144))


@pytest.fixture(scope="module")
def static(tmp_path_factory) -> Path:
    return make_synthetic("static", tmp_path_factory.mktemp("static") / "static", videos=2,
                          objects=2, seed=4, size=(48, 64))


# --------------------------------------------------------------------------- DAVIS

def test_davis_2017_trainval_layout(davis):
    trainval = davis / "2017" / "trainval"
    train = (trainval / "ImageSets/2017/train.txt").read_text().split()
    val = (trainval / "ImageSets/2017/val.txt").read_text().split()
    assert len(train) == 3 and len(val) == 1 and not set(train) & set(val)
    assert sorted(train + val) == sorted(p.name for p in (trainval / "JPEGImages/480p").iterdir())
    assert (trainval / "ImageSets/2016/train.txt").read_text().split() == train
    assert (trainval / "ImageSets/2016/val.txt").read_text().split() == val
    expected = [f"{t:05d}" for t in range(FRAMES)]
    for video in train + val:
        assert stems(trainval / "JPEGImages/480p" / video, "jpg") == expected
        assert stems(trainval / "Annotations/480p" / video, "png") == expected
        first = ids_of(trainval / "Annotations/480p" / video / "00000.png")
        assert first.shape == SIZE
        assert Image.open(trainval / "JPEGImages/480p" / video / "00000.jpg").size == SIZE[::-1]
        # DAVIS: ids 1..K, all in the first frame (STCN counts objects as its max id).
        assert np.unique(first).tolist() == list(range(OBJECTS + 1))


def test_davis_test_dev_has_first_frame_annotations_only(davis):
    testdev = davis / "2017" / "test-dev"
    videos = (testdev / "ImageSets/2017/test-dev.txt").read_text().split()
    assert len(videos) == 1
    for video in videos:
        assert len(stems(testdev / "JPEGImages/480p" / video, "jpg")) == FRAMES
        assert stems(testdev / "Annotations/480p" / video, "png") == ["00000"]
        truth = davis / "2017/test-dev_ground_truth/Annotations/480p" / video
        assert len(stems(truth, "png")) == FRAMES
        assert np.array_equal(ids_of(truth / "00000.png"),
                              ids_of(testdev / "Annotations/480p" / video / "00000.png"))


def test_davis_2016_is_the_binary_single_object_variant(davis):
    d2016, trainval = davis / "2016", davis / "2017" / "trainval"
    # STCN's eval_davis_2016.py reads the 2016 image set through this relative path.
    imset = d2016 / "ImageSets" / "../../2017/trainval/ImageSets/2016/val.txt"
    videos = imset.read_text().split()
    assert videos
    lines = (d2016 / "ImageSets/480p/val.txt").read_text().splitlines()
    assert len(lines) == len(videos) * FRAMES
    for line in lines:
        image, mask = line.split()
        assert (d2016 / image.lstrip("/")).is_file() and (d2016 / mask.lstrip("/")).is_file()
    for video in videos:
        for t in (0, FRAMES - 1):
            name = f"{t:05d}"
            assert ((d2016 / "JPEGImages/480p" / video / f"{name}.jpg").read_bytes()
                    == (trainval / "JPEGImages/480p" / video / f"{name}.jpg").read_bytes())
            binary = binary_of(d2016 / "Annotations/480p" / video / f"{name}.png")
            ids = ids_of(trainval / "Annotations/480p" / video / f"{name}.png")
            assert np.array_equal(binary == 255, ids > 0)


# --------------------------------------------------------------------------- YouTubeVOS

def test_youtube_train_every_fifth_frame(youtube):
    train = youtube / "train_480p"
    videos = sorted(p.name for p in (train / "JPEGImages").iterdir())
    assert len(videos) == 3
    assert videos == sorted(p.name for p in (train / "Annotations").iterdir())
    expected = [f"{t:05d}" for t in range(0, YT_FRAMES, 5)]
    for video in videos:
        assert stems(train / "JPEGImages" / video, "jpg") == expected
        assert stems(train / "Annotations" / video, "png") == expected
        seen = set()
        for name in expected:
            seen |= set(np.unique(ids_of(train / "Annotations" / video / f"{name}.png")).tolist())
        seen.discard(0)
        assert max(seen) > len(seen), f"{video}: ids {sorted(seen)} are contiguous"


def test_youtube_valid_annotations_and_meta(youtube):
    valid = youtube / "valid"
    meta = json.loads((valid / "meta.json").read_text())["videos"]
    videos = sorted(p.name for p in (valid / "JPEGImages").iterdir())
    assert sorted(meta) == videos == sorted(p.name for p in (valid / "Annotations").iterdir())
    every_fifth = [f"{t:05d}" for t in range(0, YT_FRAMES, 5)]
    late_objects, gapped_videos = 0, 0
    for video in videos:
        assert stems(valid / "JPEGImages" / video, "jpg") == every_fifth
        all_frames = youtube / "all_frames/valid_all_frames/JPEGImages" / video
        assert stems(all_frames, "jpg") == [f"{t:05d}" for t in range(YT_FRAMES)]
        for name in every_fifth:
            assert ((valid / "JPEGImages" / video / f"{name}.jpg").read_bytes()
                    == (all_frames / f"{name}.jpg").read_bytes())
        # Annotation files exist exactly where objects first appear, holding only those.
        first_seen = {}
        for name in stems(valid / "Annotations" / video, "png"):
            assert name in every_fifth
            new = set(np.unique(ids_of(valid / "Annotations" / video / f"{name}.png")).tolist()) - {0}
            assert new and not new & set(first_seen), f"{video}/{name}: {new}"
            first_seen.update({k: name for k in new})
            truth = ids_of(youtube / "valid_ground_truth/Annotations" / video / f"{name}.png")
            annotation = ids_of(valid / "Annotations" / video / f"{name}.png")
            assert np.array_equal(annotation, np.where(np.isin(truth, list(new)), truth, 0))
        objects = meta[video]["objects"]
        assert sorted(objects, key=int) == [str(k) for k in sorted(first_seen)]
        for key, info in objects.items():
            assert isinstance(info["category"], str) and info["category"]
            assert info["frames"] == [n for n in every_fifth if n >= first_seen[int(key)]]
        late_objects += sum(name != "00000" for name in first_seen.values())
        gapped_videos += max(first_seen) > len(first_seen)
    assert late_objects >= len(videos), "every valid video should have a late-appearing object"
    assert gapped_videos == len(videos), "ids should be non-contiguous in every valid video"


# --------------------------------------------------------------------------- BL30K

def test_bl30k_tree_and_tar_archives_hold_the_same_files(bl30k):
    tree = {p.relative_to(bl30k).as_posix(): p.read_bytes()
            for p in (bl30k / "BL30K").rglob("*") if p.is_file()}
    videos = sorted(p.name for p in (bl30k / "BL30K/JPEGImages").iterdir())
    assert len(videos) == 4
    for video in videos:
        names = [f"{t:05d}" for t in range(6)]
        assert stems(bl30k / "BL30K/JPEGImages" / video, "jpg") == names
        assert stems(bl30k / "BL30K/Annotations" / video, "png") == names
        ids_of(bl30k / "BL30K/Annotations" / video / "00000.png")
    archives = sorted((bl30k / "tars").glob("*.tar"))
    assert [a.name for a in archives] == ["BL30K_a.tar", "BL30K_b.tar", "BL30K_c.tar", "BL30K_d.tar"]
    packed, owner = {}, {}
    for archive in archives:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    assert member.name not in packed, f"{member.name} in two archives"
                    packed[member.name] = tar.extractfile(member).read()
                    owner[member.name.split("/")[2]] = archive.name
    assert packed == tree
    assert len(set(owner.values())) == len(archives)


def test_default_sizes_are_the_real_sets(tmp_path):
    root = make_synthetic("bl30k", tmp_path / "bl", videos=1, frames=3, objects=1)
    assert Image.open(root / "BL30K/JPEGImages/bl00000/00002.jpg").size == (768, 512)
    assert ids_of(root / "BL30K/Annotations/bl00000/00002.png").shape == (512, 768)
    root = make_synthetic("davis", tmp_path / "davis", videos=1, frames=3, objects=1)
    assert Image.open(root / "2017/trainval/JPEGImages/480p/train-000/00002.jpg").size == (854, 480)
    assert ids_of(root / "2017/test-dev/Annotations/480p/test-dev-000/00000.png").shape == (480, 854)


def _counts_under_published_size_rule(masks: list[np.ndarray], label: int) -> bool:
    first = (masks[0] == label).sum()
    if first <= 10 * 10:
        return False
    return first > 30 * 30 or max((m == label).sum() for m in masks[1:]) < 20 * 20


def test_bl30k_has_tiny_objects_on_both_sides_of_the_size_rule(bl30k):
    excluded = included_small = 0
    for video in (bl30k / "BL30K/Annotations").iterdir():
        masks = [ids_of(video / f"{t:05d}.png") for t in (0, 2, 5)]
        for label in set(np.unique(masks[0]).tolist()) - {0}:
            area = (masks[0] == label).sum()
            counts = _counts_under_published_size_rule(masks, label)
            excluded += not counts
            included_small += counts and area <= 30 * 30
    assert excluded >= 4 and included_small >= 1


# --------------------------------------------------------------------------- static

def test_static_fss_and_flat_layouts(static):
    classes = sorted((static / "fss").iterdir())
    assert len(classes) == 2
    for folder in classes:
        assert stems(folder, "jpg") == stems(folder, "png") == ["1", "2", "3"]
    for name in layouts.STATIC_FLAT_SETS:
        assert (static / name).is_dir(), f"missing {name}"
        assert len(stems(static / name, "jpg")) == 2
    for jpg in static.rglob("*.jpg"):
        mask = binary_of(jpg.with_suffix(".png"))
        assert Image.open(jpg).size == (64, 48) and mask.shape == (48, 64)
        assert 0 < (mask == 255).mean() < 0.8, f"{jpg}: implausible foreground"


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("kind", ["davis", "bl30k"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, kind):
    def digest(seed: int, name: str) -> str:
        return tree_digest(make_synthetic(kind, tmp_path / name, videos=2, frames=4,
                                          objects=2, seed=seed, size=(48, 80)))
    first = digest(7, "a")
    assert digest(7, "b") == first
    assert digest(8, "c") != first


# --------------------------------------------------------------------------- content

def _video_masks(root: Path, video: str) -> np.ndarray:
    folder = root / "2017/trainval/Annotations/480p" / video
    return np.stack([ids_of(folder / f"{t:05d}.png") for t in range(FRAMES)])


def test_copying_the_first_mask_scores_low_on_moving_objects(davis):
    videos = (davis / "2017/trainval/ImageSets/2017/train.txt").read_text().split()
    ious = []
    for video in videos:
        masks = _video_masks(davis, video)
        for label in range(1, OBJECTS + 1):
            assert (masks == label).sum() > 0
            first = masks[0] == label
            for t in range(1, FRAMES):
                current = masks[t] == label
                union = (first | current).sum()
                ious.append((first & current).sum() / union if union else 1.0)
    assert np.mean(ious) < 0.5, f"first-frame copy IoU {np.mean(ious):.2f}: objects barely move"


def _nearest_colour_labels(image: np.ndarray, examples: np.ndarray, labels: np.ndarray) -> np.ndarray:
    pixels = image.reshape(-1, 3)
    distances = (examples ** 2).sum(1)[None] - 2 * pixels @ examples.T  # + |pixel|^2, constant
    return labels[distances.argmin(1)].reshape(image.shape[:2])


def test_appearance_carries_over_time_so_a_tracker_can_beat_copying(davis):
    """A 1-nearest-neighbour colour classifier fitted on frame 0 alone (no motion model)
    must beat copying the first mask by a clear margin: objects keep their look."""
    rng = np.random.default_rng(0)
    videos = (davis / "2017/trainval/ImageSets/2017/train.txt").read_text().split()
    copied, classified = [], []
    for video in videos:
        folder = davis / "2017/trainval/JPEGImages/480p" / video
        images = [np.asarray(Image.open(folder / f"{t:05d}.jpg"), dtype=np.float32) for t in range(FRAMES)]
        masks = _video_masks(davis, video)
        examples, labels = [], []
        for label in range(OBJECTS + 1):
            pixels = images[0][masks[0] == label]
            pick = rng.choice(len(pixels), size=min(100, len(pixels)), replace=False)
            examples.append(pixels[pick])
            labels += [label] * len(pick)
        examples, labels = np.concatenate(examples), np.array(labels)
        for t in range(1, FRAMES):
            predicted = _nearest_colour_labels(images[t], examples, labels)
            for label in range(1, OBJECTS + 1):
                truth, first = masks[t] == label, masks[0] == label
                if truth.any():
                    copied.append((truth & first).sum() / (truth | first).sum())
                    guess = predicted == label
                    classified.append((truth & guess).sum() / (truth | guess).sum())
    assert np.mean(classified) > np.mean(copied) + 0.15, (np.mean(classified), np.mean(copied))


def test_some_object_leaves_the_frame_and_comes_back(davis):
    videos = (davis / "2017/trainval/ImageSets/2017/train.txt").read_text().split()
    returns = 0
    for video in videos:
        masks = _video_masks(davis, video)
        for label in range(1, OBJECTS + 1):
            present = [(m == label).any() for m in masks]
            gone = [t for t in range(FRAMES) if not present[t]]
            returns += bool(gone) and present[0] and any(present[gone[0]:])
    assert returns >= len(videos) - 1


def test_objects_look_distinct(davis):
    video = (davis / "2017/trainval/ImageSets/2017/train.txt").read_text().split()[0]
    image = np.asarray(Image.open(davis / "2017/trainval/JPEGImages/480p" / video / "00000.jpg"),
                       dtype=np.float32)
    masks = _video_masks(davis, video)
    means = [image[masks[0] == label].mean(0) for label in range(1, OBJECTS + 1)]
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]]
    assert min(gaps) > 15, f"object mean colours too close: {gaps}"


# --------------------------------------------------------------------------- safety and CLI

def test_refuses_foreign_folders_and_leaves_nothing_partial(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        make_synthetic("static", foreign, videos=1, size=(48, 64))
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="davis, youtube, bl30k, static"):
        make_synthetic("kinetics", tmp_path / "x")

    def broken(root, spec, progress):
        (root / "half").write_text("written")
        raise RuntimeError("disk full")
    monkeypatch.setitem(sys.modules["pipelines.synthetic"]._WRITERS, "static", broken)
    with pytest.raises(RuntimeError):
        make_synthetic("static", tmp_path / "out", videos=1, size=(48, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    monkeypatch.undo()
    # A killed run leaves a hidden staging folder behind; the next run clears it.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f".out.partial-{gone.pid}").mkdir()
    make_synthetic("static", tmp_path / "out", videos=1, size=(48, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_cli_writes_a_set_and_rejects_bad_options(tmp_path):
    tool = tool_command("make_synthetic")
    out = tmp_path / "static"
    done = subprocess.run(tool + ["static", str(out), "--videos", "1", "--objects", "1",
                                  "--size", "48x64", "--seed", "5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / MARKER).read_text())["size"] == [48, 64]
    assert binary_of(out / "fss/class000/1.png").shape == (48, 64)
    again = subprocess.run(tool + ["static", str(out), "--videos", "1", "--size", "48x64"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    bad = subprocess.run(tool + ["davis", str(tmp_path / "d"), "--size", "64by112"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "HxW" in bad.stderr


def test_speed_scales_motion_and_default_sets_do_not_record_it(tmp_path):
    """--speed below 1: the same scenes with objects drifting less from their first-frame masks."""
    def drift(root):
        ann = sorted((Path(root) / "2017/trainval/Annotations/480p").glob("train-*"))[0]
        first = np.array(Image.open(ann / "00000.png")) > 0
        last = np.array(Image.open(ann / "00009.png")) > 0
        return (first & last).sum() / (first | last).sum()  # IoU of all objects, frame 0 vs 9

    normal = make_synthetic("davis", tmp_path / "normal", videos=1, frames=10, size=(64, 96))
    slow = make_synthetic("davis", tmp_path / "slow", videos=1, frames=10, size=(64, 96), speed=0.2)
    assert drift(slow) > drift(normal)
    assert "speed" not in json.loads((normal / MARKER).read_text())
    assert json.loads((slow / MARKER).read_text())["speed"] == 0.2
    with pytest.raises(ValueError, match="speed must be positive"):
        make_synthetic("davis", tmp_path / "bad", videos=1, speed=0)


def test_object_scale_makes_larger_objects_and_default_sets_do_not_record_it(tmp_path):
    """--object-scale above 1: the scenes' objects cover more of each frame."""
    def cover(root):
        ann = sorted((Path(root) / "2017/trainval/Annotations/480p").glob("train-*"))[0]
        return np.mean([(np.array(Image.open(png)) > 0).mean() for png in sorted(ann.glob("*.png"))])

    normal = make_synthetic("davis", tmp_path / "normal", videos=1, frames=6, objects=2, size=(64, 96))
    large = make_synthetic("davis", tmp_path / "large", videos=1, frames=6, objects=2, size=(64, 96),
                           object_scale=2.0)
    assert cover(large) > 1.5 * cover(normal)
    assert "object_scale" not in json.loads((normal / MARKER).read_text())
    assert json.loads((large / MARKER).read_text())["object_scale"] == 2.0
    with pytest.raises(ValueError, match="object_scale must be positive"):
        make_synthetic("davis", tmp_path / "bad", videos=1, object_scale=0)
