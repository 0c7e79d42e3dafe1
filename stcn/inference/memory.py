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

from stcn.model.memory_ops import key_terms, top_k_readout


def _as_positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, [1,] h, w) -> (B, C, h*w)."""
    return x.flatten(start_dim=2)


class _Frames:
    """One or more memory frames: keys (1, CK, n) as given, the affinity terms of
    ``key_terms``, and values position-major (n, K*CV) as the top-k readout gathers them."""

    def __init__(self, keys, scaled_keys, norms, values):
        self.keys, self.scaled_keys, self.norms, self.values = keys, scaled_keys, norms, values

    @classmethod
    def of(cls, key: torch.Tensor, value: torch.Tensor) -> "_Frames":
        """key (1, CK, hw), value (K, CV, hw): the terms are computed once, here."""
        return cls(key, *key_terms(key), value.permute(2, 0, 1).flatten(1))

    @staticmethod
    def cat(parts: list["_Frames"]) -> "_Frames":
        return _Frames(torch.cat([p.keys for p in parts], 2),
                       torch.cat([p.scaled_keys for p in parts], 2),
                       torch.cat([p.norms for p in parts], 1),
                       torch.cat([p.values for p in parts], 0))

    def positions(self, start: int, stop: int | None = None) -> "_Frames":
        return _Frames(self.keys[:, :, start:stop], self.scaled_keys[:, :, start:stop],
                       self.norms[:, start:stop], self.values[start:stop])


class MemoryBank:
    """Memory keys (1, CK, N) and values (K, CV, N) of one group of K objects.

    ``add`` takes one frame's key (1, CK, [1,] h, w) and values (K, CV, [1,] h, w);
    ``read`` returns the memory readout (K, CV, h, w) for a query key (1, CK, h, w).
    The key terms of the affinity are computed once per memory frame, not at every read,
    and the readout sums only the top-k values of each query (``top_k_readout``).
    """

    def __init__(self, top_k: int = 20, max_frames: int | None = None):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1 (or None for no bound), got {max_frames}")
        self.top_k = top_k
        self.max_frames = max_frames
        self._frames: _Frames | None = None         # permanent frames
        self._temp: _Frames | None = None           # the temporary frame, if any
        self._frame_positions = 0                   # h*w of one memory frame
        self._value_shape = (0, 0)                  # (K, CV)

    @property
    def num_frames(self) -> int:
        """Permanent memory frames held (the temporary frame not counted)."""
        return 0 if self._frames is None else self._frames.keys.shape[2] // self._frame_positions

    @property
    def has_temporary(self) -> bool:
        return self._temp is not None

    @property
    def num_objects(self) -> int:
        return self._value_shape[0]

    def add(self, key: torch.Tensor, value: torch.Tensor, temporary: bool = False) -> None:
        """Add one frame; any temporary frame is flushed first.

        The very first frame is always permanent (it carries the annotation).
        """
        key, value = _as_positions(key), _as_positions(value)
        if key.shape[0] != 1:
            raise ValueError(f"expected one frame's key with batch 1, got shape {tuple(key.shape)}")
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"key covers {key.shape[2]} positions but value {value.shape[2]}")
        self._temp = None
        if self._frames is None:
            self._frames = _Frames.of(key, value)
            self._frame_positions = key.shape[2]
            self._value_shape = tuple(value.shape[:2])
            return
        if key.shape[2] != self._frame_positions or value.shape[0] != self._value_shape[0]:
            raise ValueError(
                f"frame does not match the memory: key positions {key.shape[2]} vs "
                f"{self._frame_positions}, objects {value.shape[0]} vs {self._value_shape[0]}")
        if temporary:
            self._temp = _Frames.of(key, value)
            return
        self._frames = _Frames.cat([self._frames, _Frames.of(key, value)])
        if self.max_frames is not None and self.num_frames > self.max_frames:
            self._drop_oldest_after_first()

    def _drop_oldest_after_first(self) -> None:
        hw = self._frame_positions
        self._frames = _Frames.cat([self._frames.positions(0, hw), self._frames.positions(2 * hw)])

    def _all(self) -> _Frames:
        if self._frames is None:
            raise RuntimeError("the memory is empty: add the annotated frame first")
        return self._frames if self._temp is None else _Frames.cat([self._frames, self._temp])

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys (1, CK, N) and values (K, CV, N) a query attends to, temporary last."""
        frames = self._all()
        return frames.keys, frames.values.view(-1, *self._value_shape).permute(1, 2, 0)

    def read(self, query_key: torch.Tensor) -> torch.Tensor:
        """Top-k attention readout (K, CV, h, w) for a query key (1, CK, h, w), in
        channels-last memory order (as the readout comes; the decoder runs channels-last)."""
        h, w = query_key.shape[-2:]
        frames = self._all()
        k, cv = self._value_shape
        out = top_k_readout(frames.scaled_keys, frames.norms, _as_positions(query_key),
                            frames.values, self.top_k)                # (h*w, K*CV)
        out = out.view(h * w, k, cv).transpose(0, 1).contiguous()      # (K, h*w, CV)
        return out.view(k, h, w, cv).permute(0, 3, 1, 2)
