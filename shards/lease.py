"""A lease on a shard set: one job writes a set at a time.

`Lease(out)` is the object `<out>/_lease.json` (any fsspec URL: a local directory, s3://,
memory://) holding its holder: job, host, pid, process start time, lease start and a
heartbeat that a background thread renews every `heartbeat_s` seconds.

- Acquiring creates the object exclusively (O_EXCL locally; a conditional PUT,
  If-None-Match, on object stores). A live holder makes a second job fail with
  `LeaseHeld`, whose message names the holder.
- A stale lease is taken over with a warning: its heartbeat is older than `stale_after_s`,
  or (holder on this host, not a SLURM job) its process is gone.
- The tasks of one SLURM job (array tasks share SLURM_ARRAY_JOB_ID, or SLURM_JOB_ID
  without an array) share the job's lease: each joins it and renews it. A task leaves it
  in place when it ends, unless the set is complete (manifest.json written): other tasks
  may still run, and a lease whose heartbeats stopped goes stale.
- Takeover is atomic locally (the stale object is renamed aside, then created again
  exclusively). On object stores it is delete + conditional create, and every heartbeat
  reads the object back first: a holder that finds someone else's lease stops renewing
  and its job fails at the end (`LeaseLost`).

Only this module and shards.storage talk to fsspec about leases.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass

from fsspec.implementations.local import LocalFileSystem

from . import storage

LEASE_NAME = "_lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class LeaseHeld(RuntimeError):
    """Another live job holds the lease (the message names it)."""


class LeaseLost(RuntimeError):
    """This job's lease was taken over while it ran (its heartbeats had stalled)."""


def job_identity(env=None) -> tuple[str, bool]:
    """(job id, shared): the SLURM job (array tasks share their array's id) or this
    process."""
    env = os.environ if env is None else env
    slurm = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if slurm:
        return f"slurm-{slurm}", True
    return f"{socket.gethostname()}:{os.getpid()}", False


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot; tells a reused pid apart),
    None where /proc is unavailable or the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is not None:
        now = process_start(pid)
        return now is None or now == start
    return True


@dataclass
class Holder:
    job: str
    shared: bool  # SLURM job: its tasks share the lease
    host: str
    pid: int
    pid_start: str | None
    started: float  # unix time the lease was taken
    heartbeat: float  # unix time of the last renewal
    token: str  # this acquisition

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (f"job {self.job} (host {self.host}, pid {self.pid}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))}, "
                f"last heartbeat {age:.0f} s ago)")

    @classmethod
    def from_json(cls, data: bytes) -> "Holder":
        raw = json.loads(data)
        return cls(**{k: raw.get(k) for k in cls.__dataclass_fields__})


class Lease:
    """The lease on one shard set; a context manager (see the module docstring)."""

    def __init__(self, out: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, env=None, log=None):
        self.out = out.rstrip("/")
        self.url = storage.join(self.out, LEASE_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.job, self.shared = job_identity(env)
        self.log = log or (lambda message: warnings.warn(message, stacklevel=3))
        self.holder: Holder | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fs, self.path = storage.filesystem(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------------ storage
    def _new_holder(self, started: float | None = None) -> Holder:
        now = time.time()
        return Holder(job=self.job, shared=self.shared, host=socket.gethostname(),
                      pid=os.getpid(), pid_start=process_start(os.getpid()),
                      started=started or now, heartbeat=now, token=uuid.uuid4().hex)

    def read(self) -> Holder | None:
        """The current holder, None when there is no lease object."""
        try:
            data = storage.read_bytes(self.url)  # retried on transient errors
        except FileNotFoundError:
            return None
        try:
            return Holder.from_json(data)
        except (ValueError, TypeError):
            # a damaged lease protects nothing: treat it as stale
            return Holder(job="unreadable lease", shared=False, host="?", pid=-1, pid_start=None,
                          started=0.0, heartbeat=0.0, token="")

    def _create(self, holder: Holder) -> bool:
        """Create the lease object only if there is none; False if there is one."""
        data = json.dumps(asdict(holder), indent=1).encode()
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        return storage.create_exclusive(self.url, data)

    def _write(self, holder: Holder) -> None:
        storage.write_bytes_atomic(self.url, json.dumps(asdict(holder), indent=1).encode())

    def _remove_stale(self, stale: Holder) -> None:
        if self.local:
            aside = f"{self.path}.stale-{uuid.uuid4().hex}"
            try:
                os.rename(self.path, aside)  # only one of several contenders succeeds
            except FileNotFoundError:
                return
            os.unlink(aside)
        else:
            try:
                storage.remove(self.url)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ protocol
    def is_stale(self, holder: Holder) -> bool:
        if time.time() - holder.heartbeat > self.stale_after_s:
            return True
        if not holder.shared and holder.host == socket.gethostname():
            return not process_alive(holder.pid, holder.pid_start)
        return False

    def acquire(self) -> "Lease":
        for _ in range(20):  # contenders that keep racing: give up eventually
            current = self.read()
            if current is None:
                holder = self._new_holder()
                if self._create(holder):
                    return self._confirm(holder)
                continue
            if current.shared and current.job == self.job:
                # a task of the same SLURM job: join its lease
                holder = self._new_holder(started=current.started)
                holder.token = current.token
                self._write(holder)
                return self._started(holder)
            if not self.is_stale(current):
                raise LeaseHeld(
                    f"{self.out} is being written by {current.describe()}; wait for it to "
                    f"finish, or if it is dead, delete {self.url} (a lease without heartbeats "
                    f"for {self.stale_after_s:.0f} s is taken over automatically)")
            self.log(f"taking over the stale lease on {self.out} of {current.describe()}: "
                     "its temporary files are removed, its finished shards kept")
            self._remove_stale(current)
        raise LeaseHeld(f"{self.out}: could not take the lease (other jobs keep racing for it)")

    def _confirm(self, holder: Holder) -> "Lease":
        if not self.local:
            # object stores without conditional writes: read back (last writer wins)
            current = self.read()
            if current is None or current.token != holder.token:
                raise LeaseHeld(f"{self.out}: another job took the lease at the same time "
                                f"({current.describe() if current else 'now gone'})")
        return self._started(holder)

    def _started(self, holder: Holder) -> "Lease":
        self.holder = holder
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="shard-set-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLost as err:
                self.lost = str(err)
                self.log(self.lost)
                return
            except Exception as err:  # a failed renewal is retried at the next beat
                self.log(f"lease heartbeat on {self.out} failed ({err}); retrying")

    def renew(self) -> None:
        """Write a fresh heartbeat, after checking that the lease is still ours."""
        current = self.read()
        if current is None or current.token != self.holder.token:
            raise LeaseLost(f"the lease on {self.out} was taken over by "
                            f"{current.describe() if current else 'nobody (it was deleted)'} "
                            "while this job ran: its shards may have been rewritten; rerun it")
        self.holder.heartbeat = time.time()
        self._write(self.holder)

    def release(self, complete: bool = False) -> None:
        """Stop the heartbeat; delete the lease if this job alone holds it (or the set is
        complete). Raises LeaseLost if the lease was taken over meanwhile."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.holder is None:
            return
        if self.lost:
            raise LeaseLost(self.lost)
        current = self.read()
        if current is not None and current.token == self.holder.token and (not self.shared or complete):
            try:
                storage.remove(self.url)
            except FileNotFoundError:
                pass
        self.holder = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.release(complete=storage.exists(storage.join(self.out, "manifest.json")))
        else:
            try:
                self.release()
            except LeaseLost:
                pass  # the error already in flight matters more


__all__ = ["Lease", "LeaseHeld", "LeaseLost", "Holder", "LEASE_NAME", "job_identity"]
