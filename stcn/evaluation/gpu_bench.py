"""`tools/bench_gpu`: training and inference speed on the machine's accelerators, one table.

Training: the real trainer (`stcn.train.trainer.train`, stage 3, fp16 AMP with a GradScaler on
CUDA) streams a local synthetic shard set, for every (processes, loader workers per
process) pair asked for; 2 processes run as DDP under torchrun (NCCL on GPUs, gloo on CPU).
Each pair runs twice, `warmup` and `warmup + steps` iterations, and the figures are the
differences of the two runs (start-up, worker spawning and the first slow steps cancel
out): seconds per training step and the share of it spent waiting for data. Peak GPU
memory is that of the longer run's rank 0.

Inference: `stcn.evaluation.bench.compare_inference` on a synthetic DAVIS-size video,
without and with fp16 autocast (CUDA only), next to the published code when its checkout
is given.

Each training run is a child process (`python -m stcn.evaluation.gpu_bench REQUEST`, under torchrun
for DDP) that writes one JSON record.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shards.child import module_env


#: What one training measurement needs; the defaults are the GPU run's.
@dataclass(frozen=True)
class TrainBench:
    device: str = "cuda"          # cuda or cpu
    size: int = 384               # clip side (the published training crop)
    batch_size: int = 4           # per process (published stage 3)
    clips: int = 2000             # clips in the synthetic shard set
    steps: int = 60               # timed iterations (the difference of two runs)
    warmup: int = 15              # iterations of the shorter run
    amp: str = "fp16"             # the trainer's AMP mode (CPU runs fp32 whatever this says)


@dataclass
class TrainFigure:
    processes: int
    workers: int
    step_seconds: float
    data_wait_share: float
    clips_per_s: float
    peak_gpu_memory_mib: float | None = None
    extra: dict = field(default_factory=dict)


def make_shard_set(url: str, clips: int, size: int, seed: int = 0) -> str:
    """A synthetic DAVIS-like shard set of `clips` clips of size x size (shards of 100)."""
    import shards
    from shards.sample_clips import make_clip
    if Path(url, "manifest.json").is_file():
        return url
    rng = np.random.default_rng(seed)
    infos = []
    for start in range(0, clips, 100):
        samples = [make_clip(rng, f"bench{i:06d}-0", size=size, n_objects=1 + i % 3)
                   for i in range(start, min(clips, start + 100))]
        infos.append(shards.write_shard(f"{url}/shard-{start // 100:06d}.tar", samples))
    shards.write_manifest(url, shards.Manifest(
        shards=infos, config={"kind": "synthetic", "source": "davis", "max_skip": 5}))
    return url


def _train_child(request: dict) -> None:
    """One training run (a rank of it under torchrun); rank 0 writes the record."""
    from stcn.train.stages import load_stage
    from stcn.train.trainer import TrainOptions, train
    torch.set_num_threads(int(request.get("threads") or torch.get_num_threads()))
    iterations = request["iterations"]
    stage = load_stage(3, {"iterations": iterations, "batch_size": request["batch_size"],
                           "phases": [{"start": 0.0, "max_skip": 5}]})
    options = TrainOptions(run_dir=request["run_dir"], shard_sets={request["shards"]: 1.0},
                           device=request["device"], amp=request["amp"],
                           workers=request["workers"], from_scratch=True, resume=None,
                           checkpoint_every=10 ** 9, snapshot_every=10 ** 9, log_every=10 ** 6,
                           image_every=10 ** 9, progress=False, allow_repeats=True,
                           rank_logs=False, seed=1)
    device = torch.device(request["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(stage, options)
    if int(os.environ.get("RANK", 0)) == 0:
        summary = json.loads((Path(request["run_dir"]) / "summary.json").read_text())
        record = {"status": result.status, "iterations": len(result.losses),
                  "wall_seconds": summary["wall_seconds"], "clips_per_s": summary["clips_per_s"],
                  "data_wait_fraction": summary["data_wait_fraction"],
                  "clips_seen": summary["clips_seen"], "world_size": summary["world_size"],
                  "peak_gpu_memory_mib": (torch.cuda.max_memory_allocated() / 2 ** 20
                                          if device.type == "cuda" else None)}
        Path(request["out"]).write_text(json.dumps(record))


def _run_training(bench: TrainBench, shards_url: str, processes: int, workers: int,
                  iterations: int, workdir: Path, threads: int | None) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-p{processes}-w{workers}-", dir=workdir))
    out = run_dir / "record.json"
    request = {"run_dir": str(run_dir / "run"), "shards": shards_url, "device": bench.device,
               "amp": bench.amp, "workers": workers, "iterations": iterations,
               "batch_size": bench.batch_size, "out": str(out), "threads": threads}
    module = ["-m", "stcn.evaluation.gpu_bench", json.dumps(request)]
    if processes == 1:
        command = [sys.executable, *module]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(processes), *module]
    done = subprocess.run(command, env=module_env(), capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"training run ({processes} process(es), {workers} worker(s)) "
                           f"failed (exit {done.returncode}):\n" + "\n".join(tail))
    return json.loads(out.read_text())


def _seconds(record: dict) -> tuple[float, float]:
    """(timed loop seconds, data-wait seconds) of rank 0, from its summary figures."""
    per_rank_rate = record["clips_per_s"] / record["world_size"]
    loop = record["clips_seen"] / max(per_rank_rate, 1e-12)
    return loop, loop * (record["data_wait_fraction"] or 0.0)


def train_figure(bench: TrainBench, shards_url: str, processes: int, workers: int,
                 workdir: Path, threads: int | None = None) -> TrainFigure:
    """Step time and data-wait share of `processes` x `workers`: the difference of a
    warm-up-long run and a warm-up + steps run."""
    short = _run_training(bench, shards_url, processes, workers, bench.warmup, workdir, threads)
    long = _run_training(bench, shards_url, processes, workers, bench.warmup + bench.steps,
                         workdir, threads)
    steps = long["iterations"] - short["iterations"]
    (loop_a, wait_a), (loop_b, wait_b) = _seconds(short), _seconds(long)
    loop, wait = max(loop_b - loop_a, 1e-9), max(wait_b - wait_a, 0.0)
    return TrainFigure(processes, workers, loop / steps, min(wait / loop, 1.0),
                       processes * bench.batch_size * steps / loop,
                       long["peak_gpu_memory_mib"])


def available_processes(device: str, wanted: tuple[int, ...]) -> tuple[list[int], list[str]]:
    """The process counts that this machine can run (one GPU each on CUDA), and notes on
    those it cannot."""
    if torch.device(device).type != "cuda":
        return list(wanted), []
    count = torch.cuda.device_count()
    ok = [p for p in wanted if p <= count]
    return ok, [f"{p} GPUs: skipped, this machine has {count}" for p in wanted if p > count]


def run_bench(device: str = "cuda", processes: tuple[int, ...] = (1, 2),
              workers: tuple[int, ...] = (1, 2, 4), bench: TrainBench | None = None,
              inference_frames: int = 40, inference_size: tuple[int, int] = (480, 854),
              objects: int = 3, published: str | None = None, torchvision_dir: str | None = None,
              threads: int | None = None, workdir: str | None = None, echo=print) -> dict:
    """Measure and echo the one table (markdown); returns its figures."""
    from stcn.evaluation.bench import compare_inference, tame_random_keys
    from stcn.inference.core import InferenceConfig
    from stcn.model.network import STCN
    bench = bench or TrainBench(device=device)
    results: dict = {"training": [], "inference": [], "notes": []}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        shards_url = make_shard_set(str(tmp / "shards"), bench.clips, bench.size)
        counts, notes = available_processes(device, processes)
        results["notes"] += notes
        for p in counts:
            for w in workers:
                results["training"].append(train_figure(bench, shards_url, p, w, tmp, threads))
    torch_device = torch.device(device)
    torch.manual_seed(0)
    net = STCN().to(torch_device).eval()
    tame_random_keys(net, objects, inference_size)
    amps = [None, "fp16"] if torch_device.type == "cuda" else [None]
    if torch_device.type != "cuda":
        results["notes"].append("inference with AMP: CUDA only, not measured on CPU")
    for amp in amps:
        out = compare_inference(net, InferenceConfig(amp=amp), published=published,
                                frames=inference_frames, objects=objects, size=inference_size,
                                threads=threads, torchvision_dir=torchvision_dir)
        results["inference"].append({"amp": amp, **out})
    for line in format_table(results, bench, device, inference_frames, inference_size, objects):
        echo(line)
    return results


def format_table(results: dict, bench: TrainBench, device: str, frames: int,
                 size: tuple[int, int], objects: int) -> list[str]:
    amp = bench.amp if torch.device(device).type == "cuda" else "off (CPU: fp32)"
    lines = [f"device {device}; training: stage 3 network, batch {bench.batch_size} per "
             f"process, {bench.size}x{bench.size} clips from local shards, AMP {amp}, "
             f"{bench.steps} timed steps after {bench.warmup}; inference: {frames} frames "
             f"{size[0]}x{size[1]}, {objects} objects, top-k 20, mem every 5", "",
             "| measurement | processes (GPUs) | workers per process | step time (s) | "
             "data wait | clips/s | peak GPU memory (MiB) | published | ratio | masks equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def mib(value):
        return "-" if value is None else f"{value:.0f}"
    for f in results["training"]:
        lines.append(f"| training | {f.processes} | {f.workers} | {f.step_seconds:.3f} | "
                     f"{100 * f.data_wait_share:.1f}% | {f.clips_per_s:.1f} | "
                     f"{mib(f.peak_gpu_memory_mib)} | - | - | - |")
    for r in results["inference"]:
        ours, pub = r["ours"], r["published"]
        lines.append(f"| inference FPS, AMP {r['amp'] or 'off'} | 1 | - | "
                     f"{ours['seconds'] / ours['frames']:.3f} per frame | - | "
                     f"{ours['fps']:.2f} FPS | {mib(ours.get('peak_gpu_memory_mib'))} | "
                     + (f"{pub['fps']:.2f} FPS | x{r['ratio']:.2f} | "
                        f"{'yes' if r['masks_equal'] else str(r['masks_differing_pixels']) + ' px differ'} |"
                        if pub else "- | - | - |"))
    lines += [""] + [f"note: {n}" for n in results["notes"]]
    return lines


if __name__ == "__main__":  # one training run (see _run_training)
    _train_child(json.loads(sys.argv[1]))
