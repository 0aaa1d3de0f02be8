"""A real Slurm cluster on this one host, for tests: install, bring up, submit, watch, tear down.

`SlurmCluster(workdir).start()` runs munged plus one `slurmctld` and one `slurmd -N <node>` per
emulated node (Debian builds Slurm with multiple-slurmd support: every node is a slurmd on its
own loopback port, all on this host). Jobs see a real multi-node allocation: `sbatch -N 2` gets
SLURM_JOB_NODELIST=n[1-2], one batch step on n1, SLURM_NODEID 0/1 for `srun` tasks.

It needs root (the daemons, /etc/hosts, /etc/slurm) and the Debian packages `slurm-wlm` and
`munge`; `ensure_packages()` installs them with apt-get when missing, with a policy-rc.d that
keeps the package scripts from starting any daemon. Anything that cannot work here raises
`SlurmUnavailable` with the reason, which the tests turn into a skip.

Everything the cluster writes (config, state, spool, logs, munge key and socket) lives under
`workdir`, except /etc/slurm/slurm.conf (where the client commands look for it) and the node
names in /etc/hosts: both are backed up and restored by `stop()`. Daemons are stopped by PID.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLURM_CONF = Path("/etc/slurm/slurm.conf")
HOSTS = Path("/etc/hosts")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
PACKAGES = ("slurm-wlm", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged")
HOSTS_MARK = "# pretrain-test-slurm"
CONF_HEADER = "# Written by tests/slurm_cluster.py"
# /etc/slurm/slurm.conf and /etc/hosts are global: one test cluster per host at a time.
LOCK_FILE = Path(tempfile.gettempdir()) / "pretrain-slurm-cluster.lock"

# Job states after which a job never runs again without outside action.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run on this machine; the message says why (tests skip with it)."""


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_packages(timeout: float = 300) -> None:
    """Install slurm-wlm and munge with apt-get when their commands are missing."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root (runs slurmctld/slurmd/munged, edits /etc/hosts)")
    if all(shutil.which(c) for c in COMMANDS):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # policy-rc.d exiting 101 tells invoke-rc.d "do not start services": the packages'
    # postinst scripts must not start a system slurmctld/munged on default ports.
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        proc = _run(install, timeout=timeout, env=env)
        if proc.returncode != 0:
            # A fresh container has no package lists yet.
            _run(["apt-get", "update", "-q"], timeout=timeout, env=env)
            proc = _run(install, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise SlurmUnavailable(
                f"`{' '.join(install)}` failed (exit {proc.returncode}): {proc.stderr[-800:]}"
            )
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    missing = [c for c in COMMANDS if not shutil.which(c)]
    if missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but still missing commands: {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol -o show ...` line -> {Key: value}. Values never contain ' Key=' runs."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line.strip()):
        out[m.group(1)] = m.group(2)
    return out


class SlurmCluster:
    """munged + slurmctld + one slurmd per node name, all on this host, state under `workdir`."""

    def __init__(
        self,
        workdir: Path | None = None,
        nodes: Iterable[str] = ("n1", "n2"),
        cpus_per_node: int | None = None,
    ) -> None:
        # munged runs as the munge user: every directory above its key and socket must be
        # traversable (pytest's tmp_path is under a 0700 directory), hence /tmp by default.
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pretrain-slurm-"))
        self.nodes = list(nodes)
        self.cpus = cpus_per_node or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._saved_conf: str | None = None
        self._saved_hosts: str | None = None
        self._touched_etc = False
        self._lock: Any = None

    # ---- bring-up ---------------------------------------------------------------------------
    def start(self, timeout: float = 60, lock_timeout: float = 900) -> SlurmCluster:
        ensure_packages()
        self._take_lock(lock_timeout)
        try:
            self._write_files()
            self._start_munge()
            self._start_slurm(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _take_lock(self, timeout: float) -> None:
        # Another test session on this host may be using its cluster: wait for it to finish.
        self._lock = open(LOCK_FILE, "w")  # noqa: SIM115 - held until stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise SlurmUnavailable(
                        f"another test session has held {LOCK_FILE} (its Slurm test cluster) "
                        f"for more than {timeout:.0f}s"
                    ) from None
                time.sleep(1)

    def _write_files(self) -> None:
        w = self.workdir
        # Daemons running as the munge user must traverse these directories.
        w.mkdir(parents=True, exist_ok=True)
        w.chmod(0o755)
        for d in ("state", "spool", "log"):
            (w / d).mkdir(exist_ok=True)
        self.ctld_port = _free_port()
        self.node_ports = {n: _free_port() for n in self.nodes}
        self.munge_socket = w / "munge" / "munge.socket"
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 "
            f"Port={self.node_ports[n]} CPUs={self.cpus} State=UNKNOWN"
            for n in self.nodes
        )
        conf = f"""{CONF_HEADER} for a throwaway single-host test cluster.
ClusterName=pretraintest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s).
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd-%n.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# The main loop also starts requeued jobs once eligible: every second, not every minute.
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        (w / "slurm.conf").write_text(conf)
        self._touched_etc = True
        # Left over by a test session that was killed: not the machine's own, not restored.
        if SLURM_CONF.exists() and not SLURM_CONF.read_text().startswith(CONF_HEADER):
            self._saved_conf = SLURM_CONF.read_text()
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(conf)
        hosts = [ln for ln in HOSTS.read_text().splitlines() if not ln.endswith(HOSTS_MARK)]
        self._saved_hosts = "\n".join(hosts) + "\n"
        names = " ".join(self.nodes)
        HOSTS.write_text(self._saved_hosts + f"127.0.0.1 {names} {HOSTS_MARK}\n")

    def _start_munge(self) -> None:
        try:
            munge = pwd.getpwnam("munge")
        except KeyError as e:
            raise SlurmUnavailable("the munge package created no `munge` user") from e
        d = self.workdir / "munge"
        d.mkdir(exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        # munged refuses a key anyone but munge could read, and a socket directory that
        # clients (any user) cannot traverse or that others could write.
        for p in (d, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        d.chmod(0o755)
        key.chmod(0o600)
        # As root munged fails ("PRNG seed dir is insecure"): it runs as the munge user, as our
        # direct child so that stop() signals munged itself.
        self._spawn(
            "munged",
            [
                "munged", "--foreground",
                f"--key-file={key}", f"--socket={self.munge_socket}",
                f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                f"--seed-file={d}/munged.seed",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), 15, "munged to create its socket")

    def _start_slurm(self, timeout: float) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n])

        def nodes_idle() -> bool:
            proc = _run(["scontrol", "-o", "show", "node"], timeout=10)
            if proc.returncode != 0:
                return False
            states = [parse_record(ln).get("State", "") for ln in proc.stdout.splitlines()]
            return len(states) == len(self.nodes) and all(s.startswith("IDLE") for s in states)

        self._wait(nodes_idle, timeout, "every node to register IDLE with slurmctld")

    def _spawn(self, name: str, cmd: list[str], **kw: Any) -> None:
        log = open(self.workdir / "log" / f"{name}.out", "ab")  # noqa: SIM115 - lives with proc
        # Own session: a Ctrl-C in the test terminal must not reach the daemons mid-teardown.
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw
        )
        log.close()

    def _wait(self, ok: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited with {p.returncode} while waiting for {what}:\n"
                        + self.logs(name)
                    )
            if ok():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, *names: str, tail: int = 3000) -> str:
        """The last `tail` characters of each daemon's log (all when no name is given)."""
        out = []
        files = sorted((self.workdir / "log").glob("*"))
        files += [self.workdir / "munge" / "munged.log"]
        for f in files:
            if names and not any(n in f.name for n in names):
                continue
            if f.is_file():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # ---- teardown ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every daemon this cluster started (by PID), restore /etc files. Idempotent."""
        # slurmds first (they may hold job steps), then the controller, munge last.
        order = [n for n in self.procs if n.startswith("slurmd")]
        order += [n for n in ("slurmctld", "munged") if n in self.procs]
        for name in order:
            p = self.procs.pop(name)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        if self._touched_etc:
            if self._saved_conf is not None:
                SLURM_CONF.write_text(self._saved_conf)
            else:
                SLURM_CONF.unlink(missing_ok=True)
            if self._saved_hosts is not None:
                HOSTS.write_text(self._saved_hosts)
            self._touched_etc = False
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    # ---- jobs -------------------------------------------------------------------------------
    def sbatch(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit a batch job; returns its id."""
        proc = _run(["sbatch", "--parsable", *args], cwd=cwd, env=env, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {args} failed ({proc.returncode}): {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol -o show job <id>` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        proc = _run(["scontrol", "-o", "show", "job", str(job_id)], timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id} failed: {proc.stderr}")
        return parse_record(proc.stdout.splitlines()[0])

    def wait_job(
        self,
        job_id: int,
        until: Callable[[dict[str, str]], bool] | None = None,
        timeout: float = 120,
        poll: float = 0.5,
    ) -> dict[str, str]:
        """Poll the job until `until(record)` (default: a final state); return the record."""
        until = until or (lambda rec: rec["JobState"] in FINAL_STATES)
        deadline = time.monotonic() + timeout
        while True:
            rec = self.job(job_id)
            if until(rec):
                return rec
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {rec.get('JobState')} ({rec.get('Reason')}) after "
                    f"{timeout:.0f}s"
                )
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} died (exit {p.returncode}):\n{self.logs(name)}")
            time.sleep(poll)

    def job_processes(self, job_id: int) -> list[JobProcess]:
        """Every process running for the job on any emulated node (they all live on this host:
        found by the SLURM_JOB_ID in their environment)."""
        found = []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                environ = (pid_dir / "environ").read_bytes().split(b"\0")
                cmdline = (pid_dir / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile, or a kernel thread
                continue
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            if env.get("SLURM_JOB_ID") == str(job_id):
                argv = [a.decode(errors="replace") for a in cmdline if a]
                found.append(JobProcess(int(pid_dir.name), argv, env))
        return sorted(found, key=lambda p: p.pid)


@dataclass
class JobProcess:
    pid: int
    argv: list[str]
    env: dict[str, str]
