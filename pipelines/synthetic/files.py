"""Writing a synthetic data set to disk: byte-reproducible encoders and an all-or-nothing
output directory.

A data set is built in a hidden staging directory next to OUT and renamed into place only
once complete, so an interrupted run never leaves a tree that looks finished. Files carry
no timestamps (fixed JPEG quality, plain PNGs, tar members with mtime 0), so the same seed
gives byte-identical files.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

JPEG_QUALITY = 90
# Written at the root of every generated set: its parameters, and proof that OUT is ours
# (only such a directory is ever deleted by --overwrite).
MARKER = "SYNTHETIC.json"


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image encoded as a baseline JPEG of fixed quality."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {rgb.shape}")
    return encoded.tobytes()


def write_file(path: Path, data: bytes | str) -> None:
    """Write bytes (or UTF-8 text), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def write_lines(path: Path, lines: list[str]) -> None:
    write_file(path, "".join(line + "\n" for line in lines))


def write_json(path: Path, value) -> None:
    write_file(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_tar(path: Path, root: Path, members: list[Path]) -> None:
    """Pack files under `root` into an uncompressed tar at `path`, reproducibly.

    `members` are paths relative to `root`, in the order they go into the archive; each
    folder on the way is added as a directory entry before its first file, as `tar cf`
    would, so readers meet the same entry kinds as in a real archive.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    seen_dirs: set[Path] = set()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for member in members:
            for parent in reversed(member.parents[:-1]):
                if parent not in seen_dirs:
                    seen_dirs.add(parent)
                    archive.addfile(_tar_info(parent.as_posix() + "/", tarfile.DIRTYPE, 0))
            data = (root / member).read_bytes()
            archive.addfile(_tar_info(member.as_posix(), tarfile.REGTYPE, len(data)),
                            io.BytesIO(data))


def _tar_info(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it becomes `out`, on error it is removed.

    `out` may not exist yet or be an empty folder. A folder holding a previous synthetic
    set (it has MARKER) is replaced only with `overwrite`; anything else is refused.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise FileExistsError(
                    f"{out} is not empty and holds no {MARKER}: refusing to write a synthetic "
                    f"set into it; choose a new or empty folder")
            if not overwrite:
                raise FileExistsError(
                    f"{out} already holds a synthetic set; pass overwrite=True (--overwrite) "
                    f"to replace it, or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def _remove_stale_staging(out: Path) -> None:
    """Delete staging folders of `out` left by runs that were killed (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
