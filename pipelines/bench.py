"""`tools/bench_pipeline`: clips/s per core of the shard pipeline next to the published STCN
loader itself, measured in the same run, on synthetic data in the official layouts (DAVIS
480p and the static sets at their real sizes).

Our side makes clips exactly as a shard-making worker does (`driver.listed_encoded`: read,
decode, sample, warp, JPEG + mask encoding), each round like one work unit: the clips of a
video in a round share its decoded frames. The DAVIS set is sized so that this sharing is
as in a real job: a round of 60 clips over 8 videos of 70 frames draws ~7.5 clips per
video, as a 500-clip shard of DAVIS train does (60 videos of ~70 frames); about 17% of
the frames drawn are then decoded already (max skip 10; measured by simulating the sampler), against
~46% on 4 videos of 40 frames. The published side is the published code, run
from a checkout the user passes (never vendored), in its own process: its `VOSDataset` /
`StaticTransformDataset` built as its train.py builds them (see `pipelines.fidelity`, which
also explains the torchvision and thinplate folders), indexed directly.

Rates are clips per CPU-second of a single-threaded process (OpenCV and torch on one
thread), so other jobs on a shared machine count as little as possible; wall-clock rates
are printed beside them. Start-up (imports, building the data set, first clip) is never
timed: each side makes a warm-up clip first, then the two sides alternate in rounds, and
each side's rate is the median over its rounds.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2

from shards.child import LineChild

from pipelines.driver import JobConfig, listed_encoded, make_plan
from pipelines.job.pool import configure_worker
from pipelines.kinds import source_kind

#: what the benchmark generates, per kind (make_synthetic arguments): DAVIS-size frames, and
#: as many clips per video and round as a DAVIS job's shard has (see the module doc)
DATA = {"davis": {"videos": 8, "frames": 70}, "static": {"videos": 6}}


@dataclass
class Rate:
    """Clips per CPU-second and per wall-second, medians over rounds."""
    cpu: float
    wall: float

    @classmethod
    def of(cls, rounds: list[tuple[int, float, float]]) -> "Rate":
        """rounds: (clips, CPU seconds, wall seconds) each."""
        return cls(statistics.median(n / max(c, 1e-9) for n, c, _ in rounds),
                   statistics.median(n / max(w, 1e-9) for n, _, w in rounds))


class Ours:
    """The shard pipeline's clips of `kind`, made and encoded as a worker does."""

    def __init__(self, kind: str, root: Path, max_skip: int):
        # the synthetic sets do not hold the videos of the published train lists
        subset = {"subset": "all"} if source_kind(kind).subset else {}
        self.plan = make_plan(JobConfig(kind, str(root), "unused", clips=10 ** 6,
                                        max_skip=max_skip, clips_per_shard=10 ** 6, **subset))
        self.next = 0
        self.bytes: list[int] = []
        self.round(1)  # warm-up: first imports and allocations

    def round(self, clips: int) -> tuple[int, float, float]:
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for encoded in listed_encoded(self.plan, self.next, self.next + clips):
            self.bytes.append(sum(len(v) for k, v in encoded.items() if k != "__key__"))
        self.next += clips
        return clips, time.process_time() - start_cpu, time.perf_counter() - start_wall


class Published:
    """The published loader in a child process (`python -m pipelines.bench`), driven round
    by round over a pipe: one JSON line per request and per answer."""

    def __init__(self, checkout: str, kind: str, root: Path, max_skip: int,
                 torchvision_dir: str | None, thinplate_dir: str | None, seed: int = 0):
        request = {"checkout": str(checkout), "kind": kind, "root": str(root),
                   "max_skip": max_skip, "torchvision_dir": torchvision_dir,
                   "thinplate_dir": thinplate_dir, "seed": seed}
        self.child = LineChild("pipelines.bench", request, "the published loader",
                               OMP_NUM_THREADS="1")
        self.round(1)  # warm-up: the child builds the data set and makes one clip

    def round(self, clips: int) -> tuple[int, float, float]:
        answer = self.child.ask(str(clips))
        return clips, answer["cpu"], answer["wall"]

    def close(self) -> None:
        self.child.close(timeout=60)


def _published_child(checkout, kind, root, max_skip, torchvision_dir, thinplate_dir,
                     seed) -> None:
    """The child's loop: build the published data set, then time the clips each stdin line
    asks for (CPU and wall seconds, one JSON line on stdout)."""
    import numpy as np
    import torch

    from pipelines.fidelity import Scenario, _import_published, _published_dataset
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    dataset = _published_dataset(Scenario(kind, max_skip), Path(root),
                                 _import_published(checkout, torchvision_dir, thinplate_dir))
    np.random.seed(seed)
    index = 0
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the published code prints stays off the pipe
    for line in sys.stdin:
        clips = int(line)
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for _ in range(clips):
            dataset[index % len(dataset)]
            index += 1
        out.write(json.dumps({"cpu": time.process_time() - start_cpu,
                              "wall": time.perf_counter() - start_wall}) + "\n")
        out.flush()


def run_benchmark(clips: int = 60, published: str | None = None, published_clips: int = 15,
                  torchvision_dir: str | None = None, thinplate_dir: str | None = None,
                  rounds: int = 3, max_skip: int = 10, kinds=("davis", "static"),
                  workdir: str | None = None, size: tuple[int, int] | None = None,
                  echo=print) -> dict:
    """Make synthetic DAVIS (480p) and static sets, then time our pipeline and, with
    `published` (a checkout of the published code), the published loader, alternating
    `rounds` rounds of `clips` / `published_clips` clips each. Returns per kind
    {"ours": Rate, "ours_bytes_per_clip", "published": Rate or None, "ratio": float or None}.
    `size` (H, W) replaces the real frame sizes (tests)."""
    from pipelines.synthetic import make_synthetic
    configure_worker()  # our side runs as a shard-making worker does
    results = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for kind in kinds:
            root = make_synthetic(kind, Path(tmp) / kind, seed=0, size=size, **DATA[kind])
            ours = Ours(kind, root, max_skip)
            pub = (Published(published, kind, root, max_skip, torchvision_dir, thinplate_dir)
                   if published else None)
            ours_rounds, pub_rounds = [], []
            try:
                for _ in range(rounds):  # alternate, so both see the same machine load
                    ours_rounds.append(ours.round(clips))
                    if pub is not None:
                        pub_rounds.append(pub.round(published_clips))
            finally:
                if pub is not None:
                    pub.close()
            rate = Rate.of(ours_rounds)
            pub_rate = Rate.of(pub_rounds) if pub_rounds else None
            clip_bytes = sum(ours.bytes) / len(ours.bytes) + 3 * 1536  # + tar member headers
            label = f"{kind} (max skip {max_skip})" if source_kind(kind).video else kind
            line = (f"{label:20s} ours {rate.cpu:6.1f} clips/s/core (wall {rate.wall:5.1f}, "
                    f"{clip_bytes / 1e3:.0f} KB per clip)")
            if pub_rate is not None:
                line += (f" | published {pub_rate.cpu:5.1f} clips/s/core (wall "
                         f"{pub_rate.wall:5.1f}) | ratio x{rate.cpu / pub_rate.cpu:.1f}")
            echo(line)
            results[kind] = {"ours": rate, "ours_bytes_per_clip": clip_bytes, "published": pub_rate,
                             "ratio": rate.cpu / pub_rate.cpu if pub_rate else None}
    return results


if __name__ == "__main__":  # the published loader's process (see Published)
    _published_child(**json.loads(sys.argv[1]))
