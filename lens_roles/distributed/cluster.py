"""A throw-away Ray cluster on this machine that starts on loaded cores, and stops without leftovers.

``ray.init(num_cpus=2)`` starts a local Ray instance whose raylet gives its agents
15 s to report each dynamically chosen port and aborts when their Python start-up
is slower — as it is on two loaded cores ("Timed out waiting for file
…/metrics_agent_port_…", or ``dashboard_agent_listen_port_…``). :class:`LocalCluster`
instead runs ``ray start --head --block`` with every agent port fixed in advance
(the metrics agent's, the dashboard agent's, the runtime-env agent's), the
dashboard off, a long agent-registration timeout, and up to ``attempts`` tries.
The raylet still waits a fixed 15 s for the agents to write their port files, so
on a machine whose CPU is saturated by other work (the agents' imports then take
longer: 3.5 s of CPU spread over 15 s of wall time was seen) every try can fail;
raising the head's priority did not help there (the CPU pressure came from other
control groups).
:meth:`LocalCluster.stop` ends the head's whole process group (SIGTERM, then
SIGKILL) and removes the ``ray_current_cluster`` record that ``ray start`` left,
so a later ``ray.init()`` does not try to join a cluster that is gone. Used by the
Ray tests and ``benchmarks/distributed.py``; pass its ``address`` to
``ray.init`` or :class:`~lens_roles.distributed.RayExecutor`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lens_roles.errors import UsageError


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A Ray head on this machine with ``num_cpus`` CPUs; ``address`` is ``127.0.0.1:<port>``.

    Args:
        num_cpus: CPUs the cluster offers its workers.
        log_dir: where each attempt's ``ray start`` output goes (``head-<n>.log``).
        attempts: tries before giving up (the raylet may still abort under load).
        timeout: seconds each try may take to accept drivers.

    Raises:
        UsageError: the head did not start in ``attempts`` tries (naming the logs).
    """

    def __init__(self, num_cpus: int = 2, *, log_dir: str | Path | None = None, attempts: int = 5,
                 timeout: float = 180):
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="lens-roles-ray-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        # a throw-away cluster on the loopback, without tokens: set here too, for this process's ray.init
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        env = dict(os.environ)
        env.setdefault("RAY_agent_register_timeout_ms", "180000")  # agents start slowly on loaded cores
        self.process: subprocess.Popen | None = None
        self.address = ""
        logs = []
        for attempt in range(attempts):
            port, agent, listen, runtime_env, metrics = (free_port() for _ in range(5))
            log_path = log_dir / f"head-{attempt}.log"
            logs.append(str(log_path))
            with log_path.open("w") as log_file:
                head = subprocess.Popen(
                    [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--num-cpus={num_cpus}",
                     f"--port={port}", "--include-dashboard=false", f"--dashboard-agent-grpc-port={agent}",
                     f"--dashboard-agent-listen-port={listen}", f"--runtime-env-agent-port={runtime_env}",
                     f"--metrics-export-port={metrics}", "--disable-usage-stats", "--block"],
                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            self.process, self.address = head, f"127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and head.poll() is None:
                if "block forever" in log_path.read_text():
                    return
                time.sleep(1)
            self.stop()
        raise UsageError(f"a local Ray head did not start in {attempts} attempt(s); see {', '.join(logs)}")

    def stop(self) -> None:
        """Stop the head and every process of its session (raylet, GCS, workers), and forget it as this
        machine's current cluster. Safe to call twice."""
        head, self.process = self.process, None
        if head is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(30)
            except subprocess.TimeoutExpired:
                continue
            time.sleep(2)  # the session's other processes leave after the head
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        port = self.address.rpartition(":")[2]
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
