"""`tools/bench_fidelity`: the training distribution of our clips next to the published STCN
loader's, on the same synthetic videos.

Both loaders read the same synthetic sets, made here and then *whitened*: every JPEG is
replaced by a pure white image of the same size, the annotations are kept. Every statistic we
compare depends only on the masks and on where pixels come from, and neither loader draws
its random numbers from pixel values, so whitening changes none of their decisions. A pixel
that came from outside an image (fill: the mean colour (124, 116, 104) or black) is then
told apart from image content by its brightness, even after the published loader's colour
jitter moved both (white stays above ~215, the fill below ~140): `FILL_THRESHOLD` splits them.

The published side runs the published code itself, from a checkout the user passes (never
vendored), in a separate process: its `dataset.VOSDataset` and `dataset.StaticTransformDataset`
built as its train.py builds them, indexed directly (no DataLoader). Two things it needs from
outside: torchvision's transforms (pure Python; `torchvision_dir` loads them from an unpacked
torchvision wheel without its compiled operators, which need a matching CUDA torch) and the
`thinplate` package its TPS warp imports. numpy 2 dropped `np.int`, which the published
datasets use for one array's dtype; the worker restores it as `int`.

Our side calls `pipelines.driver.make_clip` directly (the clip exactly as the shard holds it,
before JPEG encoding; flip and colour stay online in the trainer and change no statistic).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from shards import console
from shards.child import module_command, module_env

from pipelines.driver import JobConfig, make_clip, make_plan
from pipelines.kinds import source_kind
from pipelines.synthetic import make_synthetic

#: mean channel value (0..255) below which an output pixel counts as fill (see module doc)
FILL_THRESHOLD = 180.0
#: tolerance, in standard errors of the difference, within which two figures count as equal
DEFAULT_Z = 3.0
#: the synthetic videos both loaders read: per kind, make_synthetic arguments. 40 DAVIS frames
#: let max skip 25 act; 40 raw YouTubeVOS frames are 8 listed ones (the set's short videos).
DATA_SPECS = {"davis": {"videos": 4, "frames": 40}, "youtube": {"videos": 4, "frames": 40},
              "bl30k": {"videos": 4, "frames": 30}, "static": {"videos": 3}}
WHITENED = "WHITENED.json"
#: the image mean and std the published loader normalises with (to read its output back)
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


@dataclass(frozen=True)
class Scenario:
    kind: str          # static | davis | youtube | bl30k
    max_skip: int = 0  # curriculum max skip in raw frames (0 for static)

    @property
    def video(self) -> bool:
        """Clips of videos (max skip, frame gaps and a second object apply), not of images."""
        return source_kind(self.kind).video

    @property
    def label(self) -> str:
        return f"{self.kind} max skip {self.max_skip}" if self.video else self.kind

    @classmethod
    def parse(cls, text: str) -> "Scenario":
        kind, _, skip = text.partition(":")
        if kind not in DATA_SPECS or source_kind(kind).video == (skip == ""):
            raise ValueError(f"scenario {text!r}: expected static or KIND:MAX_SKIP with KIND "
                             "davis, youtube or bl30k (e.g. davis:10)")
        return cls(kind, int(skip) if skip else 0)


#: the issue's list: every source at the max skips the published schedule uses
SCENARIOS = (Scenario("static"), Scenario("davis", 5), Scenario("davis", 10),
             Scenario("davis", 25), Scenario("youtube", 5), Scenario("youtube", 25),
             Scenario("bl30k", 5))


# ------------------------------------------------------------------------------ the data

def _white_jpeg(size: tuple[int, int], cache: dict) -> bytes:
    if size not in cache:
        ok, data = cv2.imencode(".jpg", np.full((size[1], size[0], 3), 255, np.uint8),
                                [cv2.IMWRITE_JPEG_QUALITY, 90])
        cache[size] = data.tobytes()
    return cache[size]


def prepare_data(workdir, kinds, size: tuple[int, int] | None = None, seed: int = 0,
                 progress: bool = False) -> dict[str, Path]:
    """Whitened synthetic sets of `kinds` under workdir/KIND (made once, then reused):
    {kind: root}. `size` (H, W) overrides the real sets' sizes (tests)."""
    roots = {}
    for kind in sorted(set(kinds)):
        root = Path(workdir) / kind
        spec = {**DATA_SPECS[kind], "seed": seed, "size": list(size) if size else None}
        marker = root / WHITENED
        if not (marker.is_file() and json.loads(marker.read_text()) == spec):
            make_synthetic(kind, root, videos=spec["videos"], frames=spec.get("frames"),
                           seed=seed, size=size, overwrite=True, progress=progress)
            cache: dict = {}
            for path in sorted(root.rglob("*.jpg")):
                with Image.open(path) as image:
                    size_wh = image.size
                path.write_bytes(_white_jpeg(size_wh, cache))
            marker.write_text(json.dumps(spec))
        roots[kind] = root
    return roots


# ------------------------------------------------------------------------ per-clip records

def fill_share(frames: np.ndarray) -> float:
    """Share of the pixels of (T, H, W, 3) frames (0..255) of a whitened clip that are fill."""
    return float((frames.astype(np.float32).mean(-1) < FILL_THRESHOLD).mean())


def clip_record(indices, frames: np.ndarray, target: np.ndarray | None, second: bool) -> dict:
    """The statistics of one clip: `indices` (listed frames, sampled order), `frames`
    (T, H, W, 3) 0..255, `target` (T, H, W) bool or None (no target), `second` (a second
    object was chosen)."""
    rec = {"indices": [int(i) for i in indices], "fill": fill_share(frames),
           "target": target is not None and bool(target[0].any()), "second": bool(second),
           "area": math.nan, "iou01": math.nan, "iou02": math.nan}
    if rec["target"]:
        rec["area"] = float(target.mean())
        for key, j in (("iou01", 1), ("iou02", 2)):
            union = np.logical_or(target[0], target[j]).sum()
            rec[key] = float(np.logical_and(target[0], target[j]).sum() / union)
    return rec


def _ours_target(masks: np.ndarray, objects: list[int], rng: np.random.Generator):
    """(target (T, H, W) bool or None, second object chosen) as the trainer picks them: one
    eligible object at random, a second when there is another."""
    if not objects:
        return None, False
    target = int(rng.choice(objects))
    return masks == target, len(objects) > 1


def ours_records(scenario: Scenario, root: Path, clips: int, seed: int = 0,
                 progress: bool = False) -> list[dict]:
    """Records of `clips` clips of our pipeline, every item visited in turn (round-robin,
    as a shard set's rounds visit them)."""
    kind = source_kind(scenario.kind)
    kwargs = {"subset": "all"} if kind.subset else {}
    plan = make_plan(JobConfig(scenario.kind, str(root), "unused", clips=max(clips, 1),
                               max_skip=scenario.max_skip or 5, seed=seed, **kwargs))
    items = kind.items(plan.source)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    records = []
    for i in console.progress(range(clips), desc=f"ours {scenario.label}", unit="clip",
                              enabled=progress):
        clip = make_clip(plan, i % len(items), i // len(items))
        meta = clip["meta"]
        target, second = _ours_target(clip["masks"], meta["objects"], rng)
        records.append(clip_record(meta["frame_index"], clip["frames"], target, second))
    return records


# --------------------------------------------------------------------- the published side

def _import_published(checkout: str, torchvision_dir: str | None, thinplate_dir: str | None):
    """Make the published `dataset` package importable in this (worker) process."""
    if torchvision_dir:
        # a namespace stand-in for the torchvision package: its pure-Python subpackages
        # (transforms, utils) load from the wheel's files, its __init__ (which loads the
        # compiled operators) never runs
        stub = types.ModuleType("torchvision")
        stub.__path__ = [str(Path(torchvision_dir) / "torchvision")]
        sys.modules["torchvision"] = stub
    if thinplate_dir:
        sys.path.insert(0, str(thinplate_dir))
    sys.path.insert(0, str(checkout))
    if not hasattr(np, "int"):  # removed in numpy 1.24, used by the published datasets
        np.int = int
    try:
        from dataset.static_dataset import StaticTransformDataset
        from dataset.vos_dataset import VOSDataset
    except ImportError as err:
        raise RuntimeError(f"{checkout}: cannot import the published loader ({err}); pass the "
                           "STCN checkout, --torchvision DIR and --thinplate DIR (see "
                           "tools/bench_fidelity --help)") from None
    return StaticTransformDataset, VOSDataset


def _published_static(root: Path, max_skip: int, static_cls, vos_cls):
    from torch.utils.data import ConcatDataset
    parts = [static_cls(str(root / "fss"), method=0)]
    parts += [static_cls(str(root / name), method=1) for name in ("DUTS-TR", "DUTS-TE", "ecssd")]
    parts += [static_cls(str(root / "BIG_small"), method=1),
              static_cls(str(root / "HRSOD_small"), method=1)] * 5
    return ConcatDataset(parts)


def _published_davis(root: Path, max_skip: int, static_cls, vos_cls):
    base = root / "2017" / "trainval"
    names = (base / "ImageSets" / "2017" / "train.txt").read_text().split()
    return vos_cls(str(base / "JPEGImages" / "480p"), str(base / "Annotations" / "480p"),
                   max_skip, is_bl=False, subset=set(names))


def _published_youtube(root: Path, max_skip: int, static_cls, vos_cls):
    base = root / "train_480p"
    return vos_cls(str(base / "JPEGImages"), str(base / "Annotations"), max_skip // 5,
                   is_bl=False)


def _published_bl30k(root: Path, max_skip: int, static_cls, vos_cls):
    base = root / "BL30K"
    return vos_cls(str(base / "JPEGImages"), str(base / "Annotations"), max_skip, is_bl=True)


#: per kind, the published data set as its train.py builds it (kinds the published code has)
PUBLISHED_DATASETS = {"static": _published_static, "davis": _published_davis,
                      "youtube": _published_youtube, "bl30k": _published_bl30k}


def _published_dataset(scenario: Scenario, root: Path, classes):
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its set sizes
        return PUBLISHED_DATASETS[scenario.kind](root, scenario.max_skip, *classes)


def _published_record(dataset, sample: dict, video: bool) -> dict:
    rgb = sample["rgb"].numpy() * _STD + _MEAN                  # (T, 3, H, W), 0..1
    frames = np.clip(rgb.transpose(0, 2, 3, 1) * 255.0, 0, 255)
    gt = np.asarray(sample["gt"])[:, 0] > 0.5                    # (T, H, W); static: soft
    if not video:
        indices, second = [0, 0, 0], False
    else:
        info = sample["info"]
        listed = dataset.frames[info["name"]]
        indices = [listed.index(name) for name in info["frames"]]
        second = bool(sample["selector"][1] > 0)
    return clip_record(indices, frames, gt if gt[0].any() else None, second)


def published_records(checkout: str, scenario: Scenario, root: Path, clips: int, seed: int = 0,
                      torchvision_dir: str | None = None, thinplate_dir: str | None = None,
                      progress: bool = False) -> list[dict]:
    """Records of `clips` clips of the published loader, drawn in a fresh Python process
    (`python -m pipelines.fidelity`): the published code's imports and global seeds stay
    out of this one."""
    request = {"checkout": str(checkout), "kind": scenario.kind, "max_skip": scenario.max_skip,
               "root": str(root), "clips": clips, "seed": seed, "progress": progress,
               "torchvision_dir": torchvision_dir, "thinplate_dir": thinplate_dir}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        done = subprocess.run(module_command("pipelines.fidelity", json.dumps(request), str(out)),
                              env=module_env(), stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"the published loader failed on {scenario.label} (exit "
                               f"{done.returncode}; its error is printed above)")
        return json.loads(out.read_text())


def _published_worker(checkout, kind, max_skip, root, clips, seed, torchvision_dir,
                      thinplate_dir, progress) -> list[dict]:
    import torch
    torch.set_num_threads(1)
    classes = _import_published(checkout, torchvision_dir, thinplate_dir)
    scenario = Scenario(kind, max_skip)
    dataset = _published_dataset(scenario, Path(root), classes)
    np.random.seed(seed)  # it draws from numpy's global generator and reseeds torch/random
    records = []
    for i in console.progress(range(clips), desc=f"published {scenario.label}", unit="clip",
                              enabled=progress):
        sample = dataset[i % len(dataset)]
        records.append(_published_record(dataset, sample, scenario.video))
    return records


# ------------------------------------------------------------------------------ statistics

@dataclass(frozen=True)
class Estimate:
    """A statistic over clips: a proportion (successes of n) or a mean (with its std)."""
    value: float
    n: int
    std: float = 0.0
    proportion: bool = False

    @classmethod
    def share(cls, flags) -> "Estimate":
        flags = np.asarray(flags, bool)
        return cls(float(flags.mean()) if flags.size else math.nan, int(flags.size),
                   proportion=True)

    @classmethod
    def mean(cls, values) -> "Estimate":
        values = np.asarray(values, float)
        values = values[~np.isnan(values)]
        if values.size == 0:
            return cls(math.nan, 0)
        return cls(float(values.mean()), int(values.size),
                   float(values.std(ddof=1)) if values.size > 1 else 0.0)


def tolerance(a: Estimate, b: Estimate, z: float = DEFAULT_Z) -> float:
    """z standard errors of the difference a - b: pooled binomial for proportions (so two
    zero rates compare equal and a zero against a non-zero rate still has a spread), Welch
    for means."""
    if a.n == 0 or b.n == 0:
        return math.nan
    if a.proportion:
        p = (a.value * a.n + b.value * b.n) / (a.n + b.n)
        return z * math.sqrt(p * (1 - p) * (1 / a.n + 1 / b.n))
    return z * math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def agrees(a: Estimate, b: Estimate, z: float = DEFAULT_Z) -> bool | None:
    """Whether a and b are equal within `z` standard errors (None: nothing to compare)."""
    tol = tolerance(a, b, z)
    if math.isnan(tol) or math.isnan(a.value) or math.isnan(b.value):
        return None
    return bool(abs(a.value - b.value) <= tol + 1e-12)  # a Python bool: callers test `is False`


def gap_histogram(records: list[dict]) -> np.ndarray:
    """Counts of the two gaps |i1 - i0|, |i2 - i1| of every clip, in listed frames."""
    gaps = [abs(r["indices"][k + 1] - r["indices"][k]) for r in records for k in (0, 1)]
    return np.bincount(np.asarray(gaps, int), minlength=1)


def summarize(records: list[dict], video: bool) -> dict[str, Estimate]:
    """The compared statistics of one loader's records (name -> Estimate, in print order)."""
    idx = np.asarray([r["indices"] for r in records], int).reshape(-1, 3)
    out = {}
    if video:
        out["repeat rate (a frame twice)"] = Estimate.share(
            (idx[:, 0] == idx[:, 1]) | (idx[:, 1] == idx[:, 2]))
        out["mean span (listed frames)"] = Estimate.mean(idx.max(1) - idx.min(1))
    out["fill fraction"] = Estimate.mean([r["fill"] for r in records])
    out["target area fraction"] = Estimate.mean([r["area"] for r in records])
    out["target IoU frame 0-1"] = Estimate.mean([r["iou01"] for r in records])
    out["target IoU frame 0-2"] = Estimate.mean([r["iou02"] for r in records])
    out["no-target rate"] = Estimate.share([not r["target"] for r in records])
    if video:
        out["second object rate"] = Estimate.share([r["second"] for r in records])
    return out


def histogram_rows(pub: list[dict] | None, ours: list[dict], z: float = DEFAULT_Z):
    """(gap, published share, our share, agrees) per gap value; gap counts are tested as
    proportions of 2 x clips gaps (the two gaps of a clip are not independent: approximate)."""
    h_ours = gap_histogram(ours)
    h_pub = gap_histogram(pub) if pub else np.zeros(1, int)
    width = max(h_ours.size, h_pub.size)
    h_ours, h_pub = (np.pad(h, (0, width - h.size)) for h in (h_ours, h_pub))
    rows = []
    for gap in range(width):
        b = Estimate(h_ours[gap] / max(h_ours.sum(), 1), int(h_ours.sum()), proportion=True)
        a = (Estimate(h_pub[gap] / max(h_pub.sum(), 1), int(h_pub.sum()), proportion=True)
             if pub else None)
        rows.append((gap, a, b, agrees(a, b, z) if a else None))
    return rows


# ---------------------------------------------------------------------------------- report

def _fmt(e: Estimate | None, percent: bool) -> str:
    if e is None or math.isnan(e.value):
        return "-"
    return f"{100 * e.value:.2f}%" if percent else f"{e.value:.3f}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**NO**")


def report(scenario: Scenario, pub: list[dict] | None, ours: list[dict],
           z: float = DEFAULT_Z) -> list[str]:
    """Markdown lines: the side-by-side table of one scenario and its gap histogram."""
    video = scenario.video
    s_ours = summarize(ours, video)
    s_pub = summarize(pub, video) if pub else {}
    lines = [f"### {scenario.label} ({len(pub) if pub else 0} published clips, "
             f"{len(ours)} ours)", "",
             "| statistic | published | ours | difference | tolerance | equal |",
             "|---|---|---|---|---|---|"]
    for name, b in s_ours.items():
        a = s_pub.get(name)
        percent = b.proportion or "fraction" in name
        scale = 100 if percent else 1
        diff = tol = "-"
        if a is not None and not math.isnan(tolerance(a, b, z)):
            unit = " pt" if percent else ""
            diff = f"{scale * (b.value - a.value):+.2f}{unit}"
            tol = f"{scale * tolerance(a, b, z):.2f}{unit}"
        lines.append(f"| {name} | {_fmt(a, percent)} | {_fmt(b, percent)} | {diff} | {tol} | "
                     f"{_verdict(agrees(a, b, z) if a else None)} |")
    if video:
        rows = histogram_rows(pub, ours, z)
        lines += ["", "gap histogram (|i1-i0| and |i2-i1|, listed frames): gap: published / "
                  "ours" + (" (NO = outside tolerance)" if pub else "")]
        cells = [f"{g}: {_fmt(a, True)} / {_fmt(b, True)}" + (" NO" if ok is False else "")
                 for g, a, b, ok in rows]
        lines += ["    " + ", ".join(cells[i:i + 6]) for i in range(0, len(cells), 6)]
    return lines + [""]


#: short column names of the summary table, per statistic of `summarize`
SUMMARY_COLUMNS = {"repeat rate (a frame twice)": "repeats", "mean span (listed frames)": "span",
                   "fill fraction": "fill", "target area fraction": "target area",
                   "target IoU frame 0-1": "IoU 0-1", "target IoU frame 0-2": "IoU 0-2",
                   "no-target rate": "no target", "second object rate": "second object"}


def summary_lines(results: dict, scenarios, z: float = DEFAULT_Z) -> list[str]:
    """One markdown row per scenario: every statistic as `published / ours`, marked with
    `(!)` when outside the tolerance, and the gap-histogram bins that differ."""
    lines = ["| scenario (clips per side) | " + " | ".join(SUMMARY_COLUMNS.values())
             + " | gap histogram |", "|---" * (len(SUMMARY_COLUMNS) + 2) + "|"]
    for scenario in scenarios:
        pub, ours = (results[scenario.label][k] for k in ("published", "ours"))
        video = scenario.video
        s_pub, s_ours = (summarize(pub, video) if pub else {}), summarize(ours, video)
        cells = []
        for name in SUMMARY_COLUMNS:
            if name not in s_ours:
                cells.append("-")
                continue
            b, a = s_ours[name], s_pub.get(name)
            percent = b.proportion or "fraction" in name
            mark = " (!)" if a is not None and agrees(a, b, z) is False else ""
            cells.append(f"{_fmt(a, percent).rstrip('%')} / {_fmt(b, percent)}{mark}")
        if not video:
            gaps = "-"
        elif not pub:
            gaps = "(no published side)"
        else:
            off = [str(g) for g, _, _, ok in histogram_rows(pub, ours, z) if ok is False]
            gaps = "equal" if not off else "differs at gap " + ", ".join(off)
        lines.append(f"| {scenario.label} ({len(ours)}) | " + " | ".join(cells)
                     + f" | {gaps} |")
    return lines


def run_fidelity(workdir, clips: int, published: str | None = None,
                 scenarios=SCENARIOS, torchvision_dir: str | None = None,
                 thinplate_dir: str | None = None, seed: int = 0, z: float = DEFAULT_Z,
                 size: tuple[int, int] | None = None, static_clips: int | None = None,
                 progress: bool = True, echo=print) -> dict:
    """Run both loaders on every scenario (`clips` clips each, `static_clips` for static
    when given) and echo the tables; returns
    {scenario label: {"published": records or None, "ours": records}}."""
    roots = prepare_data(workdir, [s.kind for s in scenarios], size=size, seed=seed,
                         progress=progress)
    echo(f"Tolerance: two figures are equal when they differ by at most {z:g} standard errors "
         f"of their difference at these clip counts (binomial, pooled, for rates; Welch for "
         f"means): sampling noise alone exceeds it in about "
         f"{100 * math.erfc(z / math.sqrt(2)):.1f}% of comparisons.")
    echo(f"Fill: output pixels darker than {FILL_THRESHOLD:g}/255 on whitened frames.\n")
    results = {}
    for scenario in scenarios:
        root = roots[scenario.kind]
        count = static_clips if not scenario.video and static_clips else clips
        # the published process runs while this one draws our clips (two cores when free)
        with ThreadPoolExecutor(1) as pool:
            pending = (pool.submit(published_records, published, scenario, root, count, seed,
                                   torchvision_dir, thinplate_dir, progress)
                       if published else None)
            ours = ours_records(scenario, root, count, seed, progress)
            pub = pending.result() if pending else None
        for line in report(scenario, pub, ours, z):
            echo(line)
        results[scenario.label] = {"published": pub, "ours": ours}
    echo("### Summary: published / ours, (!) = outside the tolerance\n")
    for line in summary_lines(results, scenarios, z):
        echo(line)
    return results


if __name__ == "__main__":  # the published loader's process (see published_records)
    _request = json.loads(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps(_published_worker(**_request)))
