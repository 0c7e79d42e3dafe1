"""Device-side batch preparation: uint8 clips -> (optionally reduced) normalised float clips.

The pipeline bakes the expensive geometric warps into the shards and may leave cheap
photometric steps online (so each epoch sees fresh colours). Those steps run here, on the
training device, vectorised over the batch, with their random draws taken from an explicit
`torch.Generator` so a resumed run reproduces them exactly.

The online steps come from the shard manifest's generating config (`config["online"]`, written
by the pipeline): a mapping {step name: parameters} (or a list of names / {"name": ...} maps):
  - "hflip":              horizontal flip of the whole clip (frames and masks), p (0.5)
  - "color_jitter_clip":  one jitter per clip: brightness, contrast, saturation, hue
  - "color_jitter_frame": the same, drawn independently for every frame
  - "grayscale":          whole clip to grayscale, p (0.05)
Missing parameters take the published video values (STCN_FACTS.md, "Augmentation").
Colour jitter applies brightness, contrast, saturation, hue in that fixed order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from stcn.model.inputs import IMAGENET_MEAN, IMAGENET_STD

CROP_MODES = ("random", "center", "resize")


@dataclass(frozen=True)
class ColorJitter:
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass(frozen=True)
class OnlineAugmentation:
    """The photometric/flip steps applied on the device; the default does nothing."""

    flip_p: float = 0.0
    clip_jitter: ColorJitter | None = None
    frame_jitter: ColorJitter | None = None
    grayscale_p: float = 0.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Mapping[str, Any]] | Iterable[str | Mapping[str, Any]] | None
                  ) -> "OnlineAugmentation":
        """Build from a manifest's `online` entry (see the module docstring)."""
        if isinstance(spec, Mapping):
            steps = [(name, dict(params or {})) for name, params in spec.items()]
        else:
            steps = []
            for entry in spec or ():
                params = {"name": entry} if isinstance(entry, str) else dict(entry)
                steps.append((params.pop("name", None), params))
        fields: dict[str, Any] = {}
        for name, params in steps:
            per = params.pop("per", None)
            if name in ("hflip", "grayscale"):
                if per not in (None, "clip"):
                    raise ValueError(f"online step {name} is applied per clip, got per={per!r}")
                default_p = 0.5 if name == "hflip" else 0.05
                fields["flip_p" if name == "hflip" else "grayscale_p"] = float(params.get("p", default_p))
            elif name in ("color_jitter_clip", "color_jitter_frame"):
                per_frame = name == "color_jitter_frame"
                default = ColorJitter(0.01, 0.01, 0.01) if per_frame else ColorJitter(0.1, 0.03, 0.03)
                jitter = dataclasses.replace(default, **{k: float(v) for k, v in params.items()})
                fields["frame_jitter" if per_frame else "clip_jitter"] = jitter
            else:
                raise ValueError(
                    f"unknown online augmentation step {name!r}: expected hflip, color_jitter_clip, "
                    "color_jitter_frame or grayscale")
        return cls(**fields)


def prepare_batch(
    frames: torch.Tensor,
    masks: torch.Tensor,
    augmentation: OnlineAugmentation,
    generator: torch.Generator,
    device: torch.device | str,
    crop: int | None = None,
    crop_mode: str = "random",
    channels_last: bool = False,
    soft: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loader batch -> network input.

    frames: uint8 (B, T, H, W, 3); masks: uint8 (B, T, H, W); soft: the batch's uint8 soft
    masks (B, T, H, W) of static clips, or None. Returns frames as normalised float
    (B, T, 3, S, S), masks as uint8 (B, T, S, S) and the soft masks as float 0..1
    (B, T, S, S) or None, on `device`, S = crop or H; the soft masks take every geometric
    step the masks take. Random draws come from `generator` (a CPU generator, so its state
    is portable) and do not depend on `soft`.
    """
    device = torch.device(device)
    frames = frames.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255)
    masks = masks.to(device, non_blocking=True)
    if soft is not None:
        soft = soft.to(device, non_blocking=True).float().div_(255)
    if crop is not None:
        frames, masks, soft = reduce_resolution(frames, masks, crop, crop_mode, generator, soft)
    frames, masks, soft = augment(frames, masks, augmentation, generator, soft)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
    frames = (frames - mean) / std
    if channels_last:
        b, t = frames.shape[:2]
        frames = frames.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, t))
    return frames, masks, soft


def reduce_resolution(
    frames: torch.Tensor, masks: torch.Tensor, size: int, mode: str, generator: torch.Generator,
    soft: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Crop (random or centred, same window for the clip's frames) or resize clips to size x size;
    float soft masks (B, T, H, W), if given, go with the masks (resized bilinear)."""
    if mode not in CROP_MODES:
        raise ValueError(f"unknown crop mode {mode!r}: expected one of {CROP_MODES}")
    b, t, _, h, w = frames.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} is larger than the {h}x{w} clips")
    if mode == "resize":
        frames = F.interpolate(frames.flatten(0, 1), size=(size, size), mode="bilinear",
                               align_corners=False, antialias=True).unflatten(0, (b, t))
        masks = F.interpolate(masks.flatten(0, 1)[:, None].float(), size=(size, size),
                              mode="nearest")[:, 0].to(torch.uint8).unflatten(0, (b, t))
        if soft is not None:
            soft = F.interpolate(soft.flatten(0, 1)[:, None], size=(size, size), mode="bilinear",
                                 align_corners=False, antialias=True)[:, 0].unflatten(0, (b, t))
        return frames, masks, soft
    if mode == "center":
        tops = torch.full((b,), (h - size) // 2)
        lefts = torch.full((b,), (w - size) // 2)
    else:
        tops = torch.randint(0, h - size + 1, (b,), generator=generator)
        lefts = torch.randint(0, w - size + 1, (b,), generator=generator)
    frames = torch.stack([frames[i, :, :, y:y + size, x:x + size]
                          for i, (y, x) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    masks = torch.stack([masks[i, :, y:y + size, x:x + size]
                         for i, (y, x) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    if soft is not None:
        soft = torch.stack([soft[i, :, y:y + size, x:x + size]
                            for i, (y, x) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    return frames, masks, soft


def augment(
    frames: torch.Tensor, masks: torch.Tensor, augmentation: OnlineAugmentation, generator: torch.Generator,
    soft: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Apply the online steps to float frames in [0, 1], (B, T, 3, H, W), uint8 masks and
    (optional) float soft masks (B, T, H, W), which are flipped with the masks."""
    b, t = frames.shape[:2]
    device = frames.device

    def uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return (torch.rand(shape, generator=generator) * (high - low) + low).to(device)

    if augmentation.flip_p > 0:
        flip = uniform((b,), 0, 1) < augmentation.flip_p
        frames = torch.where(flip.view(b, 1, 1, 1, 1), frames.flip(-1), frames)
        masks = torch.where(flip.view(b, 1, 1, 1), masks.flip(-1), masks)
        if soft is not None:
            soft = torch.where(flip.view(b, 1, 1, 1), soft.flip(-1), soft)
    if augmentation.clip_jitter is not None:
        frames = color_jitter(frames, augmentation.clip_jitter, (b, 1), uniform)
    if augmentation.frame_jitter is not None:
        frames = color_jitter(frames, augmentation.frame_jitter, (b, t), uniform)
    if augmentation.grayscale_p > 0:
        gray = uniform((b,), 0, 1) < augmentation.grayscale_p
        frames = torch.where(gray.view(b, 1, 1, 1, 1), grayscale(frames).expand_as(frames), frames)
    return frames, masks, soft


def color_jitter(frames: torch.Tensor, jitter: ColorJitter, shape: tuple[int, int], uniform) -> torch.Tensor:
    """torchvision-style jitter with factors drawn per `shape` = (B, 1) clip or (B, T) frame."""
    view = (*shape, 1, 1, 1)
    if jitter.brightness > 0:
        factor = uniform(shape, 1 - jitter.brightness, 1 + jitter.brightness).view(view)
        frames = (frames * factor).clamp_(0, 1)
    if jitter.contrast > 0:
        factor = uniform(shape, 1 - jitter.contrast, 1 + jitter.contrast).view(view)
        mean = grayscale(frames).mean(dim=(-3, -2, -1), keepdim=True)
        frames = (factor * frames + (1 - factor) * mean).clamp_(0, 1)
    if jitter.saturation > 0:
        factor = uniform(shape, 1 - jitter.saturation, 1 + jitter.saturation).view(view)
        frames = (factor * frames + (1 - factor) * grayscale(frames)).clamp_(0, 1)
    if jitter.hue > 0:
        shift = uniform(shape, -jitter.hue, jitter.hue).view(view)
        frames = shift_hue(frames, shift)
    return frames


def grayscale(frames: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, keeping a channel axis of 1 at dim -3."""
    r, g, b = frames.unbind(dim=-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def shift_hue(frames: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) through HSV, channels at dim -3."""
    r, g, b = frames.unbind(dim=-3)
    value, _ = frames.max(dim=-3)
    minimum, _ = frames.min(dim=-3)
    chroma = value - minimum
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == r, ((g - b) / safe) % 6,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.squeeze(-3)) % 1.0
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    # HSV -> RGB via the standard k = (n + 6h) mod 6 formulation.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6) % 6
        weight = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
        channels.append(value - value * saturation * weight)
    return torch.stack(channels, dim=-3)


__all__ = ["OnlineAugmentation", "ColorJitter", "prepare_batch", "augment", "reduce_resolution",
           "CROP_MODES"]
