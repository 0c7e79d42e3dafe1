"""A real single-node SLURM cluster for the tests: munged, slurmctld and one slurmd on 127.0.0.1.

Everything lives in one directory (config, state, spool, logs; munge in its own), the
ports are picked free, so several test sessions on one machine do not meet. The node is
`localhost` with 2 CPUs and no GPUs.

Authentication is munge with a key made for this cluster: it is what real clusters run, so
the tests exercise the same credential path, and unlike auth/none nobody else who can reach
the ports can submit jobs as our user. The price is one more daemon (started in well
under a second, no root needed).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scontrol", "scancel", "srun")

#: Job states after which a job does nothing more (see `man squeue`, JOB STATE CODES).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    """The cluster did not come up, or a job did not reach the expected state (with the logs)."""


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None]


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    # A node claiming more memory than the machine has is drained by slurmd.
    return max(256, int(total_kb / 1024 * 0.8))


@dataclass
class SlurmCluster:
    root: Path
    cpus: int = 2
    processes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        # munged wants every directory above its socket searchable by all (pytest's temp
        # directories are private): its own short-path directory under the system temp.
        self.munge = Path(tempfile.mkdtemp(prefix="stcn-munge-"))
        self.munge.chmod(0o711)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # A job inherits the submitter's environment: keep the caller's SLURM_* out of it.
        for name in list(self.env):
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
                del self.env[name]

    # ------------------------------------------------------------------ daemons
    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        r = self.root
        lines = {
            "ClusterName": "stcntest",
            "SlurmctldHost": "localhost(127.0.0.1)",
            "SlurmctldPort": ctld_port,
            "SlurmdPort": slurmd_port,
            "SlurmUser": user,
            "SlurmdUser": user,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            # cred_expire: a requeued job may start again only after its old credential
            # expired; the default 120 s would make every requeue test wait two minutes.
            "AuthInfo": f"socket={self.munge}/socket,cred_expire=5",
            "StateSaveLocation": f"{r}/state",
            "SlurmdSpoolDir": f"{r}/spool",
            "SlurmctldPidFile": f"{r}/run/slurmctld.pid",
            "SlurmdPidFile": f"{r}/run/slurmd.pid",
            "SlurmctldLogFile": f"{r}/log/slurmctld.log",
            "SlurmdLogFile": f"{r}/log/slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            # No cgroups in containers: the cgroup plugins drain the node.
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "MpiDefault": "none",
            "MailProg": "/bin/true",
            "ReturnToService": 2,
            "JobRequeue": 1,
            # An afterok job whose dependency failed is cancelled (the default leaves it
            # pending forever, with nothing telling the user).
            "DependencyParameters": "kill_invalid_depend",
            # Schedule at once: otherwise each array task / dependency step waits seconds.
            "SchedulerParameters": "batch_sched_delay=0,sched_interval=1,bf_interval=1,sched_min_interval=0",
            "KillWait": 30,
            "MinJobAge": 600,
            "NodeName": f"localhost NodeAddr=127.0.0.1 CPUs={self.cpus} "
                        f"RealMemory={_memory_mb()} State=UNKNOWN",
            "PartitionName": "debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        }
        self.conf.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        key = self.munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.write_config()
        m = self.munge
        self._spawn("munged", ["munged", "-F", f"--key-file={m}/munge.key", f"--socket={m}/socket",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "socket").exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"])

        def idle():
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            return out.rstrip("*") == "idle"
        self._wait(idle, timeout, "the node did not become idle in sinfo")
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{', '.join(dead)} exited while starting the cluster\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmError(f"{what} within {timeout:.0f} s\n{self.logs()}")

    def stop(self) -> None:
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            # Job steps outlive `scontrol shutdown`: end the jobs first (SIGTERM, then SIGKILL
            # after KillWait), so no training process is left running.
            self.run("scancel", "--partition=debug", check=False)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.3)
            self.run("scontrol", "shutdown", check=False, timeout=30)
        # Stop in reverse start order; scontrol shutdown ends the slurm daemons, munged
        # needs its SIGTERM.
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.get(name)
            if process is None:
                continue
            if name == "munged" and process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.processes.clear()
        shutil.rmtree(self.munge, ignore_errors=True)

    def logs(self, tail: int = 60) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.munge / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"----- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients
    def run(self, *command: str, check: bool = True, timeout: float = 60, cwd=None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}\n"
                             f"{self.logs(20)}")
        return result

    def sbatch(self, *arguments: str, cwd=None, env: dict | None = None) -> str:
        """Submit; returns the job id (the array's id for arrays)."""
        out = self.run("sbatch", "--parsable", *arguments, cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (the first record: an array's first task)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return self._parse_job(out.splitlines()[0])

    def jobs(self, job_id: str) -> list[dict]:
        """Every record of a job id (one per array task)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return [self._parse_job(line) for line in out.splitlines() if line.strip()]

    @staticmethod
    def _parse_job(line: str) -> dict:
        fields = {}
        for match in re.finditer(r"(\S+?)=(\S*)", line):
            fields.setdefault(match.group(1), match.group(2))
        return fields

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait_state(self, job_id: str, states, timeout: float = 120, log: Path | None = None) -> dict:
        """Poll until the job is in one of `states` (a set or a predicate on the record)."""
        accept = states if callable(states) else (lambda record: record["JobState"] in states)
        deadline = time.monotonic() + timeout
        record = {}
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if accept(record):
                return record
            time.sleep(0.3)
        text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        raise SlurmError(f"job {job_id} is {record.get('JobState')} ({record.get('Reason')}) after "
                         f"{timeout:.0f} s; wanted {states}\njob log {log}:\n{text}\n{self.logs(20)}")

    def wait_done(self, job_id: str, timeout: float = 120, log: Path | None = None) -> list[dict]:
        """Wait until every record of the job id (every array task) is in a final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in FINAL_STATES for r in records):
                return records
            time.sleep(0.3)
        text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        raise SlurmError(f"job {job_id} not finished after {timeout:.0f} s: "
                         f"{[(r.get('JobId'), r.get('JobState')) for r in records]}\n{text}\n{self.logs(20)}")
