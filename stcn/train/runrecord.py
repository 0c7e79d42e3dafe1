"""What a run directory records about its run.

- `config.yaml`: every resolved option (defaults included), the stage as trained, the
  project version and git commit, the torch version and the world size. Written when the
  run starts (after the pre-flight passed), again on every restart.
- `summary.json`: how far the run got and why it ended (`TrainResult.status`), the final
  loss and IoU, wall time, clips/s, the data-wait share and the checkpoints. Written when
  the run ends for any reason the trainer returns from (completed, preempted, stopped,
  interrupted, diverged).
- `rank<N>.log`: each rank's console output (batch jobs have no terminal to keep it);
  progress-bar redraws are reduced to their last state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from shards.storage import redact_argv, write_bytes_atomic

PACKAGE = "stcn-shards"


def project_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict[str, Any] | None:
    """HEAD of the checkout this code runs from (None when it is not a git checkout)."""
    checkout = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        # An installed copy inside some other repository must not report that one's commit.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != checkout:
            return None
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def resolved_config(stage: Any, options: Any, world_size: int, **extra: Any) -> dict[str, Any]:
    """The run's record: options and stage as resolved, with the software that ran them."""
    import torch

    return {
        "stcn_version": project_version(),
        "git": git_commit(),
        "torch_version": str(torch.__version__),
        "python_version": sys.version.split()[0],
        "world_size": world_size,
        "command": redact_argv(sys.argv),  # credentials masked
        **_plain(extra),
        "options": _plain(dataclasses.asdict(options)),
        "stage": _plain(stage.to_dict()),
    }


def write_config(run_dir: str | Path, config: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / "config.yaml"
    write_bytes_atomic(str(path), yaml.safe_dump(dict(config), sort_keys=False).encode())
    return path


def write_summary(run_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    record = {**summary, "written": _now()}
    write_bytes_atomic(str(path), (json.dumps(record, indent=2) + "\n").encode())
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, Path)):
        return str(value)  # also str subclasses (torch's version string) YAML cannot write
    return value


class _Tee:
    """A text stream that also writes complete lines to a log file; a carriage return
    (a progress bar redrawing its line) drops the pending line, so the log keeps the last
    state only."""

    def __init__(self, stream: Any, log: Any):
        self._stream = stream
        self._log = log
        self._line = ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        pending = self._line + text
        *lines, self._line = pending.split("\n")
        for line in lines:
            self._log.write(line.rpartition("\r")[2] + "\n")
        self._line = self._line.rpartition("\r")[2] if "\r" in self._line else self._line
        self._log.flush()
        return written

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def close_log(self) -> None:
        if self._line:
            self._log.write(self._line + "\n")
            self._line = ""
        self._log.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the console
        return getattr(self._stream, name)


@contextlib.contextmanager
def rank_log(run_dir: str | Path, rank: int, enabled: bool = True) -> Iterator[Path | None]:
    """Copy this process's stdout and stderr into run_dir/rank<rank>.log (appending: a
    requeued job keeps its earlier attempts' lines)."""
    if not enabled:
        yield None
        return
    path = Path(run_dir) / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as log:
        log.write(f"--- {_now()} rank {rank}: {' '.join(redact_argv(sys.argv))}\n")
        out, err = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        previous = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            yield path
        except BaseException:
            # The console shows the traceback later (from the caller); the log needs it too.
            log.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = previous
            out.close_log()
            err.close_log()


__all__ = ["resolved_config", "write_config", "write_summary", "rank_log", "git_commit", "project_version"]
