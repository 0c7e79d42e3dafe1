"""Every consumed clip is distinct: phases sharing a set read disjoint ranges (loader and
trainer), a phase that would repeat clips is refused unless allowed, and this holds after a
resume and an elastic resume (ranks simulated in one process)."""
import uuid

import numpy as np
import pytest

import shards
from shards.sample_clips import make_clip
from stcn.clip_ranges import NotEnoughClipsError, check_phase_clips, phase_clips, set_range
from stcn.stages import load_stage

SIZE = 16


def write_set(n, max_count=7, prefix="v"):
    root = f"memory://ranges-{uuid.uuid4().hex}"
    rng = np.random.default_rng(n)
    with shards.ShardWriter(root, max_count=max_count) as writer:
        for i in range(n):
            writer.write(make_clip(rng, f"{prefix}-{i:04d}", size=SIZE, n_objects=1))
    shards.write_manifest(root, shards.Manifest(shards=writer.infos, config={}))
    return root


def keys(loader, batches=None):
    out = []
    for batch in loader:
        out += batch["__key__"]
        if batches is not None and len(out) >= batches * len(batch["__key__"]):
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_reads_exactly_its_range(workers):
    root = write_set(40)  # shards of 7: the range [10, 33) cuts the 2nd and the 5th
    loader = shards.make_loader(shards.ShardSource(root, 1.0, 10, 33), batch_size=1,
                                num_workers=workers, shuffle_buffer=4)
    assert len(loader) == 23
    got = keys(loader)
    assert sorted(got) == [f"v-{i:04d}" for i in range(10, 33)]
    with pytest.raises(ValueError, match="past its 40 samples"):
        shards.make_loader(shards.ShardSource(root, 1.0, 30, 41), batch_size=1)


def test_ranges_resume_exactly_and_elastically_without_repeats():
    """Two ranks stream part of a range, then one rank (elastic) and two ranks (exact)
    resume: together they deliver each clip of the range at most once, and nothing else."""
    root = write_set(60)
    source = shards.ShardSource(root, 1.0, 20, 56)
    ranks = [shards.make_loader(source, batch_size=2, rank=r, world_size=2, shuffle_buffer=4)
             for r in range(2)]
    first = keys(ranks[0], 3) + keys(ranks[1], 3)
    state = ranks[0].state_dict()
    assert state["sources"][0]["range"] == [20, 56]
    # exact resume (same layout): the rest of the epoch, no clip twice
    again = [shards.make_loader(source, batch_size=2, rank=r, world_size=2, shuffle_buffer=4)
             for r in range(2)]
    for loader in again:
        loader.load_state_dict(state)
    exact = keys(again[0]) + keys(again[1])
    # elastic resume onto one rank
    one = shards.make_loader(source, batch_size=2, rank=0, world_size=1, shuffle_buffer=4)
    one.load_state_dict(state)
    assert len(one) == (36 - 12) // 2
    elastic = keys(one)
    in_range = {f"v-{i:04d}" for i in range(20, 56)}
    for rest in (exact, elastic):
        everything = first + rest
        assert len(everything) == len(set(everything)) and set(everything) <= in_range
    assert len(first) + len(elastic) == 36
    # a state saved for another range is refused
    other = shards.make_loader(shards.ShardSource(root, 1.0, 0, 36), batch_size=2)
    with pytest.raises(ValueError, match="different seed, weights or shard sets"):
        other.load_state_dict(state)


def _stage(iterations=100, batch=2):
    # published curriculum shape: skip 5 opens (10%) and closes (last 10%) the run
    return load_stage(3, {"iterations": iterations, "batch_size": batch})


def _derived_sets(stage):
    return [stage.shard_sets(i, "root") for i in range(len(stage.phases))]


def test_phases_sharing_a_set_split_it_by_iterations_whatever_the_gpus():
    stage = _stage()
    sets = _derived_sets(stage)
    url = "root/davis/skip5"
    assert [p for p, s in enumerate(sets) if url in s] == [0, 5]
    assert set_range(stage, sets, 0, url, 1000) == (0, 500)  # 10 and 10 iterations
    assert set_range(stage, sets, 5, url, 1000) == (500, 1000)
    assert set_range(stage, sets, 1, "root/davis/skip10", 77) == (0, 77)
    uneven = load_stage(3, {"iterations": 100, "phases": [
        {"start": 0, "max_skip": 5}, {"start": 0.3, "max_skip": 10}, {"start": 0.4, "max_skip": 5}]})
    sets = _derived_sets(uneven)
    assert set_range(uneven, sets, 0, url, 901) == (0, 901 * 30 // 90)
    assert set_range(uneven, sets, 2, url, 901) == (901 * 30 // 90, 901)
    # derived sets are read once per epoch: DAVIS x5 is in the set sizes, not in repeats
    assert set(sets[0].values()) == {1.0}


def test_check_counts_clips_and_names_the_fix():
    stage = _stage(iterations=100, batch=2)   # phases of 10, 10, 10, 10, 50, 10 iterations
    sets = _derived_sets(stage)
    need = {0: 20, 1: 20, 2: 20, 3: 20, 4: 100, 5: 20}   # clips per process
    totals = {}
    for phase, skip in enumerate((5, 10, 15, 20, 25)):
        for source, share in (("davis", 0.25), ("youtube", 0.75)):
            clips = need[phase] * 2 * share * (2 if skip == 5 else 1)  # 2 GPUs
            totals[f"root/{source}/skip{skip}"] = int(clips)
    plan = check_phase_clips(stage, sets, totals, world_size=2)
    assert [p.fits for p in plan] == [True] * 6
    assert plan[4].streamed == 200 and plan[4].distinct == 200
    assert plan[0].shares() == {"root/davis/skip5": 0.25, "root/youtube/skip5": 0.75}
    # elastic resume onto 3 GPUs at iteration 45 (inside phase 4): phase 4 needs
    # 25 x 2 x 2 delivered + 25 x 2 x 3 = 250 > 200; phase 5 needs 60 > 40
    with pytest.raises(NotEnoughClipsError) as err:
        check_phase_clips(stage, sets, totals, world_size=3, from_iteration=45)
    message = str(err.value)
    assert "phase 4" in message and "phase 5" in message and "phase 0" not in message
    assert "--allow-repeats" in message and "tools/make_shards plan" in message
    allowed = check_phase_clips(stage, sets, totals, world_size=3, from_iteration=45,
                                allow_repeats=True)
    assert [p.phase for p in allowed] == [4, 5] and not allowed[1].fits
    assert allowed[1].times_streamed() == pytest.approx(60 / 40)
    assert "each clip ~1.50 times" in allowed[1].describe()
    # fewer GPUs always fit; weight > 1 never does
    assert all(p.fits for p in check_phase_clips(stage, sets, totals, world_size=1))
    heavy = [dict(s, **{"root/davis/skip5": 5.0}) if "root/davis/skip5" in s else s for s in sets]
    assert not phase_clips(stage, heavy, 0, totals, world_size=1).fits
