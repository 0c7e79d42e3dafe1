"""Trainer building blocks: stage configs, bootstrapped CE, online augmentation, checkpoints."""

import os
import random

import numpy as np
import pytest
import torch
import yaml

from shards.storage import write_bytes_atomic

from stcn.train.checkpoint import CheckpointManager, capture_rng_states, restore_rng_states
from stcn.train.losses import bootstrap_fraction, bootstrapped_cross_entropy, mask_iou
from stcn.train.online_augment import OnlineAugmentation, prepare_batch
from stcn.train.stages import STAGES, load_stage
from stcn.train.trainer import clip_targets, select_objects


# ----------------------------------------------------------------------------- stages
def test_published_stage_defaults():
    assert [STAGES[s].iterations for s in range(4)] == [300_000, 500_000, 300_000, 150_000]
    assert [STAGES[s].batch_size for s in range(4)] == [8, 4, 4, 4]
    assert [STAGES[s].lr_steps for s in range(4)] == [(150_000,), (400_000,), (250_000,), (125_000,)]
    assert STAGES[0].single_object and not any(STAGES[s].single_object for s in (1, 2, 3))
    stage1, stage2 = STAGES[1], STAGES[2]
    assert [p.max_skip for p in stage1.phases] == [5, 10, 15, 20, 25, 5]
    assert [p.start for p in stage1.phases][-1] == 0.8 and stage2.phases[-1].start == 0.9
    assert stage2.sources == {"davis": 5.0, "youtube": 1.0}


def test_skip_phases_switch_at_fractions_and_derive_shard_sets():
    stage = load_stage(2, {"iterations": 1000})
    assert [stage.phase_index(i) for i in (0, 99, 100, 399, 400, 899, 900, 999)] == [0, 0, 1, 3, 4, 4, 5, 5]
    # derived sets stream each clip once: the DAVIS x5 mix lives in the set sizes
    assert stage.shard_sets(1, "s3://bucket/root/") == {
        "s3://bucket/root/davis/skip10": 1.0, "s3://bucket/root/youtube/skip10": 1.0}
    assert load_stage(0).shard_sets(0, "/data") == {"/data/static": 1.0}


def test_iteration_override_rescales_every_milestone():
    stage = load_stage(3, {"iterations": 1500})
    assert stage.lr_steps == (1250,)
    assert (stage.bootstrap_start, stage.bootstrap_end) == (200, 700)


def test_yaml_override_with_explicit_phase_sets(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({
        "iterations": 10, "batch_size": 2, "lr": 1e-4, "lr_steps": [8],
        "phases": [{"start": 0.0, "max_skip": 5, "sets": {"/a": 2}},
                   {"start": 0.5, "max_skip": 10, "sets": {"/b": 1}}],
    }))
    stage = load_stage(2, path)
    assert (stage.iterations, stage.batch_size, stage.lr, stage.lr_steps) == (10, 2, 1e-4, (8,))
    assert stage.shard_sets(stage.phase_index(7), None) == {"/b": 1}


def test_bad_overrides_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown stage config keys"):
        load_stage(1, {"iteratons": 5})
    with pytest.raises(ValueError, match="first skip phase must start at 0"):
        load_stage(1, {"phases": [{"start": 0.2, "max_skip": 5}]})
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_stage(1, tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="shard root"):
        load_stage(2).shard_sets(0, None)


# ----------------------------------------------------------------------------- losses
def test_bootstrap_schedule_is_plain_then_linear_then_final():
    assert bootstrap_fraction(19_999, 20_000, 70_000, 0.15) == 1.0
    assert bootstrap_fraction(20_000, 20_000, 70_000, 0.15) == 1.0
    assert bootstrap_fraction(45_000, 20_000, 70_000, 0.15) == pytest.approx(0.575)
    assert bootstrap_fraction(70_000, 20_000, 70_000, 0.15) == 0.15
    assert bootstrap_fraction(10**6, 20_000, 70_000, 0.15) == 0.15


def test_bootstrapped_ce_keeps_the_hardest_pixels_per_sample():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none").flatten(1)
    assert bootstrapped_cross_entropy(logits, target, 1.0) == pytest.approx(per_pixel.mean().item())
    hardest = per_pixel.sort(dim=1, descending=True).values[:, :16].mean()
    assert bootstrapped_cross_entropy(logits, target, 0.25) == pytest.approx(hardest.item(), rel=1e-6)


def test_absent_second_object_is_left_out_of_the_softmax():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 2, (1, 4, 4))
    present = torch.tensor([[True, True, False]])
    expected = torch.nn.functional.cross_entropy(logits[:, :2], target)
    loss = bootstrapped_cross_entropy(logits, target, 1.0, present)
    assert loss == pytest.approx(expected.item(), rel=1e-6)


def test_mask_iou():
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    b = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    b[0, 1:3] = True
    assert mask_iou(a, b).item() == pytest.approx(4 / 12)
    assert mask_iou(b & False, a & False).item() == 1.0


# ----------------------------------------------------------------------------- objects
def test_object_selection_and_targets():
    rng = np.random.default_rng(0)
    metas = [{"objects": [3, 5]}, {"objects": [4]}, {"objects": []}]
    targets, seconds = select_objects(metas, rng, single_object=False)
    assert set([targets[0], seconds[0]]) == {3, 5} and (targets[1], seconds[1]) == (4, -1)
    assert (targets[2], seconds[2]) == (-1, -1)
    masks = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    masks[0, :, 0] = 3
    masks[0, :, 1] = 5
    masks[1, :, 2] = 4
    out = clip_targets(masks, targets, seconds)
    assert out["selector"].tolist() == [[1, 1], [1, 0], [1, 0]]
    assert out["first"].shape == (3, 1, 4, 4) and out["second"][1:].sum() == 0
    target_row = 0 if targets[0] == 3 else 1
    assert (out["classes"][0, :, target_row] == 1).all() and (out["classes"][0, :, 1 - target_row] == 2).all()
    assert (out["classes"][1, :, 2] == 1).all() and out["classes"][2].sum() == 0
    single_targets, single_seconds = select_objects(metas[:1], rng, single_object=True)
    assert single_seconds == [-1] and single_targets[0] in (3, 5)


def test_static_soft_masks_feed_the_value_encoder_and_threshold_the_target():
    """Published static rule: frame 0's soft mask (0..1) is the value encoder's input, the
    target is soft > 0.5; clips without soft masks keep their id maps."""
    soft = torch.zeros(3, 3, 4, 4)
    soft[0, :, 1] = torch.tensor([0.2, 0.5, 0.51, 1.0])
    soft[1, :, 2] = 0.9       # no soft masks for this clip: has_soft False
    soft[2, :, 0] = 0.8       # soft masks, but no eligible target
    masks = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    masks[0, :, 3] = 1        # disagrees with soft on purpose: soft decides for clip 0
    masks[1, :, 0] = 1
    out = clip_targets(masks, [1, 1, -1], [-1, -1, -1], soft, torch.tensor([True, False, True]))
    assert torch.equal(out["first"][0, 0], soft[0, 0])  # 0.2, 0.5, 0.51, 1.0 kept soft
    assert out["classes"][0, :, 1].tolist() == [[0, 0, 1, 1]] * 3  # > 0.5, not >=
    assert out["classes"][0, :, 3].sum() == 0
    assert torch.equal(out["first"][1, 0], (masks[1, 0] == 1).float())
    assert out["classes"][1, :, 0].eq(1).all() and out["classes"][1, :, 2].sum() == 0
    assert out["first"][2].sum() == 0 and out["classes"][2].sum() == 0


# ----------------------------------------------------------------------------- augmentation
def _batch(b=2, size=32):
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (b, 3, size, size, 3), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, 3, (b, 3, size, size), dtype=torch.uint8, generator=g)
    return frames, masks


def test_prepare_batch_normalises_without_online_steps():
    frames, masks = _batch()
    out, out_masks, soft = prepare_batch(frames, masks, OnlineAugmentation(), torch.Generator(), "cpu")
    assert soft is None
    expected = (frames.permute(0, 1, 4, 2, 3).float() / 255 - 0.485) / 0.229
    assert torch.allclose(out[:, :, 0], expected[:, :, 0], atol=1e-5)
    assert torch.equal(out_masks, masks)


def test_online_steps_are_deterministic_and_flip_frames_with_masks():
    frames, masks = _batch(b=8)
    spec = {"hflip": {"p": 0.5, "per": "clip"}, "color_jitter_clip": {"brightness": 0.1, "hue": 0.05},
            "color_jitter_frame": {}, "grayscale": {"p": 0.5, "per": "clip"}}
    augmentation = OnlineAugmentation.from_spec(spec)
    assert augmentation == OnlineAugmentation.from_spec(
        ["hflip", {"name": "color_jitter_clip", "hue": 0.05}, "color_jitter_frame",
         {"name": "grayscale", "p": 0.5}])
    a = prepare_batch(frames, masks, augmentation, torch.Generator().manual_seed(3), "cpu")
    soft = torch.randint(0, 256, masks.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    b = prepare_batch(frames, masks, augmentation, torch.Generator().manual_seed(3), "cpu", soft=soft)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # soft masks draw nothing
    flipped = [i for i in range(8) if torch.equal(a[1][i], masks[i].flip(-1))]
    assert 0 < len(flipped) < 8  # p = 0.5 over 8 clips
    for i in range(8):  # the soft masks (0..1) are flipped with the masks
        want = soft[i].flip(-1) if i in flipped else soft[i]
        assert torch.allclose(b[2][i], want.float() / 255)
    gray = (a[0][:, 0, 0] * 0.229 + 0.485 - (a[0][:, 0, 1] * 0.224 + 0.456)).abs().amax(dim=(1, 2)) < 1e-5
    assert gray.any()
    with pytest.raises(ValueError, match="unknown online augmentation step"):
        OnlineAugmentation.from_spec(["rotate"])
    with pytest.raises(ValueError, match="per clip"):
        OnlineAugmentation.from_spec({"hflip": {"per": "frame"}})


@pytest.mark.parametrize("mode", ["random", "center", "resize"])
def test_reduced_resolution(mode):
    frames, masks = _batch(size=64)
    out, out_masks, _ = prepare_batch(frames, masks, OnlineAugmentation(), torch.Generator().manual_seed(0),
                                      "cpu", crop=32, crop_mode=mode)
    assert out.shape == (2, 3, 3, 32, 32) and out_masks.shape == (2, 3, 32, 32)
    assert out_masks.dtype == torch.uint8 and set(out_masks.unique().tolist()) <= {0, 1, 2}
    if mode == "center":
        assert torch.equal(out_masks, masks[:, :, 16:48, 16:48])
    # soft masks take the same window (a scaled copy of the masks must stay one)
    _, with_soft, soft = prepare_batch(frames, masks, OnlineAugmentation(),
                                       torch.Generator().manual_seed(0), "cpu", crop=32,
                                       crop_mode=mode, soft=masks * 100)
    assert torch.equal(with_soft, out_masks) and soft.shape == (2, 3, 32, 32)
    if mode != "resize":
        assert torch.allclose(soft, out_masks.float() * 100 / 255)


# ----------------------------------------------------------------------------- checkpoints
def _state(iteration):
    return {"iteration": iteration, "model": {"w": torch.full((2,), float(iteration))}}


def test_checkpoint_retention_keeps_last_k_and_snapshots(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, snapshot_every=4)
    for iteration in range(1, 10):
        manager.save(_state(iteration), iteration)
    assert [i for i, _ in manager.checkpoints()] == [4, 8, 9]
    state, path = manager.resolve("auto")
    assert state["iteration"] == 9 and path.name == "checkpoint_000000009.pt"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_resume_auto_skips_corrupt_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(_state(1), 1)
    manager.save(_state(2), 2)
    data = manager.path_for(2).read_bytes()
    manager.path_for(2).write_bytes(data[: len(data) // 2])  # a crash that bypassed the atomic write
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        state, _ = manager.resolve("auto")
    assert state["iteration"] == 1
    assert CheckpointManager(tmp_path / "fresh").resolve("auto") is None
    with pytest.raises(FileNotFoundError, match="--resume"):
        manager.resolve(str(tmp_path / "nope.pt"))


def test_atomic_write_never_exposes_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    write_bytes_atomic(str(target), b"old")

    def failing_replace(src, dst):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_bytes_atomic(str(target), b"new-but-lost")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_rng_states_round_trip():
    states = capture_rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_states(states)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_auto_device_is_cuda_when_available_else_cpu(monkeypatch):
    from stcn.train.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert init_distributed("auto").device.type == expected
    assert init_distributed(None).device.type == expected
    assert init_distributed("cpu").device.type == "cpu"


def _reduce_named_on_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from stcn.train.distributed import all_reduce_mean_named

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []
    reduce = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or reduce(*args, **kwargs)
    try:
        # each rank builds its dict in its own order: the names, not the positions, pair up
        names = ["loss", "iou", "zeta"] if rank == 0 else ["zeta", "loss", "iou"]
        values = {"loss": torch.tensor(1.0 + rank), "iou": torch.tensor(10.0 * rank), "zeta": 4.0 + 2 * rank}
        reduced = all_reduce_mean_named({n: values[n] for n in names}, torch.device("cpu"))
        results[rank] = (reduced, len(calls))
    finally:
        dist.all_reduce = reduce
        dist.destroy_process_group()


def test_named_metrics_reduce_across_ranks_in_one_collective():
    import socket

    import torch.multiprocessing as mp

    from stcn.train.distributed import all_reduce_mean_named

    reduced = all_reduce_mean_named({"b": torch.tensor(2.0), "a": 3}, torch.device("cpu"))
    assert reduced == {"b": 2.0, "a": 3.0}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_reduce_named_on_rank, args=(port, results), nprocs=2)
    expected = {"loss": 1.5, "iou": 5.0, "zeta": 5.0}
    for rank in (0, 1):
        figures, collectives = results[rank]
        assert figures == expected and collectives == 1
    assert list(results[1][0]) == ["zeta", "loss", "iou"]  # each rank keeps its own order


def _stream_draws(streams) -> tuple:
    return (streams.global_seed, tuple(streams.sample_rng.integers(2**62, size=4).tolist()),
            tuple(torch.randint(2**62, (4,), generator=streams.augment_rng).tolist()))


def test_rank_streams_stay_distinct_across_an_elastic_resume():
    from stcn.train.seeding import loader_seed, rank_streams

    seed, stage = 42, 3
    draws = {("run", 2, rank): _stream_draws(rank_streams(seed, stage, rank)) for rank in range(2)}
    # Resumes 2 -> 1 and 2 -> 3 ranks; iteration 1 is where the former arithmetic seeds met
    # (rank 0 resumed at iteration 1 drew rank 1's augmentation stream of the run before).
    for at in (1, 2, 3, 500):
        for world in (1, 3):
            for rank in range(world):
                draws[("resume", at, world, rank)] = _stream_draws(rank_streams(seed, stage, rank, at, world))
    streams = [value for draw in draws.values() for value in (draw[0], *draw[1:])]
    assert len(set(streams)) == len(streams) == 3 * len(draws)
    # the same key is the same stream (what an exact resume and a re-run rely on)
    assert _stream_draws(rank_streams(seed, stage, 0, 500, 1)) == draws[("resume", 500, 1, 0)]
    loader_seeds = {loader_seed(s, st, phase) for s in (0, 1, 42) for st in range(4) for phase in range(6)}
    assert len(loader_seeds) == 3 * 4 * 6


def test_device_names_resolve_in_one_place():
    from stcn import evaluation
    from stcn.train.distributed import resolve_device

    assert evaluation.resolve_device is resolve_device  # the evaluation's is the same rule
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available here"):
            resolve_device("cuda", local_rank=1)
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
        assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)


def test_one_network_builder_for_training_and_evaluation():
    from stcn import evaluation
    from stcn.model.weights import build_network

    assert evaluation.build_network is build_network
    before = torch.random.get_rng_state()
    first, again = (build_network("cpu", random_seed=3) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), before)  # the seed did not touch the global generator
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not first.training and first.value_encoder.conv1.in_channels == 5
    stage0 = build_network("cpu", single_object=True)
    widened = build_network("cpu", stage0.state_dict())  # a stage-0 checkpoint loads widened
    assert stage0.value_encoder.conv1.in_channels == 4 and widened.value_encoder.conv1.in_channels == 5
    widened.train()
    assert all(not m.training for m in widened.modules() if isinstance(m, torch.nn.BatchNorm2d))
