"""Memory bank and inference core: behaviour, and equality with a plain re-derivation
(exact, except pixels where the reference's probabilities tie within float rounding)."""

import pytest
import torch

from stcn.evaluation.bench import NEAR_TIE
from stcn.inference.core import Annotation, InferenceConfig, InferenceCore, pad_to_multiple, unpad
from stcn.inference.memory import MemoryBank
from stcn.model.aggregate import aggregate
from stcn.model.memory_ops import get_affinity, readout, softmax_full

H, W = 32, 64          # multiples of 16: 2x4 memory positions per frame


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, H, W, generator=g)
    mask = torch.zeros(H, W, dtype=torch.long)
    mask[4:20, 4:28] = 1
    mask[14:30, 36:60] = 2
    return images, mask


def _frame(value: float, objects: int = 2, positions: int = 8):
    key = torch.full((1, 4, 1, positions), value)
    return key, torch.full((objects, 3, 1, positions), value)


# -- memory bank -------------------------------------------------------------------------

def test_top_k_at_least_memory_size_equals_full_softmax():
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(top_k=1000)
    for _ in range(3):
        bank.add(torch.randn(1, 8, 2, 3, generator=g), torch.randn(2, 5, 2, 3, generator=g))
    query = torch.randn(1, 8, 2, 3, generator=g)
    keys, values = bank.memory()
    q = query.flatten(2)
    affinity = (2 * keys.transpose(1, 2) @ q - keys.pow(2).sum(1).unsqueeze(2)) / 8 ** 0.5
    expected = torch.bmm(values, torch.softmax(affinity, dim=1).expand(2, -1, -1)).view(2, 5, 2, 3)
    torch.testing.assert_close(bank.read(query), expected)


def test_top_k_chooses_exactly_the_positions_of_the_published_affinity():
    """The bank's affinity (key terms kept per frame, product transposed for top-k) is
    bit-identical to the published formula on the concatenated memory: with top-1 and
    values = position index, every query reads exactly the published argmax."""
    g = torch.Generator().manual_seed(3)
    bank = MemoryBank(top_k=1)
    frames = [torch.randn(1, 64, 6, 9, generator=g) * 3 for _ in range(4)]
    for i, key in enumerate(frames):
        index = torch.arange(54.0).view(1, 1, 6, 9) + 54 * i
        bank.add(key, index, temporary=i == 3)
    query = torch.randn(1, 64, 6, 9, generator=g) * 3
    keys = torch.cat([f.flatten(2) for f in frames], 2)
    expected = get_affinity(keys, query).argmax(1).view(6, 9).float()
    assert torch.equal(bank.read(query)[0, 0], expected)


def test_top_1_reads_the_single_best_memory_position():
    bank = MemoryBank(top_k=1)
    keys = torch.eye(4).view(1, 4, 1, 4)          # position i has key e_i
    values = torch.arange(4.0).view(1, 1, 1, 4)   # value = position index
    bank.add(keys, values)
    query = torch.tensor([0.0, 0.0, 3.0, 0.0]).view(1, 4, 1, 1)
    assert bank.read(query).item() == 2.0


def test_temporary_frame_is_replaced_and_flushed():
    bank = MemoryBank()
    bank.add(*_frame(0))
    bank.add(*_frame(1), temporary=True)
    bank.add(*_frame(2), temporary=True)
    keys, _ = bank.memory()
    assert bank.num_frames == 1 and keys[0, 0, ::8].tolist() == [0, 2]
    bank.add(*_frame(3))
    keys, _ = bank.memory()
    assert not bank.has_temporary and keys[0, 0, ::8].tolist() == [0, 3]


def test_max_frames_drops_oldest_frame_after_the_first():
    bank = MemoryBank(max_frames=3)
    for value in range(6):
        bank.add(*_frame(value))
    keys, values = bank.memory()
    assert bank.num_frames == 3
    assert keys[0, 0, ::8].tolist() == [0, 4, 5]
    assert values[1, 2, ::8].tolist() == [0, 4, 5]


def test_first_frame_is_permanent_even_if_marked_temporary():
    bank = MemoryBank()
    bank.add(*_frame(7), temporary=True)
    assert bank.num_frames == 1 and not bank.has_temporary


# -- inference core --------------------------------------------------------------------------

def _assert_same_but_near_ties(ours, labels, prob, what):
    """Our label map equals the reference's except where float rounding can flip a pixel
    (the core's channels-last convolutions and sparse readout round differently): there
    the reference's probability of our label must be within NEAR_TIE of its best."""
    ours = torch.from_numpy(ours).long()
    gap = prob.max(0).values - prob.gather(0, ours[None])[0]
    beyond = (ours != labels) & (gap > NEAR_TIE)
    assert not beyond.any(), f"{what}: {int(beyond.sum())} pixels differ beyond near ties"


def _reference_labels(net, images, mask, num_objects, mem_every, include_last):
    """Published DAVIS loop re-derived with the training-style full-softmax ``net.segment``:
    per frame the label map and the probabilities (K+1, H, W)."""
    one_hot = torch.stack([(mask == i).float() for i in range(1, num_objects + 1)])[:, None]
    with torch.no_grad():
        k, _, f16, _, _ = net.encode_key(images[:1])
        prob = aggregate(one_hot, keep_bg=True)[1:, 0]                       # K, H, W
        keys, values = [k], [net.encode_values(images[:1], f16, prob[None])]
        temp = None
        labels = [(mask, aggregate(one_hot, keep_bg=True)[:, 0])]
        for t in range(1, images.shape[0]):
            k, f16_thin, f16, f8, f4 = net.encode_key(images[t:t + 1])
            mk = torch.stack(keys + ([temp[0]] if temp else []), 2)
            mv = torch.cat(values + ([temp[1]] if temp else []), 3)
            logits, prob = net.segment(k, f16_thin, f8, f4, mk, mv)
            labels.append((torch.argmax(logits[0], 0), torch.softmax(logits[0], 0)))
            if t != images.shape[0] - 1:
                value = net.encode_values(images[t:t + 1], f16, prob)
                if t % mem_every == 0:
                    keys.append(k), values.append(value)
                    temp = None
                elif include_last:
                    temp = (k, value)
    return labels


@pytest.mark.parametrize("mem_every,include_last", [(2, False), (3, True)])
@pytest.mark.slow  # whole videos through the network on CPU, some twice
def test_core_with_large_top_k_equals_full_softmax_rederivation(net, video, mem_every, include_last):
    images, mask = video
    core = InferenceCore(net, InferenceConfig(top_k=10_000, mem_every=mem_every, include_last=include_last))
    result = core.segment(images, [Annotation(0, mask)], 2)
    expected = _reference_labels(net, images, mask, 2, mem_every, include_last)
    assert sorted(result) == list(range(images.shape[0]))
    for t, (labels, prob) in enumerate(expected):
        _assert_same_but_near_ties(result[t], labels, prob, f"frame {t}")


def _reference_youtube_labels(net, images, annotations, num_objects, mem_every, include_last):
    """Published YouTubeVOS loop re-derived: one memory per object (from the frame it is
    annotated at), full softmax, propagation pass by pass between annotated frames."""
    t_total = images.shape[0]
    prob = torch.zeros(num_objects + 1, t_total, 1, H, W)
    prob[0] = 1e-7
    memory = {}                                   # object -> list of [key, value] (+ temp)
    temp = {}
    enabled = []

    def remember(obj, key, value, is_temp):
        if is_temp and obj in memory:
            temp[obj] = (key, value)
        else:
            temp.pop(obj, None)
            memory.setdefault(obj, []).append((key, value))

    def values_for(t, f16, masks):                # masks (n, 1, H, W) -> per object (1, 512, 1, h, w)
        v = net.encode_values(images[t:t + 1], f16, masks.transpose(0, 1))[0]
        return [v[i:i + 1] for i in range(v.shape[0])]

    frames = sorted(annotations)
    with torch.no_grad():
        for n, a in enumerate(frames):
            mask, objs = annotations[a], sorted(set(annotations[a].unique().tolist()) - {0})
            one_hot = torch.stack([(mask == i).float() for i in range(num_objects + 1)])[:, None]
            prob[:, a, :, mask > 0] = 0
            prob[objs, a] = one_hot[objs]
            prob[:, a] = aggregate(prob[1:, a], keep_bg=True)
            enabled += [o for o in objs if o not in enabled]
            k, _, f16, _, _ = net.encode_key(images[a:a + 1])
            for obj, v in zip(enabled, values_for(a, f16, prob[enabled, a])):
                remember(obj, k, v, False)
            end = frames[n + 1] + 1 if n + 1 < len(frames) else t_total
            last = a
            for t in range(a + 1, end):
                is_mem = t - last >= mem_every
                k, f16_thin, f16, f8, f4 = net.encode_key(images[t:t + 1])
                outs = []
                for obj in enabled:
                    entries = memory[obj] + ([temp[obj]] if obj in temp else [])
                    mk = torch.cat([e[0].flatten(2) for e in entries], 2)
                    mv = torch.cat([e[1].flatten(2) for e in entries], 2)
                    r = readout(softmax_full(get_affinity(mk, k)), mv).view(1, -1, *k.shape[-2:])
                    outs.append(torch.sigmoid(net.decode(torch.cat([r, f16_thin], 1), f8, f4)))
                out = aggregate(torch.cat(outs, 0), keep_bg=True)
                prob[0, t] = out[0]
                prob[enabled, t] = out[1:]
                if t != end - 1 and (include_last or is_mem):
                    for obj, v in zip(enabled, values_for(t, f16, out[1:])):
                        remember(obj, k, v, not is_mem)
                    if is_mem:
                        last = t
    return torch.argmax(prob[:, :, 0], dim=0), prob[:, :, 0]


@pytest.mark.slow  # whole videos through the network on CPU, some twice
def test_core_with_late_objects_equals_per_object_memory_rederivation(net, video):
    images, mask = video
    late = torch.zeros_like(mask)
    late[20:30, 40:60] = 2
    annotations = {0: (mask == 1).long(), 3: late}
    core = InferenceCore(net, InferenceConfig(top_k=10_000, mem_every=2, include_last=True))
    result = core.segment(images, [Annotation(f, m) for f, m in annotations.items()], 2)
    labels, prob = _reference_youtube_labels(net, images, annotations, 2, mem_every=2, include_last=True)
    for t in range(images.shape[0]):
        _assert_same_but_near_ties(result[t], labels[t], prob[:, t], f"frame {t}")


@pytest.mark.slow  # whole videos through the network on CPU, some twice
def test_segmentation_is_deterministic_and_keeps_the_first_mask(net, video):
    images, mask = video
    core = InferenceCore(net, InferenceConfig(mem_every=2, include_last=True))
    first = core.segment(images, [Annotation(0, mask)], 2)
    second = core.segment(images, [Annotation(0, mask)], 2)
    assert sorted(first) == sorted(second) == list(range(images.shape[0]))  # every frame
    assert all((first[t] == second[t]).all() for t in first)
    assert (torch.from_numpy(first[0]).long() == mask).all()


@pytest.mark.slow  # whole videos through the network on CPU, some twice
def test_late_object_joins_at_its_frame_without_changing_earlier_frames(net, video):
    images, mask = video
    first_only = (mask == 1).long()
    late = torch.zeros_like(mask)
    late[20:30, 40:60] = 2
    core = InferenceCore(net, InferenceConfig(mem_every=2))
    alone = core.segment(images, [Annotation(0, first_only)], 2)
    both = core.segment(images, [Annotation(0, first_only), Annotation(3, late)], 2)
    for t in range(3):
        assert (both[t] == alone[t]).all() and not (both[t] == 2).any()
    assert (both[3][late.numpy() == 2] == 2).all()


def test_propagation_starts_at_the_first_annotation_and_only_requested_frames_return(net, video):
    images, mask = video
    core = InferenceCore(net)
    result = core.segment(images, [Annotation(2, mask)], 2, output_frames={0, 2, 5})
    assert sorted(result) == [2, 5]


@pytest.mark.slow  # whole videos through the network on CPU, some twice
def test_output_is_resized_to_the_requested_size_and_padding_is_undone(net):
    images = torch.randn(3, 3, 20, 40)                   # not multiples of 16: padded to 32x48
    mask = torch.zeros(20, 40, dtype=torch.long)
    mask[5:15, 5:20] = 1
    core = InferenceCore(net)
    same = core.segment(images, [Annotation(0, mask)], 1)
    assert same[0].shape == (20, 40) and (torch.from_numpy(same[0]).long() == mask).all()
    bigger = core.segment(images, [Annotation(0, mask)], 1, output_size=(40, 80))
    assert all(m.shape == (40, 80) for m in bigger.values())
    assert (bigger[0][10:30, 10:40] == 1).all() and bigger[0][:, 50:].max() == 0


def test_pad_and_unpad_round_trip():
    x = torch.randn(2, 1, 21, 35)
    padded, pads = pad_to_multiple(x)
    assert padded.shape[-2:] == (32, 48) and pads == (6, 7, 5, 6)
    assert torch.equal(unpad(padded, pads), x)


@pytest.mark.slow  # four whole-video segmentations on CPU
def test_bounded_memory_changes_nothing_while_under_the_bound(net, video):
    images, mask = video
    unbounded = InferenceCore(net, InferenceConfig(mem_every=1)).segment(images, [Annotation(0, mask)], 2)
    bounded = InferenceCore(net, InferenceConfig(mem_every=1, max_memory_frames=images.shape[0])).segment(
        images, [Annotation(0, mask)], 2)
    tight = InferenceCore(net, InferenceConfig(mem_every=1, max_memory_frames=1)).segment(
        images, [Annotation(0, mask)], 2)
    first_frame_only = InferenceCore(net, InferenceConfig(mem_every=100)).segment(
        images, [Annotation(0, mask)], 2)
    frames = list(range(images.shape[0]))
    assert sorted(unbounded) == sorted(bounded) == sorted(tight) == sorted(first_frame_only) == frames
    assert all((unbounded[t] == bounded[t]).all() for t in unbounded)
    assert all((tight[t] == first_frame_only[t]).all() for t in tight)


def test_amp_is_refused_on_cpu(net):
    with pytest.raises(ValueError, match="CUDA only"):
        InferenceCore(net, InferenceConfig(amp="bf16"))


def test_bad_annotations_are_rejected(net, video):
    images, mask = video
    core = InferenceCore(net)
    with pytest.raises(ValueError, match="at least the first frame"):
        core.segment(images, [], 2)
    with pytest.raises(ValueError, match="size"):
        core.segment(images, [Annotation(0, mask[:10])], 2)
    with pytest.raises(ValueError, match="outside 1..1"):
        core.segment(images, [Annotation(0, mask)], 1)
