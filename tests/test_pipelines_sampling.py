"""The triplet sampler against the published rule, enumerated exactly; the retry rule."""
from collections import Counter
from fractions import Fraction

import cv2
import numpy as np
import pytest

from pipelines.augment import VIDEO_AUGMENT
from pipelines.clips import ATTEMPTS, make_video_clip
from pipelines.sampling import TripletSampler
from pipelines.sources import MemoryFrames, Video


def published_rule(n: int, max_skip: int) -> dict[tuple[int, int, int], Fraction]:
    """Exact probability of every triplet: each randint outcome of the published rule
    (STCN_FACTS, "The published triplet rule, exactly") enumerated with its weight."""
    j = min(n, max_skip)
    out: dict[tuple[int, int, int], Fraction] = Counter()
    weight = Fraction(1, (n - j + 1) * (j + 1) ** 2 * 2)
    for i0 in range(n - j + 1):                       # randint(N - J + 1)
        for g1 in range(j + 1):                       # randint(J + 1)
            i1 = min(i0 + g1 + 1, n - j, n - 1)
            for g2 in range(j + 1):
                i2 = min(i1 + g2 + 1, n - j // 2, n - 1)
                out[(i0, i1, i2)] += weight
                out[(i2, i1, i0)] += weight           # reversed with p = 0.5
    return out


def _stats(dist) -> tuple[float, float]:
    """(share of triplets holding a repeated frame, mean span first..last)."""
    repeats = sum(p for t, p in dist.items() if len(set(t)) < 3)
    span = sum(p * (max(t) - min(t)) for t, p in dist.items())
    return float(repeats), float(span)


@pytest.mark.parametrize("n,max_skip", [(3, 1), (4, 2), (5, 5), (8, 1), (7, 3), (9, 25)])
def test_sampler_matches_the_published_rule(n, max_skip):
    """Chi-square of 40k draws against the enumerated probabilities. The bound (dof +
    6 sqrt(2 dof), p < 1e-6) is loose enough for a correct sampler at any seed and fails for
    any real difference: e.g. without the clamps or the J + 1 gap, the statistic is > 1000."""
    exact = published_rule(n, max_skip)
    sampler, rng, draws = TripletSampler(max_skip), np.random.default_rng(n * 100 + max_skip), 40_000
    seen = Counter(tuple(sampler.sample(n, rng)) for _ in range(draws))
    assert set(seen) <= set(exact), f"impossible triplets {set(seen) - set(exact)}"
    chi2 = sum((seen[t] - draws * float(p)) ** 2 / (draws * float(p)) for t, p in exact.items())
    dof = len(exact) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)


def test_repeat_rate_and_span_as_measured_with_the_published_loader():
    """STCN_FACTS: 8 listed frames at J = 1 (YouTubeVOS, max skip 5): 30% of triplets hold a
    repeated frame, mean span 2.24 (measured, a few thousand clips: sampling noise ~0.01-0.02)."""
    exact_repeats, exact_span = _stats(published_rule(8, 1))
    assert exact_repeats == pytest.approx(0.3125) and exact_span == pytest.approx(2.21875)
    assert abs(exact_repeats - 0.30) < 0.02 and abs(exact_span - 2.24) < 0.03
    rng, sampler = np.random.default_rng(3), TripletSampler(1)
    draws = [sampler.sample(8, rng) for _ in range(20_000)]
    repeats = np.mean([len(set(t)) < 3 for t in draws])
    span = np.mean([max(t) - min(t) for t in draws])
    assert abs(repeats - exact_repeats) < 0.012 and abs(span - exact_span) < 0.015
    # the gap reaches J + 1, and a triplet is reversed half the time
    assert max(max(abs(b - a) for a, b in zip(t, t[1:])) for t in draws) == 2
    assert 0.48 < np.mean([t[0] > t[2] for t in draws if t[0] != t[2]]) < 0.52


def test_sampler_is_a_pure_function_of_its_generator():
    sampler = TripletSampler(5)
    a = [sampler.sample(30, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    with pytest.raises(ValueError):
        sampler.sample(2, np.random.default_rng(0))
    with pytest.raises(ValueError):
        TripletSampler(0)


def _video(frames: int, has_object) -> tuple[MemoryFrames, Video]:
    """A video whose object (id 1, a big square) is in frame k iff has_object(k)."""
    image = np.full((96, 128, 3), 90, np.uint8)
    ok, jpg = cv2.imencode(".jpg", image)
    store, names = {}, [f"{k:05d}" for k in range(frames)]
    for k, name in enumerate(names):
        mask = np.zeros((96, 128), np.uint8)
        if has_object(k):
            mask[16:80, 24:104] = 1
        store[name] = (jpg.tobytes(), cv2.imencode(".png", mask)[1].tobytes())
    return MemoryFrames({"v": store}), Video("v", tuple(names))


def _clip(store, video, round_, max_skip=2):
    return make_video_clip(store, video, round_, kind="davis", seed=0, max_skip=max_skip,
                           frame_step=1, aug=VIDEO_AUGMENT, size_rule=False)


def test_frames_of_other_sizes_are_named():
    """Masks are decoded before the images (an attempt that is retried needs no image), and
    every size is still checked: the error names the files and the fix."""
    store, video = _video(5, lambda k: True)
    frames = store.frames["v"]
    small = cv2.imencode(".png", np.ones((48, 64), np.uint8))[1].tobytes()
    for name in frames:  # every annotation smaller than its frame
        frames[name] = (frames[name][0], small)
    with pytest.raises(ValueError, match=r"mask 0000\d\.png is 64x48 but its frame "
                                         r"0000\d\.jpg is 128x96.*re-export"):
        _clip(store, video, 0)
    store, video = _video(5, lambda k: True)
    small_jpg = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
    for name in video.frames[1:]:  # frame 0 (image and annotation) differs from the others
        store.frames["v"][name] = (small_jpg, small)
    with pytest.raises(ValueError, match=r"annotation 0000\d\.png is \d+x\d+ but 0000\d\.png "
                                         r"is \d+x\d+; frames of one video must share one size"):
        for round_ in range(20):  # until a clip draws frame 0 and another
            _clip(store, video, round_)


def test_retry_until_frame_zero_holds_an_object_then_keep_without_target():
    # the object is only in the last 3 of 12 frames: most first tries miss it
    store, video = _video(12, lambda k: k >= 9)
    attempts, first_frames = Counter(), set()
    for round_ in range(40):
        meta = _clip(store, video, round_)["meta"]
        attempts[meta["attempt"]] += 1
        if meta["objects"]:
            assert int(meta["frames"][0]) >= 9, "frame 0 of a kept clip holds the object"
        else:
            assert meta["attempt"] == ATTEMPTS - 1 == 4
        first_frames.add(meta["frames"][0])
    assert len(attempts) >= 3, f"retries draw new frames: {attempts}"
    # no object anywhere: 5 tries, then the clip is kept with no target
    store, video = _video(6, lambda k: False)
    clip = _clip(store, video, 0)
    assert clip["meta"]["attempt"] == 4 and clip["meta"]["objects"] == []
    assert not clip["masks"].any()
