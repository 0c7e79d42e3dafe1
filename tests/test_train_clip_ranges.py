"""Every consumed clip is distinct: phases sharing a set read disjoint ranges (loader and
trainer), a phase that would repeat clips is refused unless allowed, and this holds after a
resume and an elastic resume (ranks simulated in one process)."""
import pytest

import shards

from conftest import write_clip_set, write_train_set
from stcn.train.clip_ranges import NotEnoughClipsError, check_phase_clips, phase_clips, set_range
from stcn.train.stages import load_stage

SIZE = 16


def write_set(n, max_count=7, prefix="v"):
    return write_clip_set(n, max_count=max_count, prefix=prefix, size=SIZE, n_objects=1)


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
    checks = check_phase_clips(stage, sets, totals, world_size=1)
    assert checks and all(p.fits for p in checks)
    heavy = [dict(s, **{"root/davis/skip5": 5.0}) if "root/davis/skip5" in s else s for s in sets]
    assert not phase_clips(stage, heavy, 0, totals, world_size=1).fits


# ------------------------------------------------------------------ the trainer, in process

def _write_train_set(url, name, clips, source, max_skip, seed):
    write_train_set(url, name, clips, seed, {"hflip": {"p": 0.5, "per": "clip"}}, source=source,
                    max_skip=max_skip, n_objects=2)
    return [f"{name}{i:03d}-0" for i in range(clips)]


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    keys = {}
    for source in ("davis", "youtube"):
        for skip, clips in ((5, 6), (10, 4)):
            keys[f"{source}/skip{skip}"] = _write_train_set(
                str(root / source / f"skip{skip}"), f"{source}{skip}x", clips, source, skip,
                seed=len(keys))
    return root, keys


def _three_phases(iterations):
    # skip 5, skip 10, skip 5 again: the two skip-5 phases share the skip5 sets
    return load_stage(3, {"iterations": iterations, "batch_size": 1, "lr": 1e-4, "phases": [
        {"start": 0.0, "max_skip": 5}, {"start": 0.5, "max_skip": 10},
        {"start": 2 / 3, "max_skip": 5}]})


def _record_keys(monkeypatch):
    from stcn.train import trainer as trainer_module
    seen = []
    real = trainer_module.Trainer.batches

    def recording(self, loader):
        for batch in real(self, loader):
            seen.append((self.iteration, list(batch["__key__"])))
            yield batch
    monkeypatch.setattr(trainer_module.Trainer, "batches", recording)
    return seen


def _options(run_dir, root, **changes):
    from stcn.train.trainer import TrainOptions
    base = dict(run_dir=str(run_dir), shards=str(root), device="cpu", workers=0, crop=32,
                deterministic=True, checkpoint_every=100, log_every=1, image_every=0,
                progress=False, seed=3, rank_logs=False)
    base.update(changes)
    return TrainOptions(**base)


@pytest.mark.slow  # training runs
def test_trainer_phases_read_disjoint_ranges_and_resume_without_repeats(tmp_path, train_root,
                                                                         monkeypatch):
    from stcn.train.trainer import train
    root, keys = train_root
    stage = _three_phases(4)   # phases [0, 2), [2, 3), [3, 4)
    seen = _record_keys(monkeypatch)
    first = train(stage, _options(tmp_path / "split", root, stop_after=1))
    second = train(stage, _options(tmp_path / "split", root))  # resumes inside phase 0
    assert (first.status, second.status) == ("stopped", "completed")
    consumed = {it: k[0] for it, k in seen}
    assert sorted(consumed) == list(range(4))
    assert len(set(consumed.values())) == 4, "a clip was streamed twice"
    # the skip-5 sets (6 clips each) split 2:1 by the phases' iterations
    first_part = {k for s in ("davis/skip5", "youtube/skip5") for k in keys[s][:4]}
    last_part = {k for s in ("davis/skip5", "youtube/skip5") for k in keys[s][4:]}
    assert {consumed[0], consumed[1]} <= first_part and consumed[3] in last_part
    assert consumed[2] in set(keys["davis/skip10"]) | set(keys["youtube/skip10"])


def test_trainer_refuses_a_phase_that_would_repeat_clips(tmp_path, train_root, monkeypatch):
    """Checked at start for the phases to come (not hours in), exactly for the current one."""
    from stcn.train import monitor
    from stcn.train.clip_ranges import NotEnoughClipsError
    from stcn.train.trainer import Trainer
    root, _ = train_root

    def two_phases(iterations):  # skip 5 (2 x 6 clips), then skip 10 (2 x 4 clips)
        return load_stage(3, {"iterations": iterations, "batch_size": 1, "lr": 1e-4, "phases": [
            {"start": 0.0, "max_skip": 5}, {"start": 0.5, "max_skip": 10}]})
    # 20 iterations: phase 0 streams 10 of its 12 clips, but phase 1 would stream 10 of 8
    with pytest.raises(NotEnoughClipsError, match=r"phase 1 would stream each clip ~1\.25 times"
                       r".*--allow-repeats") as err:
        Trainer(two_phases(20), _options(tmp_path / "no", root)).run()
    assert "phase 0" not in str(err.value)
    assert not list((tmp_path / "no").glob("checkpoint_*.pt"))

    class Seen(Exception):
        """Stops the run at the phase's log line (no step, no checkpoint needed)."""

    def message(self, text):
        if text.startswith("phase 0 ["):
            raise Seen(text)
    monkeypatch.setattr(monitor.TrainingMonitor, "message", message)
    with pytest.raises(Seen, match=r"phase 0 \[0, 13\) streams 13 clips from 12 \(each clip "
                                   r"~1\.08 times\)"):
        Trainer(two_phases(26), _options(tmp_path / "yes", root, allow_repeats=True)).run()
