"""The object-size rule and the geometry, through their public functions (triplet sampling:
test_pipelines_sampling.py)."""
import numpy as np
import pytest

from pipelines.augment import (BL30K_AUGMENT, STATIC_AUGMENT, VIDEO_AUGMENT, augment_static,
                               augment_video)
from pipelines.augment.geometry import centred_affine
from pipelines.augment.tps import eval_tps, fit_tps, random_tps_points, tps_displacement
from pipelines.augment.warp import warp_frame
from pipelines.sampling import eligible_objects


def _square(mask, obj, top, side):
    mask[top:top + side, top:top + side] = obj


def test_bl30k_object_size_rule():
    masks = np.zeros((3, 384, 384), np.uint8)
    _square(masks[0], 1, 0, 8)          # 64 px: too small
    _square(masks[0], 2, 20, 20)        # 400 px, stays small (15x15 later): kept
    _square(masks[1], 2, 20, 15)
    _square(masks[0], 3, 60, 20)        # 400 px but 50x50 later: a partial view, dropped
    _square(masks[2], 3, 60, 50)
    _square(masks[0], 4, 150, 40)       # 1600 px: kept
    _square(masks[1], 5, 250, 40)       # absent from frame 0: never eligible
    assert eligible_objects(masks, size_rule=True) == [2, 4]
    assert eligible_objects(masks, size_rule=False) == [1, 2, 3, 4]


def _scene(rng, h=240, w=320):
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[40:140, 60:200] = 1
    mask[150:220, 220:300] = 2
    return image, mask


def test_video_parameters_in_published_ranges():
    rng = np.random.default_rng(2)
    image, mask = _scene(rng)
    for aug in (VIDEO_AUGMENT, BL30K_AUGMENT):
        for _ in range(40):
            frames, masks, params = augment_video(rng, [image] * 3, [mask] * 3, aug)
            assert frames.shape == (3, 384, 384, 3) and masks.shape == (3, 384, 384)
            assert frames.dtype == masks.dtype == np.uint8
            assert set(np.unique(masks)) <= {0, 1, 2}  # nearest: no new ids
            clip = params["clip"]
            assert aug.crop_scale[0] - 0.02 <= clip["area"] <= 1.0
            assert aug.crop_ratio[0] - 0.02 <= clip["ratio"] <= aug.crop_ratio[1] + 0.02
            for frame in params["frames"]:
                assert abs(frame["angle"]) <= 15 and abs(frame["shear"]) <= 10


def test_static_parameters_in_published_ranges():
    rng = np.random.default_rng(3)
    image, mask = _scene(rng)
    mask = (mask > 0).astype(np.uint8)
    tps = 0
    for _ in range(60):
        frames, masks, params = augment_static(rng, image, mask, STATIC_AUGMENT)
        assert frames.shape == (3, 384, 384, 3) and set(np.unique(masks)) <= {0, 1}
        assert 0.8 <= params["clip"]["scale"] <= 1.5
        for frame in params["frames"]:
            assert abs(frame["angle"]) <= 20 and abs(frame["shear"]) <= 10
            assert 0.9 <= frame["scale"] <= 1.1
            tps += frame["tps"]
    assert 0.2 < tps / 180 < 0.46  # p = 0.33


def test_same_generator_same_clip():
    image, mask = _scene(np.random.default_rng(4))
    a = augment_static(np.random.default_rng(9), image, (mask > 0).astype(np.uint8), STATIC_AUGMENT)
    b = augment_static(np.random.default_rng(9), image, (mask > 0).astype(np.uint8), STATIC_AUGMENT)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_coarse_tps_matches_the_dense_spline():
    rng = np.random.default_rng(5)
    size = 384
    ys, xs = np.mgrid[0:size, 0:size]
    query = np.stack([xs.ravel(), ys.ravel()], 1) / (size - 1)
    errors = []
    for _ in range(6):
        source, dest = random_tps_points(rng, 12, 0.02)
        field = tps_displacement(source, dest, size)
        weights, affine = fit_tps(dest, source - dest)
        dense = eval_tps(dest, weights, affine, query).reshape(size, size, 2) * (size - 1)
        errors.append(np.abs(field - dense).max(-1))
        # it is a real warp: std 0.02 moves points by several pixels
        assert np.abs(dense).max() > 2
    errors = np.stack(errors)
    assert errors.mean() < 0.05 and np.percentile(errors, 99) < 1.0


def test_one_warp_equals_the_affine():
    """warp_frame with a pure translation shifts the image exactly, mean-filling the rest."""
    rng = np.random.default_rng(6)
    image, mask = _scene(rng, 384, 384)
    forward = centred_affine(384, 384)  # identity
    forward[0, 2], forward[1, 2] = 7, -5
    out, out_mask = warp_frame(image, mask, forward, 384, (124, 116, 104))
    # output (x, y) shows source (x - 7, y + 5)
    assert np.array_equal(out[:-5, 7:], image[5:, :-7])
    assert np.array_equal(out_mask[:-5, 7:], mask[5:, :-7])
    assert (out[:, :7] == (124, 116, 104)).all() and (out_mask[:, :7] == 0).all()
    assert (out[-5:] == (124, 116, 104)).all()


def test_large_downscale_is_filtered():
    """A 3.7x shrink of 1-px stripes gives flat grey (area filtered), not aliasing bands."""
    stripes = np.zeros((1536, 1536, 3), np.uint8)
    stripes[:, ::2] = 255
    mask = np.zeros((1536, 1536), np.uint8)
    mask[400:1000, 400:1000] = 3
    forward = centred_affine(1536, 1536, angle=10.0, scale=1 / 3.7)
    forward[:2, 2] -= (1535 / 2 - 191.5)  # centre of the source -> centre of the output
    out, out_mask = warp_frame(stripes, mask, forward, 384, (124, 116, 104))
    inner = out[100:284, 100:284].astype(float)
    assert abs(inner.mean() - 127.5) < 8 and inner.std() < 12
    assert set(np.unique(out_mask)) == {0, 3}
