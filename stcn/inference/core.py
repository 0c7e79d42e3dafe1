"""Semi-supervised segmentation of one video with a trained STCN (published inference).

``InferenceCore.segment`` takes a video's normalised frames and its annotations and
propagates the annotated objects through the remaining frames:

- frames are padded to a multiple of 16 (evenly on both sides) and the output unpadded;
- each frame is matched against the memory with a top-k softmax (k = 20);
- a frame joins the memory every ``mem_every`` frames after the last memory frame
  (counted from the latest annotated frame), and with ``include_last`` the previous
  frame is kept as temporary memory;
- the objects are decoded separately and merged by soft aggregation;
- objects may first appear at a later annotated frame (YouTubeVOS): their mask is merged
  into the running prediction at that frame, and they get their own memory from there
  on (a group ``MemoryBank``), exactly as the published YouTubeVOS inference does;
- the predicted probabilities are resized (bilinear) to ``output_size`` before argmax.

Object ids inside the core are 1..K (0 = background); readers map data set ids to these
and back (see ``stcn.evaluation``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stcn.inference.memory import MemoryBank
from stcn.model.aggregate import aggregate
from stcn.model.precision import AMP_DTYPES, check_amp
from stcn.model.winograd import TRANSFORMS as WINOGRAD_TILES

PAD_MULTIPLE = 16

#: Command-line spellings of InferenceConfig.winograd (tools/eval, tools/bench_infer).
WINOGRAD_SETTINGS: dict[str, int | None] = {"off": None, **{str(m): m for m in sorted(WINOGRAD_TILES)}}
WINOGRAD_HELP = ("Tile size of the Winograd F(m x m, 3x3) convolutions of the decoder on CPU (fewer "
                 "multiplies; rounding differs, so masks can differ at near ties), or off for "
                 "direct convolutions. Ignored on GPU.")


@dataclass(frozen=True)
class InferenceConfig:
    """Inference settings; the defaults are the published ones (DAVIS test-dev used mem_every=3)."""
    top_k: int = 20
    mem_every: int = 5
    include_last: bool = False
    max_memory_frames: int | None = None   # None: unbounded, as published
    amp: str | None = None                 # None, "fp16" or "bf16"; CUDA only
    # Winograd F(m x m, 3x3) tile size for the decoder's 3x3 convolutions on CPU (fewer
    # multiplies, rounding differs: stcn.model.winograd); None: direct convolutions.
    winograd: int | None = 4

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.mem_every < 1:
            raise ValueError(f"mem_every must be at least 1, got {self.mem_every}")
        if self.max_memory_frames is not None and self.max_memory_frames < 1:
            raise ValueError(f"max_memory_frames must be at least 1, got {self.max_memory_frames}")
        if self.winograd is not None and self.winograd not in WINOGRAD_TILES:
            raise ValueError(f"winograd must be one of {sorted(WINOGRAD_TILES)} or None, "
                             f"got {self.winograd!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {self.amp!r}")


@dataclass(frozen=True)
class Annotation:
    """A given mask at ``frame``: ``mask`` (h, w) int tensor of core ids 0..K, at the
    processing resolution. ``objects`` lists the ids annotated there; by default the ids
    present in ``mask`` (pass them when resizing may have erased a tiny object)."""
    frame: int
    mask: torch.Tensor
    objects: tuple[int, ...] = field(default=())

    def object_ids(self) -> tuple[int, ...]:
        if self.objects:
            return tuple(int(o) for o in self.objects)
        ids = torch.unique(self.mask)
        return tuple(int(i) for i in ids.tolist() if i != 0)


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE
                    ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad the last two dims up to a multiple; the odd pixel goes right/bottom.

    Returns the padded tensor and (left, right, top, bottom) for ``unpad``.
    """
    h, w = x.shape[-2:]
    extra_h, extra_w = -h % multiple, -w % multiple
    pads = (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2)
    return (F.pad(x, pads) if any(pads) else x), pads


def unpad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]


@contextlib.contextmanager
def _eval_mode(net: torch.nn.Module) -> Iterator[None]:
    """Evaluate with frozen BatchNorm etc., then give the caller its mode back."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


class _ObjectGroup:
    """Objects that entered the video at the same frame, with their own memory."""

    def __init__(self, objects: list[int], bank: MemoryBank):
        self.objects = objects
        self.bank = bank


class InferenceCore:
    """Runs the published STCN inference for one video at a time with a built network.

    ``net`` must provide ``encode_key``, ``encode_value`` and ``decode`` (``stcn.model.network.STCN``).
    """

    def __init__(self, net: torch.nn.Module, config: InferenceConfig = InferenceConfig()):
        self.net = net
        self.config = config
        self.device = next(net.parameters()).device
        check_amp(config.amp, self.device)

    def _autocast(self):
        if self.config.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.config.amp])

    # -- network steps ---------------------------------------------------------------

    def _encode_values(self, frame, f16, masks: torch.Tensor) -> torch.Tensor:
        """Memory values (K, CV, 1, h, w) of one frame for K soft masks (K, 1, H, W)."""
        return self.net.encode_values(frame, f16, masks.transpose(0, 1))[0]

    def _decode(self, groups: list[_ObjectGroup], key, f16_thin, f8, f4) -> torch.Tensor:
        """Per-object probabilities (K_enabled, 1, H, W) before aggregation."""
        reads = [g.bank.read(key) for g in groups]
        readouts = reads[0] if len(reads) == 1 else torch.cat(reads, 0)
        logits = self.net.decode_objects(readouts, f16_thin, f8, f4,
                                         winograd=self.config.winograd)
        return torch.sigmoid(logits).float()

    # -- the video loop -----------------------------------------------------------------

    @torch.inference_mode()
    def segment(self, images: torch.Tensor, annotations: Sequence[Annotation], num_objects: int,
                *, output_size: tuple[int, int] | None = None,
                output_frames: set[int] | None = None) -> dict[int, np.ndarray]:
        """Segment a video.

        images: (T, 3, H, W) float, ImageNet-normalised RGB (any device).
        annotations: the given masks; propagation starts at the earliest one.
        num_objects: K, the largest core object id.
        output_size: (H0, W0) of the returned masks (default: H, W).
        output_frames: frames to return (default: every frame from the first annotation
            on). Frames that are neither returned nor memory frames are skipped.
        Returns {frame index: uint8 (H0, W0) label map of core ids 0..K}.
        """
        cfg = self.config
        if not 0 <= num_objects <= 255:
            raise ValueError(f"num_objects must be within 0..255 (uint8 label maps), got {num_objects}")
        num_frames, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        output_size = tuple(output_size or (height, width))
        by_frame = self._annotations_by_frame(annotations, num_frames, num_objects, (height, width))
        start = min(by_frame)

        groups: list[_ObjectGroup] = []
        enabled: list[int] = []            # core ids with memory, in the order they entered
        last_memory_frame = start
        results: dict[int, np.ndarray] = {}
        with _eval_mode(self.net), self._autocast():
            for ti in range(start, num_frames):
                annotation = by_frame.get(ti)
                is_memory_frame = ti - last_memory_frame >= cfg.mem_every
                wanted = output_frames is None or ti in output_frames
                if annotation is None and not (is_memory_frame or cfg.include_last or wanted):
                    continue  # neither needed as output nor as memory

                frame, pads = pad_to_multiple(images[ti:ti + 1].to(self.device, torch.float32))
                key, f16_thin, f16, f8, f4 = self.net.encode_key(frame)
                # The key path above stays as published (the same keys choose the same top-k
                # memory positions); what feeds the value encoder and the decoder runs
                # channels-last, the faster layout of CPU convolutions (rounding differs).
                frame, f16_thin, f16, f8, f4 = (x.contiguous(memory_format=torch.channels_last)
                                                for x in (frame, f16_thin, f16, f8, f4))

                # Probabilities of background + all K objects; objects without memory stay 0.
                prob = torch.zeros((num_objects + 1, 1, *frame.shape[-2:]), device=self.device)
                prob[0] = 1e-7
                if enabled:
                    merged = aggregate(self._decode(groups, key, f16_thin, f8, f4), keep_bg=True)
                    prob[0] = merged[0]
                    prob[enabled] = merged[1:]

                if annotation is not None:
                    prob, new_objects = self._apply_annotation(prob, annotation, enabled)
                    if new_objects:
                        groups.append(_ObjectGroup(new_objects, MemoryBank(cfg.top_k, cfg.max_memory_frames)))
                        enabled.extend(new_objects)
                    if ti != num_frames - 1:
                        self._memorise(groups, enabled, frame, key, f16, prob[enabled], temporary=False)
                    last_memory_frame = ti
                elif ti != num_frames - 1 and (is_memory_frame or cfg.include_last):
                    self._memorise(groups, enabled, frame, key, f16, prob[enabled],
                                   temporary=not is_memory_frame)
                    if is_memory_frame:
                        last_memory_frame = ti

                if wanted:
                    results[ti] = self._to_label_map(prob, pads, output_size)
        return results

    def _annotations_by_frame(self, annotations, num_frames, num_objects, size) -> dict[int, Annotation]:
        if not annotations:
            raise ValueError("no annotation given: at least the first frame's mask is needed")
        by_frame: dict[int, Annotation] = {}
        for ann in annotations:
            if not 0 <= ann.frame < num_frames:
                raise ValueError(f"annotation at frame {ann.frame} is outside the video "
                                 f"(0..{num_frames - 1})")
            if tuple(ann.mask.shape) != tuple(size):
                raise ValueError(f"annotation at frame {ann.frame} has size {tuple(ann.mask.shape)}, "
                                 f"the frames {tuple(size)}")
            ids = ann.object_ids()
            if any(not 1 <= i <= num_objects for i in ids) or int(ann.mask.max()) > num_objects:
                raise ValueError(f"annotation at frame {ann.frame} has object ids outside 1..{num_objects}")
            if ann.frame in by_frame:
                raise ValueError(f"two annotations for frame {ann.frame}")
            by_frame[ann.frame] = ann
        return by_frame

    def _apply_annotation(self, prob: torch.Tensor, annotation: Annotation, enabled: list[int]):
        """Merge a given mask into the frame's prediction (published YouTubeVOS rule):
        inside the annotated region the prediction is cleared, the annotated objects
        take their given masks, then all objects are re-aggregated."""
        mask = annotation.mask.to(self.device).long()
        one_hot = F.one_hot(mask, prob.shape[0]).permute(2, 0, 1).unsqueeze(1).float()
        one_hot, _ = pad_to_multiple(one_hot)          # (K+1, 1, nh, nw)
        ids = list(annotation.object_ids())
        prob = prob.clone()
        prob[:, :, one_hot[1:].sum(0)[0] > 0.5] = 0
        prob[ids] = one_hot[ids]
        prob = aggregate(prob[1:], keep_bg=True)
        new_objects = [i for i in ids if i not in enabled]
        return prob, new_objects

    def _memorise(self, groups, enabled, frame, key, f16, masks, temporary: bool) -> None:
        if not enabled:
            return  # nothing to remember before any object is annotated
        values = self._encode_values(frame, f16, masks)
        row = 0
        for group in groups:
            n = len(group.objects)
            group.bank.add(key, values[row:row + n], temporary=temporary)
            row += n

    @staticmethod
    def _to_label_map(prob: torch.Tensor, pads, output_size) -> np.ndarray:
        prob = unpad(prob, pads)                       # (K+1, 1, h, w)
        if tuple(prob.shape[-2:]) != tuple(output_size):
            prob = F.interpolate(prob, output_size, mode="bilinear", align_corners=False)
        return torch.argmax(prob[:, 0], dim=0).to(torch.uint8).cpu().numpy()
