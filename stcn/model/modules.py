"""STCN building blocks: encoders, fusion with CBAM attention, key projection, decoder.

Attribute names follow the official checkpoint layout (see the reference state-dict
lists), which is why some read oddly: the key encoder's first stage is ``res2``, the
CBAM gates are ``ChannelGate`` / ``SpatialGate`` and the spatial conv sits at
``SpatialGate.spatial.conv``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from stcn.model import resnet, winograd


def _conv(layer: nn.Conv2d, x: torch.Tensor, tile: Optional[int], relu_input: bool = False,
          channels: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """layer(relu(x)) or layer(x) (``channels`` (lo, hi): with weight[:, lo:hi] and, unless
    lo == 0, no bias); with a Winograd ``tile`` by ``winograd.conv3x3`` where that applies
    (CPU inference), else exactly as before."""
    if tile is None and channels is None:
        return layer(F.relu(x) if relu_input else x)
    # A weight slice without a tile runs directly too: winograd.conv3x3's own fallback.
    bias = layer.bias if channels is None or channels[0] == 0 else None
    return winograd.conv3x3(x, layer.weight, bias, tile, relu_input=relu_input, channels=channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv2(relu(conv1(relu(x)))).

    When the widths differ, the skip path is a 3x3 conv named ``downsample`` (it does
    not change the resolution; the name is the checkpoint's).
    """

    def __init__(self, in_dim: int, out_dim: Optional[int] = None):
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.downsample = None if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, tile: Optional[int] = None) -> torch.Tensor:
        """``tile``: Winograd tile size for the convolutions at inference (see _conv)."""
        r = _conv(self.conv2, _conv(self.conv1, x, tile, relu_input=True), tile, relu_input=True)
        skip = x if self.downsample is None else _conv(self.downsample, x, tile)
        return skip + r

    def forward_shared(self, x: torch.Tensor, shared: torch.Tensor,
                       tile: Optional[int] = None) -> torch.Tensor:
        """forward(cat([x, shared], 1)) for x (N, C1, h, w) and shared (1, C2, h, w), the
        same for all N: a convolution of a concatenation is the sum of the convolutions of
        its parts, so the shared part's run once (equal up to float rounding)."""
        if self.downsample is None:
            raise ValueError("forward_shared needs a block whose width changes")
        c, total = x.shape[1], x.shape[1] + shared.shape[1]

        def conv(layer: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, relu: bool) -> torch.Tensor:
            return (_conv(layer, a, tile, relu, channels=(0, c))
                    + _conv(layer, b, tile, relu, channels=(c, total)))
        r = _conv(self.conv2, conv(self.conv1, x, shared, relu=True), tile, relu_input=True)
        return conv(self.downsample, x, shared, relu=False) + r


class ChannelGate(nn.Module):
    """CBAM channel attention: a shared MLP on global average- and max-pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        # Index 0 flattens so the Linear layers sit at mlp.1 / mlp.3 as in the checkpoint.
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        scale = torch.sigmoid(avg + mx)[:, :, None, None]
        return x * scale


class SpatialGate(nn.Module):
    """CBAM spatial attention: 7x7 conv over the [max, mean] of the channels."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.spatial = nn.ModuleDict({"conv": nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial["conv"](pooled))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate, then spatial gate."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.ChannelGate = ChannelGate(channels, reduction)
        self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class FeatureFusion(nn.Module):
    """Fuses the value encoder's features with the key encoder's f16 (1/16 scale)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.block1 = ResBlock(in_dim, out_dim)
        self.attention = CBAM(out_dim)
        self.block2 = ResBlock(out_dim, out_dim)

    def forward(self, x: torch.Tensor, key_f16: torch.Tensor) -> torch.Tensor:
        """key_f16 may have batch 1 for all of x's objects (one frame): its part of the
        first block's convolutions then runs once (ResBlock.forward_shared)."""
        if key_f16.shape[0] == 1 and x.shape[0] > 1:
            x = self.block1.forward_shared(x, key_f16)
        else:
            x = self.block1(torch.cat([x, key_f16], dim=1))
        return self.block2(x + self.attention(x))


class KeyEncoder(nn.Module):
    """ResNet-50 stem and stages 1-3 (stage 1 named ``res2``) -> f16, f8, f4."""

    def __init__(self):
        super().__init__()
        net = resnet.resnet50(num_stages=3)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.res2, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(image))))
        f4 = self.res2(x)          # 1/4, 256
        f8 = self.layer2(f4)       # 1/8, 512
        f16 = self.layer3(f8)      # 1/16, 1024
        return f16, f8, f4


class ValueEncoder(nn.Module):
    """ResNet-18 (convs with biases) on RGB + mask channels, stages 1-3, then fusion
    with the key encoder's f16 -> 512 channels at 1/16.

    ``num_mask_channels`` is 1 for the single-object stage-0 network (the object's
    mask) and 2 otherwise (the object's mask, then the sum of the other objects').
    """

    def __init__(self, num_mask_channels: int):
        super().__init__()
        self.num_mask_channels = num_mask_channels
        net = resnet.resnet18(in_channels=3 + num_mask_channels, conv_bias=True, num_stages=3)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.fuser = FeatureFusion(1024 + 256, 512)

    def forward(self, image: torch.Tensor, key_f16: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W), key_f16 (B, 1024, H/16, W/16), masks (B, C_mask, H, W)."""
        x = torch.cat([image, masks], dim=1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))   # 1/16, 256
        return self.fuser(x, key_f16)


class KeyProjection(nn.Module):
    """3x3 conv from f16 to the key space; orthogonal weights, zero bias at init."""

    def __init__(self, in_dim: int, key_dim: int):
        super().__init__()
        self.key_proj = nn.Conv2d(in_dim, key_dim, 3, padding=1)
        nn.init.orthogonal_(self.key_proj.weight)
        nn.init.zeros_(self.key_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_proj(x)


class UpsampleBlock(nn.Module):
    """Adds a 3x3-conv'd skip feature to the bilinearly upsampled coarser feature."""

    def __init__(self, skip_dim: int, up_dim: int, out_dim: int, scale_factor: int = 2):
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_dim, up_dim, 3, padding=1)
        self.out_conv = ResBlock(up_dim, out_dim)
        self.scale_factor = scale_factor

    def forward(self, skip: torch.Tensor, up: torch.Tensor, tile: Optional[int] = None) -> torch.Tensor:
        up = F.interpolate(up, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        return self.out_conv(_conv(self.skip_conv, skip, tile) + up, tile)


class Decoder(nn.Module):
    """[memory readout, query value] at 1/16 -> one mask logit at full resolution."""

    def __init__(self):
        super().__init__()
        self.compress = ResBlock(1024, 512)
        self.up_16_8 = UpsampleBlock(512, 512, 256)
        self.up_8_4 = UpsampleBlock(256, 256, 256)
        self.pred = nn.Conv2d(256, 1, 3, padding=1)

    def forward(self, f16: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor,
                f16_shared: Optional[torch.Tensor] = None, tile: Optional[int] = None) -> torch.Tensor:
        """f16 (N, 1024, ...) or, with f16_shared (1, 512, ...) the second half shared by
        all N (the query's own value at inference), f16 (N, 512, ...): see forward_shared.
        ``tile``: Winograd F(tile x tile, 3x3) for the 3x3 convolutions where it applies
        (CPU inference without autograd, see stcn.model.winograd); None: direct."""
        x = (self.compress(f16, tile) if f16_shared is None
             else self.compress.forward_shared(f16, f16_shared, tile))
        x = self.up_16_8(f8, x, tile)
        x = self.up_8_4(f4, x, tile)
        x = self.pred(F.relu(x))
        return F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
