"""The storage seam: every byte of shards, manifests, part records and source archives is
read and written here (the only module of the project that imports fsspec).

URLs: local paths, file://, s3:// (AWS or any S3-compatible store), gs://, http(s)://
(read only: a public bucket's web endpoint or any server honouring Range requests) and
memory:// (tests).

Remote requests are retried: connection resets, timeouts, HTTP 5xx, throttling (503
SlowDown, 429) and bodies cut short are tried again with exponential backoff and full
jitter, up to `RetryPolicy.attempts` tries; 403/404 and other permanent errors fail at once
with an error naming the URL (never a credential). `retry_count()` counts the retries of
this process (the loader reports them). The clients' own retry loops are turned off, so
this is the one policy.

Writes are atomic: locally a hidden temporary file renamed into place; on object stores a
single PUT, or (large objects) a multipart upload that the store completes only after its
last part, so a killed writer never leaves a partial object under the target name.

Options (credentials, endpoints, retry policy) come from `configure(...)` (tools:
`--storage-options JSON`) or the `STCN_STORAGE_OPTIONS` environment variable (same JSON),
on top of the standard AWS chain (AWS_ACCESS_KEY_ID/..., AWS_PROFILE, AWS_ENDPOINT_URL,
~/.aws). See README, "Shards in object storage".
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

ENV_OPTIONS = "STCN_STORAGE_OPTIONS"

# storage option keys handled here, not passed to fsspec
_POLICY_KEYS = {"retries": "attempts", "retry_base_delay": "base_delay",
                "retry_max_delay": "max_delay"}
# objects of at least twice this size are uploaded in parts of this size (S3 minimum 5 MiB)
MULTIPART_CHUNKSIZE = 50 << 20
# option keys and environment variables whose values must never be shown
_SECRET_KEYS = {"key", "secret", "token", "password", "username", "session_token",
                "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_PROTOCOLS = ("s3", "gs", "gcs", "http", "https", "az", "abfs", "memory")


class StorageError(OSError):
    """A storage request failed for good (transient errors past the retry bound, or a
    permanent error); the message names the URL and never holds a credential."""


class ChecksumError(StorageError):
    """An object's bytes did not match the expected size/sha256, on every try."""


class _ShortBody(OSError):
    """Fewer bytes arrived than the object holds (a body cut short): retried."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8          # tries per request, the first included
    base_delay: float = 0.25   # seconds; the n-th retry waits U(0, base * 2**n), capped
    max_delay: float = 20.0

    def delay(self, retry: int) -> float:
        return _jitter().uniform(0.0, min(self.max_delay, self.base_delay * 2 ** retry))


_JITTER: dict = {}


def _jitter() -> random.Random:
    """A private generator per process (forked workers must not wait in lockstep; retries
    must never draw from the training's seeded RNGs)."""
    pid = os.getpid()
    if pid not in _JITTER:
        _JITTER.clear()
        _JITTER[pid] = random.Random(int.from_bytes(os.urandom(8), "little"))
    return _JITTER[pid]
_LOCK = threading.Lock()
_RETRIES = 0
_STATE: dict = {"options": None, "policy": None}


# ----------------------------------------------------------------------------- options

def parse_options(text_or_dict) -> dict:
    """`--storage-options` JSON (or a dict) -> {protocol: options}. Top-level keys apply to
    s3 (the object store); a protocol name ("s3", "gs", "http", ...) holding an object
    applies to that protocol. Friendly S3 keys: endpoint_url, path_style (bool), region;
    retries, retry_base_delay, retry_max_delay set the retry policy, multipart_chunksize
    the upload part size; anything else is passed to fsspec (e.g. key, secret, anon)."""
    if text_or_dict is None or text_or_dict == "":
        return {}
    raw = text_or_dict
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"storage options are not valid JSON ({err.msg} at character "
                             f"{err.pos}); expected e.g. "
                             '\'{"endpoint_url": "http://host:9000", "path_style": true}\'') \
                from None
    if not isinstance(raw, dict):
        raise ValueError("storage options must be a JSON object")
    out: dict[str, dict] = {}
    for key, value in raw.items():
        if key in _PROTOCOLS and isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out.setdefault("s3", {})[key] = value
    return out


def configure(options=None) -> None:
    """Set the storage options of this process and of the processes it starts (exported
    as STCN_STORAGE_OPTIONS, so DataLoader workers and subprocesses see them too).
    None re-reads the environment."""
    if options is not None:
        parsed = parse_options(options)
        os.environ[ENV_OPTIONS] = json.dumps(parsed)
    _STATE["options"] = _STATE["policy"] = None


def _options() -> dict:
    if _STATE["options"] is None:
        _STATE["options"] = parse_options(os.environ.get(ENV_OPTIONS))
    return _STATE["options"]


def retry_policy() -> RetryPolicy:
    if _STATE["policy"] is None:
        policy = RetryPolicy()
        for options in _options().values():
            for key, field_name in _POLICY_KEYS.items():
                if key in options:
                    policy = replace(policy, **{field_name: type(getattr(policy, field_name))(
                        options[key])})
        if policy.attempts < 1:
            raise ValueError("storage option retries must be at least 1")
        _STATE["policy"] = policy
    return _STATE["policy"]


def _fsspec_options(protocol: str) -> dict:
    options = {k: v for k, v in _options().get(protocol, {}).items()
               if k not in _POLICY_KEYS and k != "multipart_chunksize"}
    if protocol in ("s3", "s3a"):
        client = dict(options.pop("client_kwargs", {}))
        config = dict(options.pop("config_kwargs", {}))
        if "region" in options:
            client["region_name"] = options.pop("region")
        if options.pop("path_style", False):
            config["s3"] = {**config.get("s3", {}), "addressing_style": "path"}
        # one retry policy (ours, counted): botocore's own retries off
        config.setdefault("retries", {"total_max_attempts": 1})
        # other processes write the same prefixes (tasks, ranks): never trust a listing
        options.setdefault("use_listings_cache", False)
        if "profile" not in options and "session" not in options:
            options["session"] = _s3_session()
        options["client_kwargs"], options["config_kwargs"] = client, config
    return options


_SESSION: list = []


def _s3_session():
    """One botocore session per process tree: a loader worker forked from the process that
    already made a client starts with the service models parsed (about half a second less
    per worker, and a new set of workers starts every epoch)."""
    if not _SESSION:
        from aiobotocore.session import AioSession

        _SESSION.append(AioSession())
    return _SESSION[0]


def _secrets() -> list[str]:
    values = [os.environ.get(name) for name in _SECRET_ENV]

    def collect(options: dict) -> None:  # nested too: client_kwargs may carry keys
        for k, v in options.items():
            if isinstance(v, dict):
                collect(v)
            elif k.lower() in _SECRET_KEYS:
                values.append(str(v))

    collect(_options())
    return [v for v in values if v and len(v) >= 8]  # shorter ones would mask common words


_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


def redact(text) -> str:
    """`text` without credentials: known secret values and URL user:password parts."""
    text = _USERINFO.sub(r"\1***@", str(text))
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def redact_argv(argv) -> list[str]:
    """A command line fit for logs and run records: credentials masked, including the
    secret keys of a --storage-options JSON that was never configured."""
    out, previous = [], ""
    for arg in argv:
        name, eq, value = arg.partition("=")
        if previous == "--storage-options" or (eq and name == "--storage-options"):
            text = value if eq else arg
            try:
                parsed = json.loads(text)
                text = json.dumps(_mask(parsed)) if isinstance(parsed, dict) else "***"
            except ValueError:
                text = "***"
            arg = f"{name}={text}" if eq else text
        out.append(redact(arg))
        previous = arg
    return out


def _mask(options: dict) -> dict:
    return {k: (_mask(v) if isinstance(v, dict) else "***" if k.lower() in _SECRET_KEYS else v)
            for k, v in options.items()}


# ----------------------------------------------------------------------------- URLs

def join(url_dir: str, name: str) -> str:
    """`url_dir/name` for any URL (no doubled slash, protocol kept)."""
    return url_dir.rstrip("/") + "/" + name.lstrip("/")


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def is_remote(url: str) -> bool:
    """Over a network (retried, prefetched, cacheable); memory:// counts as local."""
    return protocol(url) not in ("file", "local", "memory")


def _direct(fs) -> bool:
    """Requests that cannot fail transiently (local disk, memory): never retried."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return isinstance(fs, LocalFileSystem) or "memory" in protocols


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL, with this process's options."""
    fs, path = url_to_fs(url, **_fsspec_options(protocol(url)))
    if hasattr(fs, "retries") and not isinstance(fs, LocalFileSystem):
        fs.retries = 1  # s3fs's own loop: off, ours counts (see module doc)
    return fs, path


def _full_url(fs, path: str, like: str) -> str:
    """A listed `path` of `fs` as a URL of the same kind as `like`."""
    if is_local(like):
        return path
    prefix = like.split("://", 1)[0]
    if "://" in path:
        return path
    return f"{prefix}://{path if prefix == 'memory' else path.lstrip('/')}"


# ----------------------------------------------------------------------------- retries

def retry_count() -> int:
    """Retries made by this process so far (all threads)."""
    return _RETRIES


def _count_retry() -> None:
    global _RETRIES
    with _LOCK:
        _RETRIES += 1


_TRANSIENT_TYPES = {
    # aiohttp
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
    "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError",
    "ClientConnectorError", "ContentLengthError", "TransferEncodingError",
    # botocore / urllib3 / http.client
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError",
    "IncompleteRead", "ProtocolError", "ResponseParserError", "RemoteDisconnected",
    # fsspec
    "FSTimeoutError",
}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
                    "TooManyRequests", "BadDigest", "XAmzContentSHA256Mismatch"}


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen and len(seen) < 16:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def classify(err: BaseException) -> str:
    """'transient' (retry), 'missing' (404), 'denied' (401/403), 'credentials' or 'other'."""
    for e in _chain(err):
        name = type(e).__name__
        if isinstance(e, FileNotFoundError):
            return "missing"
        if isinstance(e, PermissionError):
            return "denied"
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return "credentials"
        status, code = getattr(e, "status", None), None
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", status)
        if isinstance(status, int):
            if status == 404:
                return "missing"
            if status in (401, 403):
                return "denied"
            if status >= 500 or status in (408, 429):
                return "transient"
        if code in _TRANSIENT_CODES:
            return "transient"
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            return "missing"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return "denied"
        if name in _TRANSIENT_TYPES or isinstance(
                e, (_ShortBody, ConnectionError, TimeoutError, socket.timeout,
                    asyncio.TimeoutError)):
            return "transient"
    return "other"


def _retrying(url: str, what: str, call, local: bool = False):
    """`call()` under the retry policy (local files: once). Permanent errors are raised at
    once as FileNotFoundError (404), PermissionError (403/401, no credentials: the loader
    stops on these, they are not bad data) or StorageError, naming `url`."""
    if local:
        return call()
    policy = retry_policy()
    for attempt in range(policy.attempts):
        try:
            return call()
        except ChecksumError:
            raise
        except Exception as err:  # noqa: BLE001 (classified below)
            kind = classify(err)
            reason = redact(f"{type(err).__name__}: {err}")[:300]
            shown = redact(url)
            if kind == "missing":
                raise FileNotFoundError(f"{shown}: not found (404)") from None
            if kind == "denied":
                raise PermissionError(f"{shown}: access denied (403/401); check the "
                                      "credentials (AWS_* variables, AWS_PROFILE or "
                                      "--storage-options)") from None
            if kind == "credentials":
                raise PermissionError(f"{shown}: no credentials found; set AWS_ACCESS_KEY_ID/"
                                   "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass "
                                   '--storage-options \'{"anon": true}\' for public '
                                   "buckets") from None
            if kind != "transient":
                raise StorageError(f"{shown}: {what} failed ({reason})") from None
            if attempt + 1 == policy.attempts:
                raise StorageError(f"{shown}: {what} failed after {policy.attempts} tries "
                                   f"(last: {reason})") from None
            _count_retry()
            time.sleep(policy.delay(attempt))


# ----------------------------------------------------------------------------- reading

def read_bytes(url: str, size: int | None = None) -> bytes:
    """The whole object at `url` (one GET, retried). Given its expected `size` (a shard's,
    from the manifest), an S3 object of up to one block is fetched with the GET alone:
    s3fs otherwise sends a HEAD first to choose between one GET and parallel ranged GETs,
    one more request per shard."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb") as f:
            return f.read()
    kw = {}
    if size is not None and hasattr(fs, "max_concurrency") \
            and size <= getattr(fs, "default_block_size", 0):
        kw["max_concurrency"] = 1
    return _retrying(url, "GET", lambda: fs.cat_file(path, **kw), _direct(fs))


def read_verified(url: str, size: int, sha256: str) -> bytes:
    """The object at `url`, checked against its expected size and sha256; a mismatch from
    a remote store is re-fetched up to the retry bound (a cut or corrupted body), then
    ChecksumError. Locally a mismatch is final at once."""
    fs, _ = filesystem(url)
    attempts = 1 if _direct(fs) else retry_policy().attempts
    for attempt in range(attempts):
        data = read_bytes(url, size)
        problem = None
        if len(data) != size:
            problem = (f"{len(data)} bytes, manifest says {size} (truncated or rewritten "
                       "shard)")
        else:
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                problem = (f"sha256 {digest[:12]}... does not match the manifest's "
                           f"{sha256[:12]}... (corrupt or rewritten shard)")
        if problem is None:
            return data
        if attempt + 1 < attempts:
            _count_retry()
            time.sleep(retry_policy().delay(attempt))
    tries = f" on each of {attempts} tries" if attempts > 1 else ""
    raise ChecksumError(f"shard {redact(url)}: {problem}{tries}")


class _RangeReader(io.RawIOBase):
    """Sequential reads of a remote object as ranged GETs, each retried on its own: a
    reset connection costs one block, not the whole stream."""

    def __init__(self, url: str, fs, path: str, block_size: int):
        self.url, self.fs, self.path, self.pos, self.block = url, fs, path, 0, block_size
        self.size = _retrying(url, "HEAD", lambda: fs.size(path))

    def readall(self) -> bytes:  # io's default reads 8 KiB at a time: one GET each
        parts = []
        while self.pos < self.size:
            buffer = bytearray(min(self.block, self.size - self.pos))
            parts.append(bytes(buffer[:self.readinto(buffer)]))
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        start = self.pos

        def get():
            data = self.fs.cat_file(self.path, start=start, end=start + n)
            if len(data) != n:
                raise _ShortBody(f"{len(data)} of {n} bytes")
            return data

        data = _retrying(self.url, "GET range", get)
        buffer[:n] = data
        self.pos += n
        return n


def open_read(url: str, block_size: int = 8 << 20):
    """A binary file object streaming `url` (remote: ranged GETs of `block_size`, each
    retried)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return open(path, "rb", buffering=block_size)
    if _direct(fs):
        return fs.open(path, "rb")
    return io.BufferedReader(_RangeReader(url, fs, path, block_size), buffer_size=block_size)


# ----------------------------------------------------------------------------- metadata

def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return _retrying(url, "HEAD", lambda: fs.exists(path), _direct(fs))


def size(url: str) -> int | None:
    """The object's size in bytes, None when there is none."""
    fs, path = filesystem(url)
    try:
        return _retrying(url, "HEAD", lambda: fs.size(path), _direct(fs))
    except FileNotFoundError:
        return None


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return _retrying(url, "LIST", lambda: fs.isdir(path), _direct(fs))


def listdir(url: str) -> list[str]:
    """URLs of the entries directly under `url` (sorted); [] when there is no such
    directory/prefix."""
    fs, path = filesystem(url)
    try:
        names = _retrying(url, "LIST", lambda: fs.ls(path, detail=False),
                          _direct(fs))
    except FileNotFoundError:
        return []
    return sorted(_full_url(fs, n, url) for n in names)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    _retrying(url, "DELETE", lambda: fs.rm(path), _direct(fs))


# ----------------------------------------------------------------------------- writing

def create_exclusive(url: str, data: bytes) -> bool:
    """Write `data` to a remote `url` only if no object is there (a conditional PUT,
    If-None-Match: *); False when one is. Retried like any request: a retry may find the
    object its own lost-response attempt made, so callers confirm by reading it back."""
    fs, path = filesystem(url)

    def put() -> bool:
        try:
            fs.pipe_file(path, bytes(data), mode="create")
        except FileExistsError:
            return False
        except Exception as err:  # stores report a failed precondition in their own words
            if "PreconditionFailed" in repr(err) or "412" in repr(err):
                return False
            raise
        return True

    return _retrying(url, "conditional PUT", put, _direct(fs))


def _fsync_directory(path: str) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMP_NAME = re.compile(r"\.(?P<target>.+)\.tmp-[0-9a-f]{32}")


def temp_target(name: str) -> str | None:
    """The target name if `name` is one of write_bytes_atomic's temporary files (left
    behind only when the writing process was killed), else None."""
    match = TEMP_NAME.fullmatch(name)
    return match.group("target") if match else None


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see either nothing or the complete object."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        if _direct(fs):
            fs.pipe_file(path, bytes(data))
            return
        # One PUT (or a multipart upload completed after its last part): atomic on the
        # store itself, and idempotent, so retrying it is safe.
        chunk = int(_options().get(protocol(url), {}).get("multipart_chunksize",
                                                          MULTIPART_CHUNKSIZE))
        kw = {"chunksize": chunk} if protocol(url) in ("s3", "s3a") else {}
        _retrying(url, "PUT", lambda: fs.pipe_file(path, bytes(data), **kw))
        return
    parent, _, name = path.rpartition("/")
    hidden = f".{name}.tmp-{uuid.uuid4().hex}"
    tmp = f"{parent}/{hidden}" if parent else hidden
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(parent or ".")
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:  # best effort: the original error matters more
            pass
        if isinstance(err, OSError) and err.filename is None:
            # write()/fsync() errors (disk full, I/O error) name no file: name the target
            raise OSError(err.errno, err.strerror, path) from err
        raise
