"""The object-size rule and the geometry, through their public functions (triplet sampling:
test_pipelines_sampling.py)."""
import cv2
import numpy as np
import pytest

from shards.images import shorter_side_size

from pipelines.augment import (
    BL30K_AUGMENT,
    STATIC_AUGMENT,
    VIDEO_AUGMENT,
    augment_static,
    augment_video,
)
from pipelines.augment.geometry import centred_affine, random_crop
from pipelines.augment.recipes import static_steps
from pipelines.augment.tps import eval_tps, fit_tps, random_tps_points, tps_displacement
from pipelines.augment.warp import Step, warp_frame
from pipelines.sampling import FEW_IDS, MIN_AREA, SMALL_AREA, STAY_SMALL_AREA, eligible_objects


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


@pytest.mark.parametrize("top", [3, FEW_IDS, FEW_IDS + 1, 255])
def test_eligible_objects_counts_ids_as_a_histogram_does(top):
    # few ids are counted one by one, many in one histogram pass: both give the same lists
    rng = np.random.default_rng(top)
    masks = np.zeros((3, 96, 96), np.uint8)
    for frame in masks:
        for i in rng.choice(np.arange(1, top + 1), size=min(top, 6), replace=False):
            y, x = rng.integers(0, 80, 2)
            frame[y:y + rng.integers(3, 40), x:x + rng.integers(3, 40)] = i
    masks[0, :2, :2] = top  # the largest id is present in frame 0
    areas = [np.bincount(m.ravel(), minlength=256) for m in masks]
    present = [i for i in range(1, 256) if areas[0][i]]
    assert eligible_objects(masks) == present
    kept = [i for i in present if areas[0][i] > MIN_AREA and (
        areas[0][i] > SMALL_AREA or max(areas[1][i], areas[2][i]) < STAY_SMALL_AREA)]
    assert eligible_objects(masks, size_rule=True) == kept


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
    mask = (mask > 0).astype(np.uint8) * 255
    tps = 0
    for _ in range(60):
        frames, masks, soft, params = augment_static(rng, image, mask, STATIC_AUGMENT)
        assert frames.shape == (3, 384, 384, 3) and set(np.unique(masks)) <= {0, 1}
        assert soft.shape == masks.shape and soft.dtype == np.uint8
        assert np.array_equal(masks, soft > 127)  # the target is soft mask > 0.5
        assert 0.8 <= params["clip"]["scale"] <= 1.5
        for frame in params["frames"]:
            assert abs(frame["angle"]) <= 20 and abs(frame["shear"]) <= 10
            assert 0.9 <= frame["scale"] <= 1.1
            tps += frame["tps"]
    assert 0.2 < tps / 180 < 0.46  # p = 0.33
    with pytest.raises(ValueError, match="8-bit"):
        augment_static(rng, image, mask // 255, STATIC_AUGMENT)


def test_same_generator_same_clip():
    image, mask = _scene(np.random.default_rng(4))
    a = augment_static(np.random.default_rng(9), image, (mask > 0).astype(np.uint8) * 255,
                       STATIC_AUGMENT)
    b = augment_static(np.random.default_rng(9), image, (mask > 0).astype(np.uint8) * 255,
                       STATIC_AUGMENT)
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]


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
    out, out_mask, _, fill, _ = warp_frame(image, [Step(forward, (384, 384), (124, 116, 104))],
                                           384, ids=mask)
    # output (x, y) shows source (x - 7, y + 5)
    assert np.array_equal(out[:-5, 7:], image[5:, :-7])
    assert np.array_equal(out_mask[:-5, 7:], mask[5:, :-7])
    assert (out[:, :7] == (124, 116, 104)).all() and (out_mask[:, :7] == 0).all()
    assert (out[-5:] == (124, 116, 104)).all()
    expected_fill = np.ones((384, 384), bool)
    expected_fill[:-5, 7:] = False
    assert np.array_equal(fill, expected_fill)


def test_large_downscale_is_filtered():
    """A 3.7x shrink of 1-px stripes gives flat grey (area filtered), not aliasing bands."""
    stripes = np.zeros((1536, 1536, 3), np.uint8)
    stripes[:, ::2] = 255
    mask = np.zeros((1536, 1536), np.uint8)
    mask[400:1000, 400:1000] = 3
    forward = centred_affine(1536, 1536, angle=10.0, scale=1 / 3.7)
    forward[:2, 2] -= (1535 / 2 - 191.5)  # centre of the source -> centre of the output
    out, out_mask, _, _, _ = warp_frame(stripes, [Step(forward, (1536, 1536), (124, 116, 104))],
                                        384, ids=mask)
    inner = out[100:284, 100:284].astype(float)
    assert abs(inner.mean() - 127.5) < 8 and inner.std() < 12
    assert set(np.unique(out_mask)) == {0, 3}


# ------------------------------------------------------------- canvases and fill (issue 10.2)
MEAN = (124, 116, 104)
CUBIC, NEAREST, LINEAR = cv2.INTER_CUBIC, cv2.INTER_NEAREST, cv2.INTER_LINEAR


def _smooth_scene(h, w):
    """A smooth image (interpolation differs little between one warp and a chain) with two
    objects; the masks are 8-bit (0/255 for the static soft mask)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # blue stays above the mean's 104: no image pixel looks like fill
    image = np.stack([128 + 100 * np.sin(xs / 23), 128 + 100 * np.cos(ys / 31),
                      175 + 50 * np.sin((xs + ys) / 41)], -1).astype(np.uint8)
    ids = np.zeros((h, w), np.uint8)
    cv2.circle(ids, (w // 3, h // 2), h // 5, 1, -1)
    cv2.rectangle(ids, (w // 2, h // 4), (w - w // 6, h - h // 4), 2, -1)
    return image, ids


def _affine(src, matrix, wh, interpolation, fill):
    """One published step: src on its own canvas -> wh, reading outside src gives `fill`."""
    return cv2.warpAffine(src, matrix[:2], wh, flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def _reference_video(image, ids, box, angle, shear, size=384):
    """The published video chain, one cv2 call per step. Returns (image, ids, label) where
    label is 0 for image pixels and 1 for the rotation's fill."""
    x, y, w, h = box
    label = np.zeros(image.shape[:2], np.uint8)
    # random resized crop: inside the frame, resized (no fill)
    image = cv2.resize(image[y:y + h, x:x + w], (size, size), interpolation=CUBIC)
    ids = cv2.resize(ids[y:y + h, x:x + w], (size, size), interpolation=NEAREST)
    label = cv2.resize(label[y:y + h, x:x + w], (size, size), interpolation=NEAREST)
    # per frame rotation/shear of the crop, on the crop's canvas: the mean outside it
    frame = centred_affine(size, size, angle=angle, shear=shear)
    return (_affine(image, frame, (size, size), CUBIC, MEAN),
            _affine(ids, frame, (size, size), NEAREST, 0),
            _affine(label, frame, (size, size), NEAREST, 1))


def _reference_static(image, soft, clip_scale, frame_params, offset, displacement, size=384):
    """The published static chain, one cv2 call per step, each on its own canvas. Returns
    (image, soft mask, label): label 0 image, 1-3 the affines' / crop's mean fill, 4 the
    TPS warp's black fill."""
    h, w = soft.shape
    label = np.zeros((h, w), np.uint8)
    clip = centred_affine(w, h, scale=clip_scale)           # per clip: mask nearest
    image, soft, label = (_affine(image, clip, (w, h), CUBIC, MEAN),
                          _affine(soft, clip, (w, h), NEAREST, 0),
                          _affine(label, clip, (w, h), NEAREST, 1))
    frame = centred_affine(w, h, **frame_params)            # per frame: 8-bit mask bicubic
    image, soft, label = (_affine(image, frame, (w, h), CUBIC, MEAN),
                          _affine(soft, frame, (w, h), CUBIC, 0),
                          _affine(label, frame, (w, h), NEAREST, 2))
    rw, rh = shorter_side_size(w, h, size)                  # resize: mask nearest
    image, soft, label = (cv2.resize(image, (rw, rh), interpolation=CUBIC),
                          cv2.resize(soft, (rw, rh), interpolation=NEAREST),
                          cv2.resize(label, (rw, rh), interpolation=NEAREST))
    crop = np.array([[1.0, 0, -offset[0]], [0, 1, -offset[1]], [0, 0, 1]])  # pads the mean
    image, soft, label = (_affine(image, crop, (size, size), NEAREST, MEAN),
                          _affine(soft, crop, (size, size), NEAREST, 0),
                          _affine(label, crop, (size, size), NEAREST, 3))
    if displacement is not None:                            # TPS: bilinear, black outside
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        mx, my = xs + displacement[..., 0], ys + displacement[..., 1]

        def tps(src, interpolation, fill):
            return cv2.remap(src, mx, my, interpolation, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=fill)
        image, soft, label = tps(image, LINEAR, (0, 0, 0)), tps(soft, NEAREST, 0), \
            tps(label, NEAREST, 4)
    return image, soft, label


def _interior(*fills, width=2):
    """Pixels farther than `width` px from the edge of every given fill region."""
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    inner = np.ones(fills[0].shape, bool)
    for fill in fills:
        near_fill = cv2.dilate(fill.astype(np.uint8), kernel) > 0
        near_image = cv2.dilate((~fill).astype(np.uint8), kernel) > 0
        inner &= ~(near_fill & near_image)
    return inner


def _agree(out, ref_image, fill, ref_fill, tolerance, width=2, regions=()):
    """`width`: the boundary the chain blurs (its later steps interpolate across a fill
    edge; an upscale after the fill widens that band); `regions`: more edges (between two
    kinds of fill)."""
    inner = _interior(ref_fill, fill, *regions, width=width)
    assert not (fill != ref_fill)[inner].any()  # same fill mask except on its boundary
    image_px = inner & ~ref_fill
    diff = np.abs(out.astype(int) - ref_image.astype(int))[image_px]
    assert diff.mean() < tolerance and np.percentile(diff, 99) < 8 * tolerance
    # the fill colour is the chain's (up to the ringing of its later bicubic steps)
    fill_px = inner & ref_fill
    fill_diff = np.abs(out[fill_px].astype(int) - ref_image[fill_px]).max(-1)
    assert (fill_diff > 3).sum() <= 0.002 * fill_px.sum()


@pytest.mark.parametrize("h, w", [(480, 854), (240, 320)])
def test_video_warp_equals_the_step_by_step_chain(h, w):
    """augment_video's one warp per frame against the published chain rebuilt from the
    parameters it recorded: the rotation fills outside the 384 crop (not the source)."""
    image, ids = _smooth_scene(h, w)
    rng = np.random.default_rng(11)
    fills = []
    for _ in range(6):
        frames, masks, params = augment_video(rng, [image] * 3, [ids] * 3, VIDEO_AUGMENT)
        for out, out_ids, frame in zip(frames, masks, params["frames"]):
            ref, ref_ids, label = _reference_video(image, ids, params["clip"]["crop"],
                                                   frame["angle"], frame["shear"])
            fill = (out == MEAN).all(-1) & (out_ids == 0)
            ref_fill = label > 0
            _agree(out, ref, fill, ref_fill, tolerance=2.0)
            assert abs(frame["fill"] - ref_fill.mean()) < 0.01
            assert (out_ids != ref_ids)[_interior(ref_fill)].mean() < 0.01
            fills.append(frame["fill"])
    assert max(fills) > 0.03  # the draws did rotate the crop off its canvas


@pytest.mark.parametrize("clip_scale, angle, scale, shear, tps", [
    (0.8, 20.0, 0.9, 10.0, None),      # shrunk: the mean fills around the image
    (1.5, -17.0, 1.1, -8.0, None),     # enlarged and rotated: corners of the frame canvas
    (1.0, 5.0, 1.0, 3.0, 0.06),        # a strong TPS warp: black where it reads outside
    (0.85, -20.0, 0.95, 10.0, 0.04),
])
def test_static_warp_equals_the_step_by_step_chain(clip_scale, angle, scale, shear, tps):
    image, ids = _smooth_scene(240, 320)
    soft = (ids == 2).astype(np.uint8) * 255
    h, w = soft.shape
    frame_params = {"angle": angle, "scale": scale, "shear": shear}
    rng = np.random.default_rng(12)
    crop, crop_params = random_crop(rng, *shorter_side_size(w, h, 384), 384)
    displacement = None
    if tps is not None:
        displacement = tps_displacement(*random_tps_points(rng, 12, tps), 384)
    steps = static_steps(centred_affine(w, h, scale=clip_scale),
                         centred_affine(w, h, **frame_params), crop, (w, h), 384)
    out = warp_frame(image, steps, 384, soft=soft, displacement=displacement)
    ref, ref_soft, label = _reference_static(image, soft, clip_scale, frame_params,
                                             crop_params["offset"], displacement)
    assert (label > 0).mean() > 0.01  # each case does produce fill
    _agree(out.image, ref, out.fill, label > 0, tolerance=2.5, width=4, regions=[label == 4])
    inner = _interior(label > 0, out.fill, label == 4, width=4)
    if tps is not None:  # black only where the TPS step reads outside its 384 canvas
        assert (label == 4).any()
        assert (out.image[inner & (label == 4)] == 0).all()
        assert (out.image[inner & (label > 0) & (label < 4)] == MEAN).all()
    # soft masks: bicubic 8-bit values, 0 in the fill; the targets (> 0.5) agree off edges
    assert set(np.unique(out.soft)) - {0, 255}, "a bicubic soft mask has soft edges"
    assert not out.soft[inner & (label > 0)].any()
    assert ((out.soft > 127) != (ref_soft > 127))[inner].mean() < 0.01


def test_static_soft_warp_matches_a_full_bicubic_warp():
    """The soft mask is bicubic only near its edges (cheaper): equal to a full bicubic
    warp of the 8-bit mask, for up- and downscales."""
    for h, w, clip_scale in [(120, 160, 1.5), (240, 320, 0.8), (900, 1200, 0.9)]:
        _, ids = _smooth_scene(h, w)
        soft = cv2.GaussianBlur((ids > 0).astype(np.uint8) * 255, (5, 5), 0)
        rng = np.random.default_rng(13)
        crop, _ = random_crop(rng, *shorter_side_size(w, h, 384), 384)
        steps = static_steps(centred_affine(w, h, scale=clip_scale),
                             centred_affine(w, h, angle=12.0, shear=6.0), crop, (w, h), 384)
        out = warp_frame(np.zeros((h, w, 3), np.uint8), steps, 384, soft=soft)
        forward = np.eye(3)
        for step in steps:
            forward = step.forward @ forward
        full = cv2.warpAffine(soft, np.linalg.inv(forward)[:2], (384, 384),
                              flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT)
        full[out.fill] = 0
        assert np.abs(out.soft.astype(int) - full).max() <= 1
        assert 0 < ((out.soft > 0) & (out.soft < 255)).sum()


def test_video_fill_share_is_the_published_one():
    """480p video: ~5.9% of frame pixels are fill with the published loader (STCN_FACTS);
    filling only outside the source gave 0.9%."""
    image, ids = _smooth_scene(480, 854)
    rng = np.random.default_rng(14)
    shares = [f["fill"] for _ in range(150)
              for f in augment_video(rng, [image] * 3, [ids] * 3, VIDEO_AUGMENT)[2]["frames"]]
    assert 0.05 < np.mean(shares) < 0.07
