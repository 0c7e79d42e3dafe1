"""Shared test set-up: the environment, the one way to load a tool in-process, and the small
synthetic data that several test files build the same way.

Helpers are plain functions (`from conftest import load_tool`, as the tests import their other
siblings); fixtures are found by pytest. Nothing here imports torch at module level: some tests
check that the shard-writing side runs without it.
"""

import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest

# Keep the suite CPU-only and reproducible on the 2-core CI machine.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's CPU thread count in this process (the benchmarks do) leaves
    it as it found it: thread counts change float results, and bitwise tests compare runs."""
    torch = sys.modules.get("torch")  # never imported here: see the module docstring
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def proxy():
    """A moto S3 server on 127.0.0.1 behind a fault-injecting proxy, with bucket "bkt", and
    shards.storage pointed at it (the object-storage tests)."""
    from s3_servers import FaultProxy, make_bucket, moto_server, storage_configured

    with moto_server() as endpoint:
        proxy = FaultProxy(endpoint)
        with storage_configured(proxy.url):
            make_bucket("bkt")
            yield proxy
        proxy.close()


def load_tool(name: str):
    """The script tools/NAME as a module (its `__main__` block does not run), loaded the way
    its console command stcn-NAME loads it: through tools/__init__.py, the package that
    `pip install .` installs as stcn_tools. Call `load_tool(NAME).main` like click does."""
    if "stcn_tools" not in sys.modules:
        spec = importlib.util.spec_from_file_location("stcn_tools", TOOLS / "__init__.py")
        package = importlib.util.module_from_spec(spec)
        sys.modules["stcn_tools"] = package
        spec.loader.exec_module(package)
    return sys.modules["stcn_tools"].load(name)


def tool_path(name: str) -> str:
    """The script tools/NAME, for a launcher that runs it (torchrun, a shell script)."""
    return str(TOOLS / name)


def tool_command(name: str, *args) -> list[str]:
    """The command line that runs tools/NAME as its own process (for exit codes, signals and
    output as a user sees them): the one way the tests start a tool in a process."""
    return [sys.executable, tool_path(name), *map(str, args)]


def write_clip_set(n: int, *, max_count: int = 7, prefix: str = "v", size: int = 16,
                   n_objects: int = 2, seed: int | None = None, config: dict | None = None,
                   root: str | None = None) -> str:
    """A shard set of n synthetic clips named PREFIX-0000, PREFIX-0001, ... (seed: n unless
    given), max_count clips per shard, with its manifest; in memory:// unless root is given."""
    import numpy as np

    import shards
    from shards.sample_clips import make_clip

    root = root or f"memory://set-{uuid.uuid4().hex}"
    rng = np.random.default_rng(n if seed is None else seed)
    with shards.ShardWriter(root, max_count=max_count) as writer:
        for i in range(n):
            writer.write(make_clip(rng, f"{prefix}-{i:04d}", size=size, n_objects=n_objects))
    shards.write_manifest(root, shards.Manifest(shards=writer.infos, config=config or {}))
    return root


@pytest.fixture(scope="module")
def net():
    """A randomly initialised multi-object STCN (torch seed 0), in eval mode."""
    import torch

    from stcn.model.network import STCN

    torch.manual_seed(0)
    return STCN().eval()


TRAIN_SIZE = 32  # side of the clips write_train_set makes


def write_train_set(url: str, name: str, clips: int, seed: int, online=None, source="davis",
                    max_skip=5, n_objects: int | None = None, per_shard: int | None = None) -> str:
    """A trainer-ready shard set at url: clips synthetic TRAIN_SIZE clips named NAME000-0, ...
    (objects 1 + i % 3 unless n_objects is given; static ones carry soft masks) in shards of
    per_shard clips (default: two shards), shard-000000.tar, ..., its manifest recording the
    source kind, max skip and online steps the trainer checks."""
    import numpy as np

    import shards
    from shards.sample_clips import make_clip

    rng = np.random.default_rng(seed)
    samples = [make_clip(rng, f"{name}{i:03d}-0", size=TRAIN_SIZE,
                         n_objects=1 + i % 3 if n_objects is None else n_objects)
               for i in range(clips)]
    if source == "static":  # static clips carry soft masks (0.9 here) for the value encoder
        samples = [{**s, "soft": (s["masks"] == 1).astype(np.uint8) * 230} for s in samples]
    cuts = [*range(0, clips, per_shard), clips] if per_shard else [0, clips // 2, clips]
    infos = [shards.write_shard(f"{url}/shard-{k:06d}.tar", samples[a:b])
             for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    config = {"kind": "synthetic", "source": source, "max_skip": max_skip}
    if online is not None:
        config["online"] = online
    shards.write_manifest(url, shards.Manifest(shards=infos, config=config))
    return url
