"""Shard sets in object storage, against real servers on 127.0.0.1 (see s3_servers.py):
moto's S3 server (behind a fault-injecting proxy) and a plain Range-capable HTTP server.

Streaming equals local reading, batch for batch; transient faults are retried and counted,
permanent ones fail at once naming the URL; the node cache downloads each shard once and
stays within its limit; writes are atomic; credentials never show in messages."""

import os
import signal
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

import shards
from shards import storage
from shards.cache import ShardCache, parse_size
from shards.verify import verify_shard_set

from conftest import write_clip_set
from s3_servers import (
    range_http_server,
    storage_configured,
    storage_env,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD = 6, 4
KEY_ID, SECRET = "AKIDLEAKCHECK0001", "s3cr3t-never-shown-0001"


@pytest.fixture(autouse=True)
def no_faults(request):
    if "proxy" in request.fixturenames:
        request.getfixturevalue("proxy").inject(0)
    yield


def write_set(url: str) -> str:
    return write_clip_set(SHARDS * PER_SHARD, max_count=PER_SHARD, size=32, seed=0,
                          config={"kind": "synthetic"}, root=url)


@pytest.fixture(scope="module")
def sets(proxy, tmp_path_factory):
    local = write_set(str(tmp_path_factory.mktemp("local") / "set"))
    return local, write_set("s3://bkt/set")


def batches(url, **kw):
    kw = {"batch_size": 3, "seed": 5, **kw}
    loader = shards.make_loader(url, **kw)
    out = [(b["__key__"], b["frames"].numpy().copy()) for b in loader]
    return out, loader


def same(a, b) -> bool:
    return ([k for k, _ in a] == [k for k, _ in b]
            and all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b)))


def test_remote_set_streams_the_same_batches_as_local(sets, proxy):
    local, remote = sets
    want, _ = batches(local)
    before, heads = proxy.requests("GET", ".tar"), proxy.requests("HEAD", ".tar")
    got, loader = batches(remote)
    assert same(got, want) and len(got) == SHARDS * PER_SHARD // 3
    assert proxy.requests("GET", ".tar") - before == SHARDS  # each shard fetched once, whole
    assert proxy.requests("HEAD", ".tar") == heads  # the manifest has the sizes: GETs only
    assert loader.stats.downloads == SHARDS and loader.stats.retries == 0
    assert verify_shard_set(remote, progress=False).ok


def test_two_workers_with_prefetch_match_local(sets):
    local, remote = sets
    want, _ = batches(local, num_workers=2)
    got, _ = batches(remote, num_workers=2, prefetch=3)
    assert same(got, want)


@pytest.mark.parametrize("cache", ["none", "cold", "warm"])
def test_exact_and_elastic_resume_from_remote_match_local(sets, tmp_path, cache):
    local, remote = sets
    kw = {"batch_size": 2, "seed": 9}
    cache_kw = {} if cache == "none" else {"cache_dir": str(tmp_path / "cache"), "cache_limit": "1GB"}
    if cache == "warm":
        batches(remote, **kw, **cache_kw)
    # the uninterrupted local run of two ranks, then one rank alone (elastic) from batch 3 on
    whole = [batches(local, rank=r, world_size=2, **kw)[0] for r in range(2)]
    states = []
    for r in range(2):
        loader = shards.make_loader(remote, rank=r, world_size=2, **kw, **cache_kw)
        got = []
        for b in loader:
            got.append((b["__key__"], b["frames"].numpy().copy()))
            if len(got) == 3:
                states.append(loader.state_dict())
                break
        assert same(got, whole[r][:3])
        # exact resume of the same layout, from the remote set
        again = shards.make_loader(remote, rank=r, world_size=2, **kw, **cache_kw)
        again.load_state_dict(states[-1])
        assert same([(b["__key__"], b["frames"].numpy().copy()) for b in again], whole[r][3:])
    local_one = shards.make_loader(local, rank=0, world_size=1, **kw)
    local_one.load_state_dict(states[0])
    remote_one = shards.make_loader(remote, rank=0, world_size=1, **kw, **cache_kw)
    remote_one.load_state_dict(states[0])
    assert same([(b["__key__"], b["frames"].numpy().copy()) for b in remote_one],
                [(b["__key__"], b["frames"].numpy().copy()) for b in local_one])


def test_transient_faults_are_retried_counted_and_change_nothing(sets, proxy):
    local, remote = sets
    want, _ = batches(local)
    proxy.inject(3, match=lambda method, path: ".tar" in path)  # 503, 500, reset, cut in turn
    got, loader = batches(remote)
    assert same(got, want)
    faults = proxy.faults()
    assert faults >= 2 and loader.stats.retries >= 2
    assert {kind for *_, kind in proxy.log if kind.startswith("fault")} >= {"fault-503", "fault-500"}


def test_a_body_cut_short_and_a_reset_are_retried_when_streaming(proxy):
    data = os.urandom(3 << 20)
    storage.write_bytes_atomic("s3://bkt/blob.bin", data)
    proxy.inject(2, kinds=("cut", "reset"), match=lambda method, path: method == "GET")
    before = storage.retry_count()
    with storage.open_read("s3://bkt/blob.bin", block_size=1 << 20) as f:
        assert f.read() == data
    assert storage.read_bytes("s3://bkt/blob.bin") == data
    assert storage.retry_count() - before >= 2
    assert {"fault-cut", "fault-reset"} <= {kind for *_, kind in proxy.log}


def test_permanent_errors_fail_at_once_naming_the_url(proxy):
    storage.write_bytes_atomic("s3://bkt/there.bin", b"x")
    def requests_for(path, since):
        return [entry for entry in proxy.log[since:] if entry[1].split("?")[0] == path]

    before = len(proxy.log)
    with pytest.raises(FileNotFoundError, match="s3://bkt/missing.bin: not found"):
        storage.read_bytes("s3://bkt/missing.bin")
    assert len(requests_for("/bkt/missing.bin", before)) == 1  # no retry of a 404
    proxy.inject(1, kinds=("403",))
    before = len(proxy.log)
    with pytest.raises(PermissionError, match="s3://bkt/there.bin: access denied"):
        storage.read_bytes("s3://bkt/there.bin")
    assert len(requests_for("/bkt/there.bin", before)) == 1
    proxy.inject(1, kinds=("503",))  # throttled for ever: bounded, then a clear error
    with pytest.raises(storage.StorageError, match=r"s3://bkt/there.bin: GET failed after 8 tries"):
        storage.read_bytes("s3://bkt/there.bin")


def test_a_bad_checksum_is_refetched_then_reported(sets, proxy, tmp_path):
    _, remote = sets
    bad = "s3://bkt/badset"
    manifest = shards.read_manifest(remote)
    for info in manifest.shards:
        data = storage.read_bytes(f"{remote}/{info.name}")
        if info.name == "shard-000001.tar":
            middle = len(data) // 2  # flip bytes inside a sample: same size, other bytes
            data = data[:middle] + bytes(x ^ 0xFF for x in data[middle:middle + 64]) + data[middle + 64:]
        storage.write_bytes_atomic(f"{bad}/{info.name}", data)
    shards.write_manifest(bad, manifest)
    before = proxy.requests("GET", "badset/shard-000001.tar")
    with pytest.raises(storage.ChecksumError, match="s3://bkt/badset/shard-000001.tar: sha256"):
        storage.read_verified(f"{bad}/shard-000001.tar", manifest.shards[1].bytes,
                              manifest.shards[1].sha256)
    assert proxy.requests("GET", "badset/shard-000001.tar") - before == storage.retry_policy().attempts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, loader = batches(bad, max_bad_fraction=0.5)
    assert loader.stats.bad_shards == 1
    assert any("badset/shard-000001.tar" in str(w.message) for w in caught)


def test_http_server_streams_a_set_read_only(sets):
    local, _ = sets
    want, _ = batches(local)
    with range_http_server(str(Path(local).parent)) as url:
        got, loader = batches(f"{url}/set", prefetch=1)
        assert same(got, want) and loader.stats.downloads == SHARDS
        with storage.open_read(f"{url}/set/shard-000002.tar", block_size=4096) as f:
            assert f.read() == Path(local, "shard-000002.tar").read_bytes()
        with pytest.raises(FileNotFoundError, match=f"{url}/set/nothing.tar: not found"):
            storage.read_bytes(f"{url}/set/nothing.tar")


def test_cache_downloads_each_shard_once_per_node(sets, proxy, tmp_path):
    local, remote = sets
    want, _ = batches(local)
    cache = {"cache_dir": str(tmp_path / "cache"), "cache_limit": "1GB"}
    before = proxy.requests("GET", ".tar")
    loader = shards.make_loader(remote, batch_size=3, seed=5, **cache)
    first = [(b["__key__"], b["frames"].numpy().copy()) for b in loader]
    assert proxy.requests("GET", ".tar") - before == SHARDS
    second = [(b["__key__"], b["frames"].numpy().copy()) for b in loader]  # epoch 2
    assert proxy.requests("GET", ".tar") - before == SHARDS, "epoch 2 must read the cache"
    assert loader.stats.cache_hits == SHARDS and loader.stats.downloads == SHARDS
    assert same(first, want) and not same(second, first)  # a new epoch: another order
    # another rank of the node, two workers: everything from the cache
    got, other = batches(remote, rank=1, world_size=2, num_workers=2, **cache)
    assert proxy.requests("GET", ".tar") - before == SHARDS and other.stats.downloads == 0


def test_cache_smaller_than_the_set_gives_identical_batches(sets, proxy, tmp_path):
    local, remote = sets
    sizes = [s.bytes for s in shards.read_manifest(remote).shards]
    limit = int(2.5 * max(sizes))
    want = [batches(local, batch_size=2)[0] for _ in range(1)][0]
    before = proxy.requests("GET", ".tar")
    loader = shards.make_loader(remote, batch_size=2, seed=5, cache_dir=str(tmp_path / "c"),
                                cache_limit=limit, prefetch=1)
    got = [(b["__key__"], b["frames"].numpy().copy()) for b in loader]
    list(loader)  # a second epoch: evicted shards come back
    assert same(got, want)
    assert proxy.requests("GET", ".tar") - before > SHARDS  # evictions happened
    assert ShardCache(str(tmp_path / "c"), limit).usage() <= limit


def test_eviction_never_removes_a_shard_being_read(sets, tmp_path):
    _, remote = sets
    infos = shards.read_manifest(remote).shards
    cache = ShardCache(str(tmp_path / "c"), limit_bytes=infos[0].bytes + 1)
    held = cache.open(f"{remote}/{infos[0].name}", infos[0])
    cache.open(f"{remote}/{infos[1].name}", infos[1]).close()  # over the limit: 0 is busy
    assert os.path.exists(cache.path(infos[0])) and os.path.exists(cache.path(infos[1]))
    held.close()
    cache.open(f"{remote}/{infos[2].name}", infos[2]).close()
    # released: the least recently used go until the newest alone fits
    assert [os.path.exists(cache.path(i)) for i in infos[:3]] == [False, False, True]
    assert parse_size("20GB") == 20 * 10**9 and parse_size("1.5GiB") == 3 * 2**29
    with pytest.raises(ValueError, match="cache limit 'lots'"):
        parse_size("lots")


def test_a_killed_multipart_upload_leaves_no_object(proxy, tmp_path):
    """The writer dies while its upload is in flight: nothing appears under the name."""
    import threading

    release = threading.Event()
    proxy.hang = (lambda method, path: "partNumber=" in path, release)
    script = ("import os; from shards import storage; "
              "storage.write_bytes_atomic('s3://bkt/big/shard-000000.tar', os.urandom(12 << 20))")
    env = dict(os.environ, PYTHONPATH=str(REPO), **storage_env(proxy.url, multipart_chunksize=5 << 20))
    writer = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        assert wait_for(lambda: any(o == "hang" for *_, o in proxy.log), 60), "no multipart upload seen"
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    finally:
        release.set()
        proxy.hang = None
    assert not storage.exists("s3://bkt/big/shard-000000.tar")
    assert storage.listdir("s3://bkt/big") == []
    # the same write, uninterrupted: one object, complete
    data = os.urandom(11 << 20)
    storage.write_bytes_atomic("s3://bkt/big/shard-000001.tar", data)
    assert storage.read_bytes("s3://bkt/big/shard-000001.tar") == data


def test_bl30k_archives_stream_from_s3(proxy, tmp_path):
    from pipelines.sources import iter_archive_videos, list_archives

    path = tmp_path / "BL30K_a.tar"
    with tarfile.open(path, "w") as tar:
        for video in ("v1", "v2"):
            for f in range(3):
                for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
                    data = f"{video}{f}{ext}".encode() * 100
                    info = tarfile.TarInfo(f"BL30K/{kind}/{video}/{f:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
    storage.write_bytes_atomic("s3://bkt/bl30k/BL30K_a.tar", path.read_bytes())
    assert list_archives("s3://bkt/bl30k") == ["s3://bkt/bl30k/BL30K_a.tar"]
    proxy.inject(2, kinds=("reset", "503"))
    remote = [(v.name, v.frames, frames) for v, frames in iter_archive_videos("s3://bkt/bl30k/BL30K_a.tar")]
    local = [(v.name, v.frames, frames) for v, frames in iter_archive_videos(str(path))]
    assert remote == local and len(remote) == 2


def test_credentials_never_appear_in_errors(proxy):
    with storage_configured(proxy.url, key=KEY_ID, secret=SECRET):
        url = f"http://{KEY_ID}:{SECRET}@example.invalid/x"
        assert KEY_ID not in storage.redact(url) and SECRET not in storage.redact(f"a {SECRET} b")
        messages = []
        for kinds in (("403",), ("503",)):
            proxy.inject(1, kinds=kinds)
            with pytest.raises(OSError) as caught:
                storage.read_bytes("s3://bkt/set/manifest.json")
            messages.append(str(caught.value))
        proxy.inject(0)
        with pytest.raises(FileNotFoundError) as caught:
            storage.read_bytes("s3://bkt/none")
        messages.append(str(caught.value))
        with pytest.raises(ValueError) as caught:
            storage.parse_options('{"secret": "' + SECRET + '", oops}')
        messages.append(str(caught.value))
    assert len(messages) == 4 and all("s3://" in m for m in messages[:3])
    for m in messages:
        assert KEY_ID not in m and SECRET not in m


def test_bench_loader_compares_remote_with_local(sets):
    from shards.bench import format_remote_results, run_remote_benchmark

    _, remote = sets
    results = run_remote_benchmark(remote, batch_size=3, workers=0, repeats=1)
    assert results["local"] > 0
    for name in ("remote_prefetch", "remote_cold_cache", "remote_warm_cache"):
        assert results[f"ratio_{name}"] == pytest.approx(results[name] / results["local"])
        assert results[name] > 0
    text = format_remote_results(results)
    assert "remote warm cache" in text and "remote/local" in text and "s3://bkt/set" in text


def test_only_shards_talks_to_fsspec():
    """One storage seam: no module outside shards/ imports fsspec."""
    name = "fs" + "spec"  # (spelled apart: this file is searched too)
    offenders = []
    for top in ("pipelines", "stcn", "tools", "tests", "jobs"):
        for path in (REPO / top).rglob("*"):
            if path.is_file() and (path.suffix == ".py" or top == "tools"):
                text = path.read_text(errors="replace")
                if f"import {name}" in text or f"from {name}" in text:
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_access_denied_stops_the_loader_instead_of_counting_bad_data(sets, proxy):
    _, remote = sets
    proxy.inject(1, kinds=("403",), match=lambda method, path: ".tar" in path)
    with pytest.raises(PermissionError, match=r"s3://bkt/set/shard-\d+\.tar: access denied"):
        list(shards.make_loader(remote, batch_size=3, max_bad_fraction=1.0))


def test_endpoint_from_the_aws_environment_or_options_with_path_style(sets, proxy, monkeypatch):
    _, remote = sets
    want = storage.read_bytes(f"{remote}/manifest.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the standard variable, no options
    monkeypatch.setenv(storage.ENV_OPTIONS, "{}")
    storage.configure()
    try:
        assert storage.read_bytes(f"{remote}/manifest.json") == want
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        storage.configure({"endpoint_url": proxy.url, "path_style": True})
        before = proxy.requests("GET", "/bkt/set/manifest.json")
        assert storage.read_bytes(f"{remote}/manifest.json") == want
        assert proxy.requests("GET", "/bkt/set/manifest.json") == before + 1  # path-style URL
    finally:
        monkeypatch.undo()
        storage.configure()


def test_concurrent_readers_of_a_cold_cache_download_once(sets, proxy, tmp_path):
    """Four readers (as ranks/workers would) ask for one shard at once: one GET."""
    import threading

    _, remote = sets
    info = shards.read_manifest(remote).shards[3]
    url = f"{remote}/{info.name}"
    before = proxy.requests("GET", info.name)
    got, start = [], threading.Barrier(4)

    def reader():
        start.wait()
        shard = ShardCache(str(tmp_path / "c"), 10**9).open(url, info)  # own instance, own fds
        got.append((shard.hit, shard.file.read()))
        shard.close()

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert proxy.requests("GET", info.name) - before == 1
    assert sorted(hit for hit, _ in got) == [False, True, True, True]
    assert len({data for _, data in got}) == 1 and len(got[0][1]) == info.bytes


def test_a_timeout_is_retried(sets, proxy):
    _, remote = sets
    info = shards.read_manifest(remote).shards[0]
    with storage_configured(proxy.url, config_kwargs={"read_timeout": 1}):
        proxy.inject(2, kinds=("slow",), match=lambda method, path: method == "GET" and info.name in path)
        proxy._count = 1  # so the very next GET of the shard answers after 3 s: it times out
        before = storage.retry_count()
        data = storage.read_verified(f"{remote}/{info.name}", info.bytes, info.sha256)
    assert len(data) == info.bytes and storage.retry_count() > before
    assert any(kind == "fault-slow" for *_, kind in proxy.log)
