"""A new source kind is one registry entry: a toy kind with its own layout, registered here,
makes shards through the public driver API and is sized by the plan, with no change to the
driver, the plan or the CLI."""
import dataclasses
import io
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import shards

from pipelines.augment import ONLINE_VIDEO, VIDEO_AUGMENT
from pipelines.driver import JobConfig, JobError, Task, run_job
from pipelines.kinds import KINDS, SourceKind, describe_videos, register_kind, video_clip
from pipelines.plan import BYTES_PER_CLIP, SOURCE_ITEMS, plan_stage
from pipelines.sources import Video


@dataclasses.dataclass
class ToyTree:
    """The toy layout: ROOT/<video>/<frame>.jpg beside <frame>.png (object ids, 8-bit gray)."""
    root: Path
    videos: list

    def read(self, video: str, frame: str) -> tuple[bytes, bytes]:
        base = self.root / video / frame
        return base.with_suffix(".jpg").read_bytes(), base.with_suffix(".png").read_bytes()


def open_toy(job) -> ToyTree:
    root = Path(job.source)
    videos = [Video(d.name, tuple(sorted(p.stem for p in d.glob("*.jpg"))))
              for d in sorted(root.iterdir())]
    return ToyTree(root, videos)


TOY = SourceKind("toy", open=open_toy, items=lambda source: source.videos,
                 make_clip=video_clip, describe=describe_videos, augment=VIDEO_AUGMENT,
                 online=ONLINE_VIDEO, plan_items=7, bytes_per_clip=12_345)


@pytest.fixture
def toy_kind():
    register_kind(TOY)
    yield TOY
    del KINDS["toy"]  # other tests see only the built-in kinds


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """3 videos of 8 frames, 60x80: two squares that move, on a noisy background."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for v in range(3):
        (root / f"clip{v}").mkdir()
        for f in range(8):
            image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
            ids = np.zeros((60, 80), np.uint8)
            ids[10 + f:40 + f, 5 + 2 * f:35 + 2 * f] = 1
            ids[30:55, 50 - f:75 - f] = 2
            image[ids == 1], image[ids == 2] = (200, 30, 30), (30, 30, 200)
            _, jpg = cv2.imencode(".jpg", image[..., ::-1])
            (root / f"clip{v}" / f"{f:05d}.jpg").write_bytes(jpg.tobytes())
            png = io.BytesIO()
            Image.fromarray(ids, "L").save(png, format="PNG")
            (root / f"clip{v}" / f"{f:05d}.png").write_bytes(png.getvalue())
    return root


def _files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | \
        {"manifest.json": (out / "manifest.json").read_bytes()}


def test_a_registered_toy_kind_makes_shards(toy_kind, toy_data, tmp_path):
    job = dict(kind="toy", source=str(toy_data), clips=7, clips_per_shard=3, max_skip=5, seed=4)
    run_job(JobConfig(out=str(tmp_path / "one"), **job), progress=False)
    manifest = shards.read_manifest(str(tmp_path / "one"))
    assert [s.count for s in manifest.shards] == [3, 3, 1]
    config = manifest.config
    assert (config["source"], config["videos"], config["max_skip"]) == ("toy", 3, 5)
    assert config["augment"] == json.loads(json.dumps(VIDEO_AUGMENT.to_dict()))
    assert config["online"] == json.loads(json.dumps(ONLINE_VIDEO))
    samples = list(shards.iter_samples(str(tmp_path / "one")))
    assert len({s["__key__"] for s in samples}) == 7
    # round-robin over the 3 videos: rounds 0, 0, 0, 1, 1, 1, 2
    assert sorted(s["meta"]["round"] for s in samples) == [0, 0, 0, 1, 1, 1, 2]
    for s in samples:
        meta = s["meta"]
        assert meta["source"] == "toy" and meta["video"] in {"clip0", "clip1", "clip2"}
        assert s["frames"].shape == (3, 384, 384, 3) and s["masks"].shape == (3, 384, 384)
        assert set(np.unique(s["masks"]).tolist()) <= {0, 1, 2}
        assert meta["objects"] and set(meta["objects"]) <= {1, 2}
        a, b, c = sorted(meta["frame_index"])
        assert b - a <= 6 and c - b <= 6  # gaps up to J + 1, J = max skip 5
    # through the worker pool and split into tasks: the same bytes
    for index in (1, 0):
        run_job(JobConfig(out=str(tmp_path / "split"), **job), workers=2, task=Task(index, 2),
                progress=False)
    assert _files(tmp_path / "split") == _files(tmp_path / "one")


def test_a_kind_is_checked_by_its_entry(toy_kind, toy_data, tmp_path):
    with pytest.raises(JobError, match="--subset applies to davis and youtube, not toy"):
        JobConfig("toy", str(toy_data), str(tmp_path / "x"), clips=1, subset="all")
    with pytest.raises(JobError, match="--max-skip must be >= 1"):
        JobConfig("toy", str(toy_data), str(tmp_path / "x"), clips=1, max_skip=0)
    # clips per video, over the kind's items
    run_job(JobConfig("toy", str(toy_data), str(tmp_path / "cpv"), clips_per_video=2),
            progress=False)
    assert shards.read_manifest(str(tmp_path / "cpv")).num_samples == 6
    with pytest.raises(ValueError, match="already registered"):
        register_kind(TOY)


def test_an_unregistered_kind_is_refused_by_name(tmp_path):
    with pytest.raises(JobError, match=r"unknown source kind 'toy'; expected one of .*'davis'"):
        JobConfig("toy", str(tmp_path), str(tmp_path / "x"), clips=1)


def test_the_plan_sizes_a_registered_kind(toy_kind):
    from stcn.train.stages import load_stage
    assert SOURCE_ITEMS["toy"] == 7 and BYTES_PER_CLIP["toy"] == 12_345
    assert "toy" in SOURCE_ITEMS and "toy" in dict(BYTES_PER_CLIP)
    stage = dataclasses.replace(load_stage(1, {"iterations": 100}),
                                sources={"bl30k": 1.0, "toy": 1.0})
    needs = plan_stage(stage, 1)
    toy = [n for n in needs if n.source == "toy"]
    assert toy and all(n.bytes == n.make * 12_345 for n in toy)
    assert all(n.name == f"toy/skip{n.max_skip}" for n in toy)
    # the mix is weight x items: 7 toy videos against 29,989 BL30K ones
    for need in toy:
        streamed = (need.iterations[1] - need.iterations[0]) * stage.batch_size
        assert need.clips == math.ceil(streamed * 7 / (7 + 29_989))
