"""The STCN network (Space-Time Correspondence Networks, NeurIPS 2021).

One frame goes through the key encoder once: its key k16 (64 ch, 1/16) is used both as
a query and, later, as a memory key; f16_thin (``key_comp``) is the query's own value
half for the decoder; f16/f8/f4 feed the value encoder and the decoder's skips.
Memory values are encoded per object from the frame, the key encoder's f16 and the
object's mask (plus, in the multi-object network, the sum of the other objects' masks).
Segmenting a query reads the memory through one affinity shared by all objects, decodes
each object separately and merges them by soft aggregation.

Shapes: frames (B, 3, H, W) ImageNet-normalised, H and W multiples of 16; h = H/16.
Memory keys (B, 64, T, h, w); memory values (B, 512, T, h, w) for the single-object
network, (B, K, 512, T, h, w) for the multi-object one (K objects, time at dim 3).

BatchNorm is frozen by default: ``train()`` leaves every BatchNorm layer in eval mode
(running statistics fixed, affine parameters still trainable), as the published training
which keeps the whole network in eval mode. ``freeze_batchnorm(False)`` undoes it.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stcn.model import memory_ops
from stcn.model.aggregate import aggregate_logits
from stcn.model.modules import Decoder, KeyEncoder, KeyProjection, ValueEncoder

KEY_DIM = 64
VALUE_DIM = 512


class STCN(nn.Module):
    """STCN; ``single_object=True`` is the stage-0 network (one mask channel)."""

    def __init__(self, single_object: bool = False):
        super().__init__()
        self.single_object = single_object
        self.key_encoder = KeyEncoder()
        self.value_encoder = ValueEncoder(num_mask_channels=1 if single_object else 2)
        self.key_proj = KeyProjection(1024, KEY_DIM)
        self.key_comp = nn.Conv2d(1024, VALUE_DIM, 3, padding=1)
        self.decoder = Decoder()
        self._batchnorm_frozen = True
        self.train(self.training)

    # ----------------------------------------------------------------- train mode
    def freeze_batchnorm(self, frozen: bool = True) -> "STCN":
        """Keep BatchNorm layers in eval mode during training (default on)."""
        self._batchnorm_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> "STCN":
        super().train(mode)
        if self._batchnorm_frozen:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ encoding
    def encode_key(self, frame: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """frame (B, 3, H, W) -> k16 (B, 64, h, w), f16_thin (B, 512, h, w),
        f16 (B, 1024, h, w), f8 (B, 512, H/8, W/8), f4 (B, 256, H/4, W/4)."""
        f16, f8, f4 = self.key_encoder(frame)
        return self.key_proj(f16), self.key_comp(f16), f16, f8, f4

    def encode_value(self, frame: torch.Tensor, f16: torch.Tensor, mask: torch.Tensor,
                     other_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One object's memory value (B, 512, 1, h, w).

        frame (B, 3, H, W), f16 the key encoder's (B, 1024, h, w), mask (B, 1, H, W).
        ``other_mask`` (B, 1, H, W), the sum of the other objects' masks, is used by
        the multi-object network only (zeros when omitted).
        """
        if self.single_object:
            if other_mask is not None:
                raise ValueError("the single-object network takes no other_mask")
            masks = mask
        else:
            if other_mask is None:
                other_mask = torch.zeros_like(mask)
            masks = torch.cat([mask, other_mask], dim=1)
        return self.value_encoder(frame, f16, masks).unsqueeze(2)

    def encode_values(self, frame: torch.Tensor, f16: torch.Tensor,
                      masks: torch.Tensor) -> torch.Tensor:
        """Memory values of K objects at once: masks (B, K, H, W) -> (B, K, 512, 1, h, w).

        Each object is encoded with its own mask and the sum of the other K-1 masks, in
        one batch of B*K. The single-object network accepts K = 1 only.
        """
        b, k = masks.shape[:2]
        if self.single_object:
            if k != 1:
                raise ValueError(f"the single-object network encodes one object, got {k}")
            return self.encode_value(frame, f16, masks).unsqueeze(1)
        if k == 1:
            others = torch.zeros_like(masks)
        else:
            # Summing the other masks directly (not total - own) keeps K = 2 exact.
            others = torch.stack([masks[:, [j for j in range(k) if j != i]].sum(1)
                                  for i in range(k)], dim=1)
        # Frame and masks keep the given frame's memory layout (channels-last at inference),
        # so that all the value encoder's convolutions run in it.
        layout = (torch.channels_last if not frame.is_contiguous()
                  and frame.is_contiguous(memory_format=torch.channels_last)
                  else torch.contiguous_format)
        per_object = torch.stack([masks, others], dim=2).flatten(0, 1)      # B*K, 2, H, W
        frame = frame.unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
        per_object, frame = (x.contiguous(memory_format=layout) for x in (per_object, frame))
        if b > 1:  # one frame (b == 1): f16 stays shared, its convolutions run once
            f16 = f16.unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
        value = self.value_encoder(frame, f16, per_object)                   # B*K, 512, h, w
        return value.view(b, k, *value.shape[1:]).unsqueeze(3)

    # ------------------------------------------------------------------ decoding
    def decode(self, readout_and_query_value: torch.Tensor, f8: torch.Tensor,
               f4: torch.Tensor) -> torch.Tensor:
        """[memory readout, query f16_thin] (N, 1024, h, w) -> logits (N, 1, H, W).

        f8 / f4 may have batch 1 (shared by all N objects of one frame) or N. With batch 1
        the decoder's skip convolutions run once for all objects and broadcast (as
        published): expanding them first would run each N times (measured: ~20% of a
        3-object CPU inference).
        """
        n = readout_and_query_value.shape[0]
        if f8.shape[0] not in (1, n) or f4.shape[0] not in (1, n):
            raise ValueError(f"f8/f4 batches {f8.shape[0]}/{f4.shape[0]}: expected 1 or {n}")
        return self.decoder(readout_and_query_value, f8, f4)

    def decode_objects(self, readouts: torch.Tensor, query_value: torch.Tensor,
                       f8: torch.Tensor, f4: torch.Tensor,
                       winograd: Optional[int] = None) -> torch.Tensor:
        """``decode(cat([readouts, query_value expanded], 1), f8, f4)`` for readouts
        (N, 512, h, w) and the frame's query value (1, 512, h, w), without expanding it:
        the decoder's first block convolves the query half once for all N objects
        (measured ~5% of a 3-object CPU inference), equal up to float rounding.
        ``winograd``: tile size of Winograd 3x3 convolutions in the decoder (CPU, no
        autograd; stcn.model.winograd), None for direct ones."""
        if f8.shape[0] not in (1, readouts.shape[0]) or f4.shape[0] not in (1, readouts.shape[0]):
            raise ValueError(f"f8/f4 batches {f8.shape[0]}/{f4.shape[0]}: expected 1 or "
                             f"{readouts.shape[0]}")
        return self.decoder(readouts, f8, f4, f16_shared=query_value, tile=winograd)

    def segment(self, qk16: torch.Tensor, qv16: torch.Tensor, qf8: torch.Tensor,
                qf4: torch.Tensor, mk16: torch.Tensor, mv16: torch.Tensor,
                selector: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training-style segmentation of one query frame from memory (full softmax).

        qk16 (B, 64, h, w), qv16 (B, 512, h, w), qf8, qf4 from ``encode_key``;
        mk16 (B, 64, T, h, w); mv16 (B, 512, T, h, w) single-object or
        (B, K, 512, T, h, w) multi-object; selector (B, K) zeroes absent objects.
        Returns logits (B, 1 + K, H, W) with the background first, and the object
        probabilities (B, K, H, W) after soft aggregation.
        """
        if self.single_object:
            if mv16.dim() != 5:
                raise ValueError("single-object memory values must be (B, 512, T, h, w), "
                                 f"got {tuple(mv16.shape)}")
            mv16 = mv16.unsqueeze(1)
        elif mv16.dim() != 6:
            raise ValueError("multi-object memory values must be (B, K, 512, T, h, w), "
                             f"got {tuple(mv16.shape)}")
        b, k = mv16.shape[:2]
        h, w = qk16.shape[-2:]

        affinity = memory_ops.softmax_full(memory_ops.get_affinity(mk16, qk16))  # B, THW, hw
        affinity = affinity.repeat_interleave(k, dim=0)                            # B*K, THW, hw
        readout = memory_ops.readout(affinity, mv16.flatten(0, 1)).view(b * k, -1, h, w)
        qv16 = qv16.repeat_interleave(k, dim=0)
        logits = self.decode(torch.cat([readout, qv16], dim=1),
                             qf8.repeat_interleave(k, dim=0), qf4.repeat_interleave(k, dim=0))
        prob = torch.sigmoid(logits.view(b, k, *logits.shape[-2:]))
        if selector is not None and not self.single_object:
            prob = prob * selector[:, :, None, None]
        logits = aggregate_logits(prob, dim=1)
        return logits, torch.softmax(logits, dim=1)[:, 1:]

    # ------------------------------------------------------------ training clip
    def forward_clip(self, frames: torch.Tensor, first_mask: torch.Tensor,
                     second_mask: Optional[torch.Tensor] = None,
                     selector: Optional[torch.Tensor] = None) -> Dict[str, List[torch.Tensor]]:
        """The published 3-frame training pass.

        frames (B, 3, 3, H, W) [batch, clip frame, RGB, H, W], normalised; first_mask
        (and, multi-object only, second_mask) (B, 1, H, W): the ground-truth masks of
        clip frame 0; selector (B, 2) float, [1, 0] when the second object is absent
        (``None``: both present, or only the first when ``second_mask`` is omitted).
        Frame 1 is segmented from memory {0}, its predicted masks are encoded, and
        frame 2 is segmented from memory {0, 1}.
        Returns {"logits": [frame 1, frame 2] each (B, 1 + K, H, W) with the background
        channel first, "masks": [frame 1, frame 2] each (B, K, H, W)}, K = 1 or 2.
        """
        self._check_clip(frames, first_mask, second_mask, selector)
        b, t = frames.shape[:2]
        if self.single_object:
            masks = first_mask
        else:
            if second_mask is None:
                second_mask = torch.zeros_like(first_mask)
                selector = first_mask.new_tensor([1.0, 0.0]).expand(b, 2)
            masks = torch.cat([first_mask, second_mask], dim=1)

        # Key features never change: encode all frames of the clip in one batch.
        k16, f16_thin, f16, f8, f4 = (x.view(b, t, *x.shape[1:])
                                      for x in self.encode_key(frames.flatten(0, 1)))
        k16 = k16.transpose(1, 2)                                  # B, 64, T, h, w

        def values_for(mask_set: torch.Tensor, i: int) -> torch.Tensor:
            return self.encode_values(frames[:, i], f16[:, i], mask_set)   # B, K, 512, 1, h, w

        def segment_frame(i: int, memory_values: torch.Tensor):
            mv = memory_values[:, 0] if self.single_object else memory_values
            return self.segment(k16[:, :, i], f16_thin[:, i], f8[:, i], f4[:, i],
                                k16[:, :, :i], mv, selector)

        values = values_for(masks, 0)
        logits1, prob1 = segment_frame(1, values)
        values = torch.cat([values, values_for(prob1, 1)], dim=3)
        logits2, prob2 = segment_frame(2, values)
        return {"logits": [logits1, logits2], "masks": [prob1, prob2]}

    def forward(self, frames: torch.Tensor, first_mask: torch.Tensor,
                second_mask: Optional[torch.Tensor] = None,
                selector: Optional[torch.Tensor] = None) -> Dict[str, List[torch.Tensor]]:
        """Same as ``forward_clip`` (so DistributedDataParallel can wrap the network)."""
        return self.forward_clip(frames, first_mask, second_mask, selector)

    def _check_clip(self, frames, first_mask, second_mask, selector) -> None:
        if frames.dim() != 5 or frames.shape[1] != 3 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (B, 3 clip frames, 3 RGB, H, W), got {tuple(frames.shape)}")
        b, _, _, h, w = frames.shape
        if h % 16 or w % 16:
            raise ValueError(f"frame size must be a multiple of 16, got {h}x{w}; pad first")
        for name, m in (("first_mask", first_mask), ("second_mask", second_mask)):
            if m is not None and tuple(m.shape) != (b, 1, h, w):
                raise ValueError(f"{name} must be ({b}, 1, {h}, {w}), got {tuple(m.shape)}")
        if self.single_object and (second_mask is not None or selector is not None):
            raise ValueError("the single-object network takes no second_mask or selector")
        if selector is not None and tuple(selector.shape) != (b, 2):
            raise ValueError(f"selector must be ({b}, 2), got {tuple(selector.shape)}")
