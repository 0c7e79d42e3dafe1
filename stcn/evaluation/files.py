"""Reading frames and masks, writing indexed PNGs and JSON, all with clear errors.

Masks are label maps: indexed ("P") PNGs whose pixel values are object ids (DAVIS 2017,
YouTubeVOS), or 8-bit grayscale 0/255 PNGs (DAVIS 2016). Predictions are written as
indexed PNGs with the palette of the source annotations, or the DAVIS palette when the
source has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shards.images import davis_palette
from shards.storage import write_bytes_atomic

from stcn.model.inputs import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """Bad evaluation input; the message names the file and what was expected."""


def list_images(folder: Path) -> list[Path]:
    """The image files of one video, sorted by name; an empty folder is an error."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: video folder not found")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{folder}: empty video folder, "
                           f"expected frame images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def read_frame(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3), decoded by PIL as the published code does."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read as an image ({err})") from err


def read_mask(path: Path) -> tuple[np.ndarray, bytes | None]:
    """Label map uint8 (H, W) and the file's palette (None for grayscale masks)."""
    try:
        with Image.open(path) as image:
            if image.mode == "P":
                return np.asarray(image), bytes(image.getpalette() or davis_palette())
            if image.mode in ("L", "1"):
                return np.asarray(image.convert("L")), None
            raise DatasetError(f"{path}: mask has mode {image.mode}, expected an indexed (P) "
                               "or grayscale (L) PNG holding object ids")
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read as a mask ({err})") from err


def write_mask(path: Path, labels: np.ndarray, palette: bytes | None) -> None:
    """An indexed PNG of a uint8 label map with ``palette`` (DAVIS palette if None)."""
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))  # mode L
    image.putpalette(palette or davis_palette())
    image.save(path, format="PNG")


def normalise_frames(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB frames -> float (T, 3, H, W), scaled to [0, 1] then ImageNet-normalised."""
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of normalised frames (T, 3, H, W); no antialiasing, as published."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size, mode="bicubic", align_corners=False)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (H, W)."""
    if labels.shape == tuple(size):
        return labels
    x = torch.from_numpy(np.ascontiguousarray(labels)).float()[None, None]
    return F.interpolate(x, size, mode="nearest")[0, 0].to(torch.uint8).numpy()


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see the old file or the complete new one."""
    write_bytes_atomic(str(path), (json.dumps(payload, indent=2) + "\n").encode())
