"""STCN network, weight loading, memory reading and soft aggregation (CPU, tiny inputs).

Equivalence with the published implementation at full numerical detail was measured
outside the repository (see docs/FIDELITY.md); these tests pin the behaviour down
through the public API: checkpoint layout, loading, shapes, determinism, frozen
BatchNorm, and the memory/aggregation formulas against direct NumPy computations.
"""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from stcn.model import memory_ops, resnet
from stcn.model.aggregate import aggregate, aggregate_logits
from stcn.model.network import STCN
from stcn.model.weights import (
    CheckpointError,
    init_from_imagenet,
    load_stcn_weights,
    save_stcn_weights,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
H, W = 32, 48   # multiples of 16: key features are 2x3


def reference_layout(kind: str):
    """[(name, shape)] of the official checkpoint; kind 'multi' or 'single'."""
    name = f"stcn_state_dict_{kind}_object.txt"
    path = SHARED_REFERENCE / name if (SHARED_REFERENCE / name).is_file() else DATA / name
    layout = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, shape = line.partition(" ")
        layout.append((key, tuple(int(s) for s in shape.split("x")) if shape.strip() else ()))
    return layout


def state_dict_from_layout(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(7) if k.endswith("num_batches_tracked")
                else torch.randn(shape, generator=g) * 0.01 + (1.0 if "running_var" in k else 0.0))
            for k, shape in layout}


@pytest.fixture(scope="module")
def multi_net(net):
    return net  # conftest's: multi-object, torch seed 0


@pytest.fixture(scope="module")
def single_net():
    torch.manual_seed(1)
    return STCN(single_object=True).eval()


def clip(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, 3, 3, H, W, generator=g)
    first = (torch.rand(batch, 1, H, W, generator=g) > 0.5).float()
    second = (torch.rand(batch, 1, H, W, generator=g) > 0.7).float()
    return frames, first, second


# ------------------------------------------------------------------ layout & loading
def test_shipped_key_lists_match_shared_reference():
    for kind in ("multi", "single"):
        name = f"stcn_state_dict_{kind}_object.txt"
        if (SHARED_REFERENCE / name).is_file():
            assert (DATA / name).read_text() == (SHARED_REFERENCE / name).read_text()


@pytest.mark.parametrize("single", [False, True])
def test_state_dict_names_and_shapes_are_the_official_ones(single, multi_net, single_net):
    net = single_net if single else multi_net
    mine = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert mine == reference_layout("single" if single else "multi")


@pytest.mark.parametrize("single", [False, True])
def test_strict_load_of_state_dict_built_from_reference(single, multi_net, single_net):
    net = single_net if single else multi_net
    state = state_dict_from_layout(reference_layout("single" if single else "multi"))
    load_stcn_weights(net, state)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_stage0_checkpoint_is_widened_for_multi_object(tmp_path, multi_net):
    state = state_dict_from_layout(reference_layout("single"), seed=3)
    path = tmp_path / "stage0.pth"
    torch.save(state, path)
    load_stcn_weights(multi_net, path)
    loaded = multi_net.state_dict()
    conv = loaded["value_encoder.conv1.weight"]
    assert conv.shape == (64, 5, 7, 7)
    assert torch.equal(conv[:, :4], state["value_encoder.conv1.weight"])
    extra = conv[:, 4].reshape(64, 49)          # orthogonal init: orthonormal columns
    assert torch.allclose(extra.T @ extra, torch.eye(49), atol=1e-5)
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "value_encoder.conv1.weight")


def test_multi_object_checkpoint_does_not_fit_stage0_network(single_net):
    state = state_dict_from_layout(reference_layout("multi"))
    with pytest.raises(CheckpointError, match=r"value_encoder.conv1.weight \(64x5x7x7, expected 64x4x7x7\)"):
        load_stcn_weights(single_net, state)


def test_wrong_keys_give_one_clear_error(tmp_path, multi_net):
    state = state_dict_from_layout(reference_layout("multi"))
    renamed = [k for k in state if k.startswith("decoder.")][:8]
    for k in renamed:
        state["model." + k] = state.pop(k)
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    before = {k: v.clone() for k, v in multi_net.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_stcn_weights(multi_net, path)
    message = str(err.value)
    assert str(path) in message
    assert "8 missing keys" in message and "8 unexpected keys" in message
    assert sorted(renamed)[0] in message and "(3 more)" in message
    assert "key_encoder" in message and "stcn.pth" in message      # the expected layout
    # nothing was half-loaded
    assert all(torch.equal(before[k], v) for k, v in multi_net.state_dict().items())


def test_missing_and_unreadable_files(tmp_path, multi_net):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_stcn_weights(multi_net, tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_stcn_weights(multi_net, junk)


def test_training_checkpoint_and_saved_weights_round_trip(tmp_path, multi_net):
    state = state_dict_from_layout(reference_layout("multi"), seed=5)
    path = tmp_path / "checkpoint.pth"
    torch.save({"it": 10, "network": state, "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"milestones": Counter({150000: 1}), "gamma": 0.1}}, path)
    load_stcn_weights(multi_net, path)
    out = save_stcn_weights(multi_net, tmp_path / "out" / "stcn.pth")
    assert sorted(p.name for p in out.parent.iterdir()) == ["stcn.pth"]     # no temp files left
    saved = torch.load(out, weights_only=True)
    assert list(saved) == [k for k, _ in reference_layout("multi")]
    assert all(torch.equal(saved[k], v) for k, v in state.items())


# ------------------------------------------------------------------------- init
def test_random_init_key_projection_is_orthogonal_with_zero_bias(multi_net):
    net = STCN()
    w = net.key_proj.key_proj.weight.detach().reshape(64, -1)
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-4)
    assert torch.count_nonzero(net.key_proj.key_proj.bias) == 0


def test_imagenet_init_from_torchvision_layout_files(tmp_path):
    torch.manual_seed(2)
    r50, r18 = resnet.resnet50(num_classes=1000), resnet.resnet18(num_classes=1000)
    for m in (r50, r18):       # non-trivial BN statistics so misplaced tensors show
        for buf in m.state_dict().values():
            if buf.is_floating_point():
                buf.normal_()
    assert not r50.conv_bias and r50.conv1.bias is None      # torchvision layout: no conv bias
    torch.save(r50.state_dict(), tmp_path / "resnet50.pth")
    torch.save(r18.state_dict(), tmp_path / "resnet18.pth")

    net = STCN()
    fuser_before = {k: v.clone() for k, v in net.value_encoder.fuser.state_dict().items()}
    init_from_imagenet(net, tmp_path / "resnet50.pth", tmp_path / "resnet18.pth")

    src50, src18 = r50.state_dict(), r18.state_dict()
    for key, value in net.key_encoder.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, src50[key.replace("res2.", "layer1.", 1)]), key
    value_state = net.value_encoder.state_dict()
    for key, value in value_state.items():
        if key.startswith("fuser.") or key.endswith("num_batches_tracked"):
            continue
        if key == "conv1.weight":
            assert torch.equal(value[:, :3], src18[key])
            extra = value[:, 3:].reshape(64, -1)      # 2 mask channels, orthogonal rows
            assert torch.allclose(extra @ extra.T, torch.eye(64), atol=1e-5)
        elif key in src18:
            assert torch.equal(value, src18[key]), key
        else:                                          # conv biases torchvision lacks
            assert key.endswith(".bias") and torch.count_nonzero(value) == 0, key
    assert all(torch.equal(v, fuser_before[k]) for k, v in net.value_encoder.fuser.state_dict().items())

    with pytest.raises(CheckpointError, match=r"resnet18\.pth.*ResNet50"):
        init_from_imagenet(net, resnet50_path=tmp_path / "resnet18.pth")


def test_resnet_forward_shapes():
    x = torch.randn(1, 4, 32, 32)
    assert resnet.resnet18(in_channels=4, num_classes=10).eval()(x).shape == (1, 10)
    trunk = resnet.resnet50(in_channels=4, conv_bias=True, num_stages=3)
    assert trunk(x).shape == (1, 1024, 2, 2) and trunk.conv1.bias is not None


# -------------------------------------------------------------- network outputs
def test_encode_and_decode_shapes(multi_net, single_net):
    frame = torch.randn(2, 3, H, W)
    with torch.no_grad():
        k16, f16_thin, f16, f8, f4 = multi_net.encode_key(frame)
        assert k16.shape == (2, 64, 2, 3) and f16_thin.shape == (2, 512, 2, 3)
        assert f16.shape == (2, 1024, 2, 3) and f8.shape == (2, 512, 4, 6) and f4.shape == (2, 256, 8, 12)
        mask = torch.rand(2, 1, H, W)
        assert multi_net.encode_value(frame, f16, mask, mask).shape == (2, 512, 1, 2, 3)
        assert single_net.encode_value(frame, f16, mask).shape == (2, 512, 1, 2, 3)
        three = multi_net.encode_values(frame, f16, torch.rand(2, 3, H, W))
        assert three.shape == (2, 3, 512, 1, 2, 3)
        logits = multi_net.decode(torch.randn(3, 1024, 2, 3), f8[:1], f4[:1])
        assert logits.shape == (3, 1, H, W)
    with pytest.raises(ValueError, match="other_mask"):
        single_net.encode_value(frame, f16, mask, mask)


def test_encode_values_matches_per_object_encoding(multi_net):
    """The batched K-object encoder equals one encode_value call per object with the
    sum of the other objects' masks, as the published inference computes it."""
    frame = torch.randn(1, 3, H, W)
    masks = torch.rand(1, 3, H, W)
    with torch.no_grad():
        f16 = multi_net.encode_key(frame)[2]
        batched = multi_net.encode_values(frame, f16, masks)[0]
        for i in range(3):
            others = masks[:, [j for j in range(3) if j != i]].sum(1, keepdim=True)
            single = multi_net.encode_value(frame, f16, masks[:, i:i + 1], others)[0]
            assert torch.allclose(batched[i], single, atol=1e-5)


def test_segment_shapes_and_probabilities(multi_net, single_net):
    frames = torch.randn(2, 3, H, W)
    with torch.no_grad():
        qk, qv, qf16, qf8, qf4 = multi_net.encode_key(frames)
        mk = torch.randn(2, 64, 2, 2, 3)
        logits, prob = multi_net.segment(qk, qv, qf8, qf4, mk, torch.randn(2, 2, 512, 2, 2, 3),
                                         torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
        assert logits.shape == (2, 3, H, W) and prob.shape == (2, 2, H, W)
        assert torch.all(prob.sum(1) <= 1 + 1e-6) and prob[1, 1].max() < 1e-5   # absent object
        logits, prob = single_net.segment(qk, qv, qf8, qf4, mk, torch.randn(2, 512, 2, 2, 3))
        assert logits.shape == (2, 2, H, W) and prob.shape == (2, 1, H, W)
        assert torch.allclose(torch.softmax(logits, 1)[:, 1:], prob)


def published_clip(net, frames, first, second, selector):
    """The published multi-object training pass, composed from the public API one
    object at a time (reference for forward_clip's batched implementation)."""
    k16, thin, f16, f8, f4 = zip(*(net.encode_key(frames[:, i]) for i in range(3)))
    mk = torch.stack(k16, 2)

    def values(i, a, b):
        return torch.stack([net.encode_value(frames[:, i], f16[i], a, b),
                            net.encode_value(frames[:, i], f16[i], b, a)], 1)

    v0 = values(0, first, second)
    logits1, prob1 = net.segment(k16[1], thin[1], f8[1], f4[1], mk[:, :, :1], v0, selector)
    v01 = torch.cat([v0, values(1, prob1[:, :1], prob1[:, 1:])], 3)
    logits2, prob2 = net.segment(k16[2], thin[2], f8[2], f4[2], mk[:, :, :2], v01, selector)
    return [logits1, logits2], [prob1, prob2]


@pytest.mark.slow  # full-size forward/backward passes on CPU
def test_forward_clip_multi_object_matches_stepwise_composition(multi_net):
    frames, first, second = clip()
    selector = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    with torch.no_grad():
        out = multi_net.forward_clip(frames, first, second, selector)
        ref_logits, ref_masks = published_clip(multi_net, frames, first, second, selector)
    for i in range(2):
        assert out["logits"][i].shape == (2, 3, H, W) and out["masks"][i].shape == (2, 2, H, W)
        assert torch.allclose(out["logits"][i], ref_logits[i], atol=1e-4)
        assert torch.allclose(out["masks"][i], ref_masks[i], atol=1e-5)
        assert out["masks"][i][1, 1].max() < 1e-5                  # selector [1, 0]
    # no second object given: same as an all-zero second mask with selector [1, 0]
    with torch.no_grad():
        alone = multi_net.forward_clip(frames, first)
        zero = multi_net.forward_clip(frames, first, torch.zeros_like(second),
                                      torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(alone["masks"][1], zero["masks"][1])


@pytest.mark.slow  # full-size forward/backward passes on CPU
def test_forward_clip_single_object_and_determinism(single_net):
    frames, first, _ = clip(seed=4)
    with torch.no_grad():
        a = single_net(frames, first)
        b = single_net.forward_clip(frames, first)
    for i in range(2):
        assert a["logits"][i].shape == (2, 2, H, W) and a["masks"][i].shape == (2, 1, H, W)
        assert torch.equal(a["logits"][i], b["logits"][i]) and torch.equal(a["masks"][i], b["masks"][i])
    with pytest.raises(ValueError, match="multiple of 16"):
        single_net.forward_clip(torch.randn(1, 3, 3, 30, 48), torch.rand(1, 1, 30, 48))
    with pytest.raises(ValueError, match="second_mask"):
        single_net.forward_clip(frames, first, first)


@pytest.mark.slow  # full-size forward/backward passes on CPU
def test_batchnorm_stays_frozen_in_train_mode(single_net):
    net = single_net.train()
    try:
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and not any(m.training for m in bns) and net.decoder.training
        before = {k: v.clone() for k, v in net.state_dict().items()}
        frames, first, _ = clip(batch=1, seed=6)
        out = net.forward_clip(frames, first)
        out["logits"][1].mean().backward()
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        assert net.key_encoder.bn1.weight.grad is not None        # affine still trains
        net.freeze_batchnorm(False)
        assert all(m.training for m in bns)
    finally:
        net.freeze_batchnorm(True)
        net.zero_grad(set_to_none=True)
        net.eval()


# ------------------------------------------------------- memory ops and aggregation
def np_affinity(mk, qk):
    """Negative squared distance / sqrt(C), query norm included; (B, N, M)."""
    d2 = ((mk[:, :, :, None] - qk[:, :, None, :]) ** 2).sum(1)
    return -d2 / math.sqrt(mk.shape[1])


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_affinity_and_full_softmax_match_the_formula():
    rng = np.random.default_rng(0)
    mk, qk = rng.normal(size=(2, 64, 30)), rng.normal(size=(2, 64, 6))
    aff = memory_ops.get_affinity(torch.from_numpy(mk), torch.from_numpy(qk)).numpy()
    direct = (2 * np.einsum("bcn,bcm->bnm", mk, qk) - (mk ** 2).sum(1)[:, :, None]) / 8.0
    np.testing.assert_allclose(aff, direct, rtol=1e-10, atol=1e-10)
    # dropping |k_q|^2 leaves the softmax over memory positions unchanged
    np.testing.assert_allclose(memory_ops.softmax_full(torch.from_numpy(aff)).numpy(),
                               np_softmax(np_affinity(mk, qk), axis=1), atol=1e-12)
    # unflattened (B, C, T, h, w) keys give the same affinity
    five_d = memory_ops.get_affinity(torch.from_numpy(mk).view(2, 64, 5, 2, 3),
                                     torch.from_numpy(qk).view(2, 64, 2, 3)).numpy()
    np.testing.assert_allclose(five_d, aff)


def test_top_k_softmax_keeps_k_largest_per_query():
    rng = np.random.default_rng(1)
    aff = rng.normal(size=(2, 30, 6)) * 5
    out = memory_ops.softmax_top_k(torch.from_numpy(aff), 4).numpy()
    expected = np.zeros_like(aff)
    for b in range(2):
        for m in range(6):
            top = np.argsort(aff[b, :, m])[-4:]
            expected[b, top, m] = np_softmax(aff[b, top, m], axis=0)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    # k beyond the memory size is the full softmax; inplace reuses the input
    t = torch.from_numpy(aff.copy())
    full = memory_ops.softmax_top_k(t, 100, inplace=True)
    assert full.data_ptr() == t.data_ptr()
    np.testing.assert_allclose(full.numpy(), np_softmax(aff, axis=1), atol=1e-12)
    # large affinities (fp16-sized) do not overflow
    big = memory_ops.softmax_top_k(torch.full((1, 5, 2), 1e4, dtype=torch.float16), 3)
    assert torch.isfinite(big).all() and torch.allclose(big.sum(1).float(), torch.ones(1, 2), atol=1e-3)


def test_readout_is_the_weighted_sum_of_memory_values():
    rng = np.random.default_rng(2)
    aff, mv = rng.random(size=(1, 30, 6)), rng.normal(size=(3, 8, 30))
    out = memory_ops.readout(torch.from_numpy(aff), torch.from_numpy(mv)).numpy()
    np.testing.assert_allclose(out, np.einsum("knm,kcn->kcm", np.repeat(aff, 3, 0), mv), atol=1e-12)


def test_soft_aggregation_matches_the_formula():
    rng = np.random.default_rng(3)
    prob = rng.random(size=(3, 1, 4, 5))
    prob[0, 0, 0, 0], prob[1, 0, 0, 1] = 1.0, 0.0                 # exercise the clamping
    bg = np.prod(1 - prob, axis=0, keepdims=True)
    p = np.clip(np.concatenate([bg, prob]), 1e-7, 1 - 1e-7)
    expected = np_softmax(np.log(p / (1 - p)), axis=0)
    got = aggregate(torch.from_numpy(prob), keep_bg=True).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(aggregate(torch.from_numpy(prob)).numpy(), expected[1:], atol=1e-12)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-12)
    # the training network aggregates along dim 1 with the same formula
    batched = aggregate_logits(torch.from_numpy(prob).permute(1, 0, 2, 3), dim=1)
    np.testing.assert_allclose(batched.permute(1, 0, 2, 3).numpy(), np.log(p / (1 - p)), atol=1e-12)
