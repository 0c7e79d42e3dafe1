"""Optional FFCV backend: the samples of a shard set as one .beton file, read through
FFCV's loader into the same batch format as `make_loader`.

Fields: "frames" is an FFCV RGB image field holding our frame strip JPEG bytes unchanged
(no second lossy encode; FFCV decodes it with its compiled libjpeg-turbo pipeline);
"masks" a raw uint8 (T, H, W) array field (FFCV has no compressed array field, so masks
take T*H*W bytes per clip here against a few KB in the tar); "info" the key and meta as
an FFCV JSON field. The .beton is a local file (FFCV memory-maps it).

FFCV's loader has no resumable state: this backend is for comparison and for users who
want FFCV's page-cache-friendly reads; exact and elastic resumption is the tar loader's.
"""
from __future__ import annotations

import json
import os
import types
from typing import Iterator

import numpy as np
import torch

from . import codec, storage
from .manifest import read_manifest
from .reader import iter_shard


def _require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise ImportError("the FFCV backend needs the ffcv package "
                          "(pip install -e '.[ffcv]'; it compiles against libturbojpeg and "
                          f"OpenCV development packages): {err}") from None


def _store_jpeg_bytes(self, destination, item, malloc):
    """RGBImageField.encode for an already encoded JPEG: item = (jpeg bytes, height, width).
    Bound to a plain RGBImageField instance so the .beton records FFCV's own image type."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    jpeg, height, width = item
    destination["mode"] = IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = height, width
    destination["data_ptr"], storage_ = malloc(len(jpeg))
    storage_[:] = np.frombuffer(jpeg, np.uint8)


class _SetAsIndexed:
    """Indexable view of a shard set for FFCV's writer. FFCV asks for indices in order
    (one writer worker), so keeping the current shard's samples makes each shard read once."""

    def __init__(self, url_dir: str, verify: bool):
        self.url_dir, self.verify = url_dir, verify
        self.shards = read_manifest(url_dir).shards
        self.starts = np.cumsum([0] + [s.count for s in self.shards])
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        if self._cached is None or self._cached[0] != shard:
            info = self.shards[shard]
            members = list(iter_shard(storage.join(self.url_dir, info.name), info, self.verify))
            if len(members) != info.count:
                raise ValueError(f"shard {info.name}: {len(members)} samples, manifest says "
                                 f"{info.count}; run tools/verify_shards")
            self._cached = (shard, members)
        members = self._cached[1][index - self.starts[shard]]
        if codec.SOFT in members:  # refuse rather than drop them silently
            raise ValueError(f"shard {self.shards[shard].name}: sample {members['__key__']} has "
                             "soft masks (static clips), which the FFCV backend does not store; "
                             "train static sets from the tar shards")
        masks = codec.decode_masks(members[codec.MASKS])
        t, h, w = masks.shape
        info = {"__key__": members["__key__"], "meta": json.loads(members[codec.META])}
        return (members[codec.FRAMES], t * h, w), masks, info


def convert_to_beton(url_dir: str, out_path: str, verify: bool = True) -> int:
    """Write every sample of the shard set (manifest order) to the local .beton `out_path`
    (atomically: a temporary name, then a rename). Returns the sample count."""
    _require_ffcv()
    from ffcv.fields import JSONField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = _SetAsIndexed(url_dir, verify)
    if len(dataset) == 0:
        raise ValueError(f"{url_dir}: empty shard set")
    mask_shape = dataset[0][1].shape
    frames = RGBImageField(write_mode="jpg")
    frames.encode = types.MethodType(_store_jpeg_bytes, frames)
    fields = {"frames": frames, "masks": NDArrayField(np.dtype("uint8"), mask_shape),
              "info": JSONField()}
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        DatasetWriter(tmp, fields, num_workers=1).from_indexed_dataset(dataset, chunksize=64)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(dataset)


class BetonLoader:
    """FFCV's loader over a .beton from `convert_to_beton`, yielding the tar loader's batch
    format: frames uint8 (B, T, H, W, 3), masks uint8 (B, T, H, W), meta, __key__."""

    def __init__(self, path: str, batch_size: int, num_workers: int = 1, seed: int = 0,
                 shuffle: bool = True, distributed: bool = False, drop_last: bool = True):
        _require_ffcv()
        from ffcv.fields import JSONField
        from ffcv.fields.decoders import BytesDecoder, NDArrayDecoder, SimpleRGBImageDecoder

        self._unpack_info = JSONField.unpack
        from ffcv.loader import Loader, OrderOption

        self.loader = Loader(
            path, batch_size=batch_size, num_workers=max(1, num_workers), seed=seed,
            order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL,
            distributed=distributed, drop_last=drop_last,
            pipelines={"frames": [SimpleRGBImageDecoder()], "masks": [NDArrayDecoder()],
                       "info": [BytesDecoder()]})

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for strips, masks, infos in self.loader:
            b, t, h, w = masks.shape
            # FFCV reuses its output buffers for later batches: copy out
            frames = torch.from_numpy(np.array(strips).reshape(b, t, h, w, 3))
            decoded = self._unpack_info(infos)
            yield {"frames": frames, "masks": torch.from_numpy(np.array(masks)),
                   "meta": [d["meta"] for d in decoded], "__key__": [d["__key__"] for d in decoded]}
