"""One of the project's modules run in a fresh Python process (`python -m MODULE REQUEST`):
how the benchmarks run the published reference code beside ours without its imports, global
seeds or stdout reaching this process. `LineChild` talks to it one line at a time: a request
line in, one JSON answer line out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]   # the folder holding shards/, pipelines/, stcn/


def module_env(**extra: str) -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, plus `extra` variables."""
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {**os.environ, "PYTHONPATH": path, **extra}


def module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class LineChild:
    """`python -m module json(request)` kept running; `ask(line)` sends one line and returns
    the child's one-line JSON answer. `what` names the child in errors."""

    def __init__(self, module: str, request: dict, what: str, **env: str):
        self.what = what
        self.process = subprocess.Popen(module_command(module, json.dumps(request)),
                                        env=module_env(**env), text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            code = self.process.wait()
            raise RuntimeError(f"{self.what}'s process failed (exit {code}; its error is "
                               "printed above)")
        return json.loads(answer)

    def close(self, timeout: float = 120) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=timeout)
