"""Winograd 3x3 convolutions (stcn.model.winograd) against F.conv2d, and their use by the
decoder at inference only."""

import pytest
import torch
import torch.nn.functional as F

from stcn.inference.core import InferenceConfig
from stcn.model import winograd
from stcn.model.network import STCN


def _close(y, ref):
    # F(4)'s transforms round a few times more than a direct convolution; relative to the
    # output's scale, 1e-5 is far above that and far below any wrong tap, channel or bias.
    scale = ref.abs().max().item()
    return (y - ref).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("tile", sorted(winograd.TRANSFORMS))
@pytest.mark.parametrize("n,c,h,w,k", [(1, 4, 1, 1, 16), (3, 8, 13, 6, 20), (2, 5, 7, 9, 16),
                                       (2, 3, 16, 24, 32), (1, 16, 11, 45, 16)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_equals_conv2d_at_odd_sizes_batches_and_bias(tile, n, c, h, w, k, layout):
    gen = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=layout)
    weight = torch.randn(k, c, 3, 3, generator=gen)
    bias = torch.randn(k, generator=gen)
    with torch.no_grad():
        assert winograd.applies(x, weight, tile)
        for b in (bias, None):
            for relu in (False, True):
                y = winograd.conv3x3(x, weight, b, tile, relu_input=relu)
                ref = F.conv2d(F.relu(x) if relu else x, weight, b, padding=1)
                assert y.shape == ref.shape
                assert _close(y, ref), (b is None, relu, (y - ref).abs().max())


def test_parallel_parts_equal_one_part_and_leave_the_thread_count():
    """With 2 torch threads the tile rows are split between two Python threads."""
    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(3, 16, 61, 50, generator=gen), torch.randn(32, 16, 3, 3, generator=gen)
    bias = torch.randn(32, generator=gen)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = winograd.conv3x3(x, weight, bias, 4, relu_input=True)
            torch.set_num_threads(2)
            two = winograd.conv3x3(x, weight, bias, 4, relu_input=True)
            assert torch.get_num_threads() == 2
        assert (one - two).abs().max() <= 1e-6 * one.abs().max()   # same arithmetic per tile
        assert _close(two, F.conv2d(F.relu(x), weight, bias, padding=1))
    finally:
        torch.set_num_threads(threads)


def test_input_channel_slices_sum_to_the_whole_convolution():
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 24, 9, 14, generator=gen), torch.randn(16, 24, 3, 3, generator=gen)
    bias = torch.randn(16, generator=gen)
    with torch.no_grad():
        parts = (winograd.conv3x3(x[:, :10], weight, bias, 4, channels=(0, 10))
                 + winograd.conv3x3(x[:, 10:], weight, None, 4, channels=(10, 24)))
        assert _close(parts, F.conv2d(x, weight, bias, padding=1))


def test_transformed_weights_follow_in_place_updates():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        before = winograd.conv3x3(x, conv.weight, conv.bias, 4)
        conv.weight.mul_(-2)                       # what an optimizer step or load_state_dict does
        after = winograd.conv3x3(x, conv.weight, conv.bias, 4)
        assert _close(after, conv(x))
        assert not _close(after, before)


def test_autograd_and_no_tile_run_the_direct_convolution():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 12, requires_grad=True)
    y = winograd.conv3x3(x, conv.weight, conv.bias, 4)
    assert y.grad_fn is not None and torch.equal(y, conv(x))
    with torch.no_grad():
        assert not winograd.applies(x, conv.weight, None)
        assert torch.equal(winograd.conv3x3(x, conv.weight, conv.bias, None), conv(x))
        assert not winograd.applies(x.double(), conv.weight.double(), 4)
        assert not winograd.applies(x, conv.weight[:1], 4)   # one output channel: direct


def test_decoder_with_winograd_equals_direct_up_to_rounding_and_training_is_untouched():
    torch.manual_seed(0)
    net = STCN().eval()
    readouts, query = torch.randn(3, 512, 5, 7), torch.randn(1, 512, 5, 7)
    f8, f4 = torch.randn(1, 512, 10, 14), torch.randn(1, 256, 20, 28)
    with torch.no_grad():
        direct = net.decode_objects(readouts, query, f8, f4)
        for tile in winograd.TRANSFORMS:
            fast = net.decode_objects(readouts, query, f8, f4, winograd=tile)
            assert not torch.equal(fast, direct)   # the Winograd path ran: rounding differs
            assert _close(fast, direct)
    # With autograd (training), the tile is ignored: bit-identical to the direct decoder.
    grad = net.decode_objects(readouts, query, f8, f4, winograd=4)
    assert grad.requires_grad and torch.equal(grad, net.decode_objects(readouts, query, f8, f4))


def test_config_takes_known_tiles_or_none():
    assert InferenceConfig(winograd=None).winograd is None
    with pytest.raises(ValueError, match="winograd"):
        InferenceConfig(winograd=3)
