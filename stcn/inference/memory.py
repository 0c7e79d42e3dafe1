"""The inference memory: keys and values of earlier frames, read by top-k attention.

One ``MemoryBank`` serves a group of objects that entered the video at the same frame
(all objects of a DAVIS video; each batch of newly appearing objects in YouTubeVOS).
All objects of a group see the same memory frames, so one affinity between the
memory keys and the query key serves every object of the group, as published.

Memory frames come in two kinds:
- permanent frames: the annotated frame(s) and every ``mem_every``-th frame;
- one temporary frame (the last segmented frame, when ``include_last`` is on): it is
  replaced by the next temporary frame and flushed whenever a frame is added.

The published memory grows without bound, so long videos run out of GPU memory.
``max_frames`` bounds the permanent frames: once exceeded, the oldest frame after the
first one is dropped. The first frame holds the ground-truth annotation and is never
dropped. The temporary frame does not count towards the bound.
"""

from __future__ import annotations

import torch

from stcn.model.memory_ops import get_affinity, readout, softmax_top_k


def _as_positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, [1,] h, w) -> (B, C, h*w)."""
    return x.flatten(start_dim=2)


class MemoryBank:
    """Memory keys (1, CK, N) and values (K, CV, N) of one group of K objects.

    ``add`` takes one frame's key (1, CK, [1,] h, w) and values (K, CV, [1,] h, w);
    ``read`` returns the memory readout (K, CV, h, w) for a query key (1, CK, h, w).
    """

    def __init__(self, top_k: int = 20, max_frames: int | None = None):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1 (or None for no bound), got {max_frames}")
        self.top_k = top_k
        self.max_frames = max_frames
        self._keys: torch.Tensor | None = None      # (1, CK, T*hw) permanent frames
        self._values: torch.Tensor | None = None    # (K, CV, T*hw)
        self._temp_key: torch.Tensor | None = None  # (1, CK, hw) or None
        self._temp_value: torch.Tensor | None = None
        self._frame_positions = 0                   # h*w of one memory frame

    @property
    def num_frames(self) -> int:
        """Permanent memory frames held (the temporary frame not counted)."""
        return 0 if self._keys is None else self._keys.shape[2] // self._frame_positions

    @property
    def has_temporary(self) -> bool:
        return self._temp_key is not None

    @property
    def num_objects(self) -> int:
        return 0 if self._values is None else self._values.shape[0]

    def add(self, key: torch.Tensor, value: torch.Tensor, temporary: bool = False) -> None:
        """Add one frame; any temporary frame is flushed first.

        The very first frame is always permanent (it carries the annotation).
        """
        key, value = _as_positions(key), _as_positions(value)
        if key.shape[0] != 1:
            raise ValueError(f"expected one frame's key with batch 1, got shape {tuple(key.shape)}")
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"key covers {key.shape[2]} positions but value {value.shape[2]}")
        self._temp_key = self._temp_value = None
        if self._keys is None:
            self._keys, self._values = key, value
            self._frame_positions = key.shape[2]
            return
        if key.shape[2] != self._frame_positions or value.shape[0] != self._values.shape[0]:
            raise ValueError(
                f"frame does not match the memory: key positions {key.shape[2]} vs "
                f"{self._frame_positions}, objects {value.shape[0]} vs {self._values.shape[0]}")
        if temporary:
            self._temp_key, self._temp_value = key, value
            return
        self._keys = torch.cat([self._keys, key], 2)
        self._values = torch.cat([self._values, value], 2)
        if self.max_frames is not None and self.num_frames > self.max_frames:
            self._drop_oldest_after_first()

    def _drop_oldest_after_first(self) -> None:
        hw = self._frame_positions
        self._keys = torch.cat([self._keys[:, :, :hw], self._keys[:, :, 2 * hw:]], 2)
        self._values = torch.cat([self._values[:, :, :hw], self._values[:, :, 2 * hw:]], 2)

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys (1, CK, N) and values (K, CV, N) a query attends to, temporary last."""
        if self._keys is None:
            raise RuntimeError("the memory is empty: add the annotated frame first")
        if self._temp_key is None:
            return self._keys, self._values
        return (torch.cat([self._keys, self._temp_key], 2),
                torch.cat([self._values, self._temp_value], 2))

    def read(self, query_key: torch.Tensor) -> torch.Tensor:
        """Top-k attention readout (K, CV, h, w) for a query key (1, CK, h, w)."""
        h, w = query_key.shape[-2:]
        keys, values = self.memory()
        affinity = get_affinity(keys, _as_positions(query_key))
        affinity = softmax_top_k(affinity, self.top_k, inplace=True)
        out = readout(affinity, values)                  # (K, CV, h*w)
        return out.view(values.shape[0], values.shape[1], h, w)
