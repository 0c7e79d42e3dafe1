"""Streaming loader: batches, determinism, equal batches per rank, weighted mixing, exact
and elastic resumption (ranks simulated in one process), DataLoader workers."""
from collections import Counter

import numpy as np
import pytest
import torch

import shards
from shards import storage

from conftest import write_clip_set

SIZE = 16


def write_set(n, max_count=7, prefix="v", size=SIZE):
    return write_clip_set(n, max_count=max_count, prefix=prefix, size=size,
                          seed=len(prefix) + n, config={"n": n})


@pytest.fixture(scope="module")
def uneven_set():
    return write_set(41)  # shards of 7,7,7,7,7,6


def loaders(root, world, **kw):
    return [shards.make_loader(root, rank=r, world_size=world, **kw) for r in range(world)]


def keys_of(batches):
    return [k for b in batches for k in b["__key__"]]


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_batch_format(uneven_set):
    loader = shards.make_loader(uneven_set, batch_size=4, shuffle_buffer=8)
    batch = next(iter(loader))
    assert set(batch) == {"frames", "masks", "meta", "__key__"}
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (4, 3, SIZE, SIZE, 3)
    assert batch["masks"].dtype == torch.uint8 and batch["masks"].shape == (4, 3, SIZE, SIZE)
    assert len(batch["meta"]) == 4 and batch["meta"][0]["objects"] == [1, 2]
    assert len(set(batch["__key__"])) == 4


def test_one_rank_epoch_covers_the_set_shuffled_and_deterministic(uneven_set):
    a = list(shards.make_loader(uneven_set, batch_size=4, seed=3, shuffle_buffer=8))
    b = list(shards.make_loader(uneven_set, batch_size=4, seed=3, shuffle_buffer=8))
    c = list(shards.make_loader(uneven_set, batch_size=4, seed=4, shuffle_buffer=8))
    assert len(a) == 41 // 4
    assert keys_of(a) == keys_of(b) and keys_of(a) != keys_of(c)
    for x, y in zip(a, b):
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["masks"], y["masks"])
    assert len(set(keys_of(a))) == 40 and keys_of(a) != sorted(keys_of(a))


def test_epochs_differ_and_loader_advances(uneven_set):
    loader = shards.make_loader(uneven_set, batch_size=4, shuffle_buffer=8)
    first, second = keys_of(list(loader)), keys_of(list(loader))
    assert loader.epoch == 2 and first != second and len(second) == 40


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_batches_per_rank_and_disjoint_with_uneven_shards(uneven_set, workers):
    ranks = loaders(uneven_set, 3, batch_size=2, num_workers=workers, shuffle_buffer=4)
    per_rank = [list(loader) for loader in ranks]
    assert [len(b) for b in per_rank] == [41 // 6] * 3 == [len(loader) for loader in
                                                           loaders(uneven_set, 3, batch_size=2)]
    seen = [k for b in per_rank for k in keys_of(b)]
    assert len(seen) == len(set(seen)) == 6 * (41 // 6)  # no sample twice, < 1 global batch left


@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 3), (2, 4)])
def test_resume_at_batch_n_reproduces_the_uninterrupted_run(uneven_set, workers, stop):
    kw = dict(batch_size=3, num_workers=workers, shuffle_buffer=5, seed=11)
    full = list(shards.make_loader(uneven_set, **kw))
    first = shards.make_loader(uneven_set, **kw)
    take(first, stop)
    state = first.state_dict()
    resumed = shards.make_loader(uneven_set, **kw)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - stop
    rest = list(resumed)
    assert keys_of(rest) == keys_of(full[stop:])
    for x, y in zip(rest, full[stop:]):
        assert torch.equal(x["frames"], y["frames"])
    # and the next epoch continues identically too
    reference = shards.make_loader(uneven_set, **kw)
    list(reference)
    assert keys_of(list(resumed)) == keys_of(list(reference))


@pytest.mark.parametrize("before,after", [((3, 0), (2, 0)), ((2, 2), (3, 1)), ((1, 0), (4, 2))])
def test_elastic_resume_neither_repeats_nor_skips(uneven_set, before, after):
    (w0, nw0), (w1, nw1) = before, after
    batch, stop = 2, 3
    old = loaders(uneven_set, w0, batch_size=batch, num_workers=nw0, shuffle_buffer=4, seed=5)
    delivered = [k for loader in old for k in keys_of(take(loader, stop))]
    states = [loader.state_dict() for loader in old]
    assert all(s == states[0] for s in states)  # any rank's state describes all ranks
    new = loaders(uneven_set, w1, batch_size=batch, num_workers=nw1, shuffle_buffer=4, seed=5)
    for loader in new:
        loader.load_state_dict(states[0])
    lengths = {len(loader) for loader in new}
    assert len(lengths) == 1  # every rank yields the same number of batches
    rest = [keys_of(list(loader)) for loader in new]
    assert [len(r) for r in rest] == [lengths.pop() * batch] * w1
    everything = delivered + [k for r in rest for k in r]
    assert len(everything) == len(set(everything))  # nothing repeats
    assert 41 - len(everything) < w1 * batch  # only the final partial global batch is left
    assert all(loader.epoch == 1 for loader in new)
    # the state after the elastic leg keeps working: the next epoch is a full fresh one
    assert len(keys_of(list(new[0]))) == (41 // (w1 * batch)) * batch


def test_resume_rejects_a_different_plan_but_not_a_moved_set(uneven_set, tmp_path):
    loader = shards.make_loader(uneven_set, batch_size=2, seed=1, shuffle_buffer=4)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="different seed"):
        shards.make_loader(uneven_set, batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="different seed, weights"):
        shards.make_loader([(uneven_set, 2)], batch_size=2, seed=1).load_state_dict(state)
    # the same set copied elsewhere resumes exactly
    fs = storage.filesystem("memory://")[0]
    fs.get(f"/{uneven_set[len('memory://'):]}", str(tmp_path / "copy"), recursive=True)
    moved = shards.make_loader(str(tmp_path / "copy"), batch_size=2, seed=1, shuffle_buffer=4)
    moved.load_state_dict(state)
    assert keys_of(list(moved)) == keys_of(list(loader))


def test_weighted_mixing_repeats_sources_by_weight():
    davis, ytvos = write_set(8, 4, prefix="davis"), write_set(12, 4, prefix="ytvos")
    loader = shards.make_loader([(davis, 5), shards.ShardSource(ytvos, 1.0)], batch_size=4,
                                shuffle_buffer=16)
    keys = keys_of(list(loader))
    counts = Counter(k.split("-")[0] for k in keys)
    assert counts == {"davis": 40, "ytvos": 12} and len(keys) == 52
    assert all(v == 5 for k, v in Counter(keys).items() if k.startswith("davis"))
    half = shards.make_loader([(davis, 0.5), (ytvos, 1)], batch_size=2, shuffle_buffer=4)
    assert Counter(k.split("-")[0] for k in keys_of(list(half))) == {"davis": 4, "ytvos": 12}


def test_too_little_data_is_a_clear_error():
    root = write_set(3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        list(shards.make_loader(root, batch_size=2, world_size=2, rank=0))


@pytest.mark.parametrize("workers", [0, 2])
def test_held_batches_keep_their_own_data(uneven_set, workers):
    # workers reuse shared-memory buffers (shards.batch_ring): batches kept by the caller
    # must still hold exactly their samples' pixels at the end of the epoch
    want = {s["__key__"]: s for s in shards.iter_samples(uneven_set)}
    batches = list(shards.make_loader(uneven_set, batch_size=2, num_workers=workers,
                                      shuffle_buffer=4))
    assert len(batches) == 20
    for batch in batches:
        for i, key in enumerate(batch["__key__"]):
            assert torch.equal(batch["frames"][i], torch.from_numpy(want[key]["frames"]))
            assert torch.equal(batch["masks"][i], torch.from_numpy(want[key]["masks"]))


def test_seeded_streams_are_keyed_by_name_not_by_arithmetic():
    from shards.seeds import derived_seed, rng

    def draws(*args, **key):
        return tuple(rng(*args, **key).integers(2**62, size=4).tolist())

    # numpy pads short entropy lists with zeros: default_rng([5, 0]) is default_rng([5])
    assert np.random.default_rng([5, 0]).integers(2**62) == np.random.default_rng([5]).integers(2**62)
    keys = [("visit_order", {}), ("visit_order", {"epoch": 0}), ("visit_order", {"epoch": 1}),
            ("shuffle_buffer", {"epoch": 0, "rank": 1, "worker": 0}),
            ("shuffle_buffer", {"epoch": 0, "rank": 0, "worker": 1}),
            ("shuffle_buffer", {"epoch": 1, "rank": 0, "worker": 0})]
    assert len({draws(5, name, **key) for name, key in keys}) == len(keys)
    assert draws(5, "shuffle_buffer", rank=1, epoch=0) == draws(5, "shuffle_buffer", epoch=0, rank=1)
    assert draws(5, "visit_order", epoch=0) != draws(6, "visit_order", epoch=0)
    assert 0 <= derived_seed(2**70, "loader", stage=3) < 2**63
    with pytest.raises(ValueError, match="non-negative"):
        rng(-1, "visit_order")
