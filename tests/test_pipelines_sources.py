"""Source readers on the synthetic sets: layouts found, bad layouts named, tar == tree."""
import io
import shutil
import tarfile

import numpy as np
import pytest

from pipelines.sources import (
    LayoutError,
    decode_ids,
    iter_archive_videos,
    list_archives,
    open_bl30k_tree,
    open_davis,
    open_static,
    open_youtube,
)
from pipelines.synthetic import make_synthetic

SIZE = (64, 96)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return {kind: make_synthetic(kind, root / kind, videos=3, objects=2, seed=1, size=SIZE,
                                 **({} if kind == "static" else {"frames": 15}))
            for kind in ("davis", "youtube", "bl30k", "static")}


def test_video_layouts_found(data):
    davis = open_davis(data["davis"], "all")
    names = (data["davis"] / "2017/trainval/ImageSets/2017/train.txt").read_text().split()
    assert names and [v.name for v in davis.videos] == names
    assert all(len(v.frames) == 15 for v in davis.videos)
    # also accepted: the trainval directory itself
    assert open_davis(data["davis"] / "2017" / "trainval", "all").videos == davis.videos
    youtube = open_youtube(data["youtube"], "all")
    assert youtube.frame_step == 5 and len(youtube.videos) == 3
    assert all(int(v.frames[1]) - int(v.frames[0]) == 5 for v in youtube.videos)
    bl30k = open_bl30k_tree(data["bl30k"])
    jpg, png = bl30k.read(bl30k.videos[0].name, bl30k.videos[0].frames[0])
    ids = decode_ids(png, "test")
    assert ids.shape == SIZE and ids.max() > 0


def test_static_weights(data):
    source = open_static(data["static"])
    per_set = {name: sum(1 for i in source.items if i.name.startswith(name + "/"))
               for name in source.sets}
    for name, count in source.sets.items():
        weight = 5 if name in ("BIG_small", "HRSOD_small") else 1
        assert per_set[name] == weight * count
    assert len({i.name for i in source.items}) == len(source.items)


def test_bl30k_archives_give_the_tree(data):
    tree = open_bl30k_tree(data["bl30k"])
    streamed = {}
    for url in list_archives(str(data["bl30k"] / "tars")):
        for video, frames in iter_archive_videos(url):
            streamed[video.name] = (video, frames)
    assert sorted(streamed) == [v.name for v in tree.videos]
    for video in tree.videos:
        got, frames = streamed[video.name]
        assert got == video
        assert all(frames[f] == tree.read(video.name, f) for f in video.frames)


def _expect_layout_error(call, path_part):
    with pytest.raises(LayoutError) as err:
        call()
    message = str(err.value)
    assert path_part in message and "Expected layout" in message
    return message


def test_bad_layouts(data, tmp_path):
    _expect_layout_error(lambda: open_davis(tmp_path), str(tmp_path))
    _expect_layout_error(lambda: open_youtube(tmp_path), str(tmp_path))
    _expect_layout_error(lambda: open_bl30k_tree(tmp_path), str(tmp_path))
    _expect_layout_error(lambda: open_static(tmp_path), "fss")
    _expect_layout_error(lambda: list_archives(str(tmp_path)), str(tmp_path))

    davis = tmp_path / "davis"
    shutil.copytree(data["davis"], davis)
    (davis / "2017/trainval/ImageSets/2017/train.txt").unlink()
    _expect_layout_error(lambda: open_davis(davis, "all"), "train.txt")

    youtube = tmp_path / "youtube"
    shutil.copytree(data["youtube"], youtube)
    video = sorted((youtube / "train_480p/Annotations").iterdir())[0]
    sorted(video.iterdir())[1].unlink()
    _expect_layout_error(lambda: open_youtube(youtube, "all"), video.name)

    static = tmp_path / "static"
    shutil.copytree(data["static"], static)
    sorted((static / "ecssd").glob("*.png"))[0].unlink()
    _expect_layout_error(lambda: open_static(static), "ecssd")


def test_archive_with_split_video_is_refused(data, tmp_path):
    """Streaming needs each video's members in one run; a split video is a clear error."""
    tree = open_bl30k_tree(data["bl30k"])
    a, b = tree.videos[0], tree.videos[1]
    path = tmp_path / "BL30K_x.tar"
    with tarfile.open(path, "w") as tar:
        for video, frames in ((a, a.frames[:5]), (b, b.frames), (a, a.frames[5:])):
            for f in frames:
                jpg, png = tree.read(video.name, f)
                for kind, ext, blob in (("JPEGImages", "jpg", jpg), ("Annotations", "png", png)):
                    info = tarfile.TarInfo(f"BL30K/{kind}/{video.name}/{f}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(LayoutError, match="not contiguous"):
        list(iter_archive_videos(str(path)))


def test_decode_ids_refuses_colour_annotations():
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="indexed"):
        decode_ids(buf.getvalue(), "frame.png")


def test_published_lists_are_the_default_and_a_missing_video_is_named(data, tmp_path):
    from pipelines.sources.video_tree import subset_names
    assert len(subset_names("davis", "published")[1]) == 60
    youtube_list = subset_names("youtube", "published")[1]
    assert len(youtube_list) == len(set(youtube_list)) == 3464
    # the synthetic sets do not hold the published videos: the default names the first one
    for opener, kind, first in ((open_davis, "davis", "bear"), (open_youtube, "youtube", "003234408d")):
        with pytest.raises(ValueError, match=f"'{first}'.*--subset all") as err:
            opener(data[kind])
        assert "published" in str(err.value)
    # a list file picks (and orders) videos; one it names that the source lacks is an error
    names = sorted(p.name for p in (data["youtube"] / "train_480p/JPEGImages").iterdir())
    listed = tmp_path / "list.txt"
    listed.write_text(f"{names[2]}\n\n{names[0]}\n")
    assert [v.name for v in open_youtube(data["youtube"], str(listed)).videos] == [names[2], names[0]]
    davis_names = sorted(p.name for p in (data["davis"] / "2017/trainval/JPEGImages/480p").iterdir())
    listed.write_text(f"{davis_names[1]}\nnot-a-video\n")
    with pytest.raises(ValueError, match="'not-a-video'.*1 of 2 missing"):
        open_davis(data["davis"], str(listed))
    with pytest.raises(ValueError, match="no such list file"):
        open_davis(data["davis"], str(tmp_path / "nope.txt"))


def test_wheel_carries_the_published_lists(tmp_path):
    """`pip install .` must ship the lists (package data), not only the source checkout."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: building writes build/ next to setup.cfg
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "runs",
        "demo_out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("davis_train_subset.txt", "youtube_vos_train_subset.txt"):
        assert f"pipelines/lists/{name}" in names
