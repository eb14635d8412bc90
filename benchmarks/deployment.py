"""Flower's deployment engine on one machine, for the benchmarks (gpu_check, round_overhead).

One `flower-superlink` and one `flower-supernode` per node config, all on 127.0.0.1 and INSECURE on
purpose (plain gRPC, no TLS, no SuperNode authentication): they measure speed, they are not a
deployment recipe (docker/ and tests/test_deployment.py are). Every process runs in its own process
group with its own log file and Flower home, and is stopped on `stop()`, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

FEDERATION = "local"  # the name of the SuperLink connection in the `flwr` CLI's config.toml


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Processes:
    """Flower processes started here, each in its own process group with its log file; all stopped on exit."""

    def __init__(self, log_dir: Path, env: dict) -> None:
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(self.env, FLWR_HOME=str(home)), process_group=0
        )
        self.procs[name] = proc
        log(f"started {name} (pid {proc.pid}): {' '.join(cmd)}")
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited early with code {proc.returncode}; end of its log:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group: its superexec and app processes too
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever ignored SIGTERM, and orphans left in the group
            except ProcessLookupError:
                pass
        log(f"stopped {len(self.procs)} Flower process group(s)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ports_free(ports: list[int]) -> None:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise RuntimeError(
                    f"port {port} is in use (another SuperLink?); pass --base-port to use other ports"
                ) from None


def wait_for_port(port: int, timeout: float, procs: Processes) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs.check_alive()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s (see superlink.log)")


def flower_bin() -> Path:
    """The folder of Flower's executables; children need it first in PATH (they start each other by name)."""
    for candidate in (shutil.which("flower-superlink"), Path(sys.executable).parent / "flower-superlink"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).parent
    raise RuntimeError(
        "flower-superlink not found in PATH nor beside this Python: install flwr==1.28.0 "
        "(on the GPU machine: the carried wheels, with their bin/ folder put first in PATH)"
    )


def run_flwr(
    cmd: list[str], env: dict, log_path: Path, timeout: float, procs: Processes, cwd: Path, echo: bool = True
) -> int | None:
    """`flwr run --stream`, its output saved (and shown live with echo); None when it outlives `timeout`."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=cwd, process_group=0
        )

        def pump() -> None:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if echo:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = time.time() + timeout
        try:
            while proc.poll() is None:
                if time.time() > deadline:
                    log(f"DEADLINE: flwr run still running after {timeout:.0f} s; stopping it")
                    return None
                procs.check_alive()
                time.sleep(1)
            return proc.returncode
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            reader.join(timeout=5)


class LocalDeployment:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1 (ports from `base_port` on, else free ones), and a
    `flwr` CLI configured for them. Logs go to <work>/logs, Flower homes to <work>/flwr."""

    def __init__(self, work: Path, num_nodes: int, base_port: int | None = None, warm: bool = False) -> None:
        # warm: --isolation process + a fedclip-clientapp per node
        self.work, self.num_nodes, self.warm = (
            work,
            num_nodes,
            warm,
        )
        if base_port is None:
            ports = [free_port() for _ in range(3 + num_nodes)]
        else:
            ports = list(range(base_port, base_port + 3 + num_nodes))
            check_ports_free(ports)  # before any slow step
        self.serverappio, self.fleet, self.control, *self.clientappio = ports
        self.procs: Processes | None = None

    def start(self, env: dict, node_configs: list[str], startup_timeout: float = 60) -> None:
        """Start the SuperLink, wait until it listens, then one SuperNode per node config (`--node-config`)."""
        assert len(node_configs) == self.num_nodes
        self.bin = flower_bin()
        self.env = dict(env, PATH=f"{self.bin}:{env.get('PATH', '')}")
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = Processes(self.work / "logs", self.env)
        homes = self.work / "flwr"
        self.procs.start(
            "superlink",
            [
                str(self.bin / "flower-superlink"),
                "--insecure",
                "--serverappio-api-address",
                f"127.0.0.1:{self.serverappio}",
                "--fleet-api-address",
                f"127.0.0.1:{self.fleet}",
                "--control-api-address",
                f"127.0.0.1:{self.control}",
            ],
            homes / "superlink",
        )
        wait_for_port(self.control, startup_timeout, self.procs)
        wait_for_port(self.fleet, startup_timeout, self.procs)
        for i, node_config in enumerate(node_configs):
            appio = f"127.0.0.1:{self.clientappio[i]}"
            self.procs.start(
                f"supernode-{i}",
                [
                    str(self.bin / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.fleet}",
                    "--clientappio-api-address",
                    appio,
                    "--node-config",
                    node_config,
                    *(["--isolation", "process"] if self.warm else []),
                ],
                homes / f"node-{i}",
            )
            if self.warm:  # gate/warm.py: one interpreter handles every message of the node
                self.procs.start(
                    f"clientapp-{i}",
                    [str(self.bin / "fedclip-clientapp"), "--clientappio-api-address", appio],
                    homes / f"node-{i}",
                )
        self.cli_home = homes / "cli"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = '
            f'"127.0.0.1:{self.control}"\ninsecure = true\n'
        )

    def run(self, app: Path, run_config: str, log_path: Path, timeout: float, echo: bool = True) -> int | None:
        """`flwr run APP` against this SuperLink with `--run-config`; the exit code, None past `timeout`."""
        cmd = [str(self.bin / "flwr"), "run", str(app), FEDERATION, "--stream", "--run-config", run_config]
        return run_flwr(cmd, dict(self.env, FLWR_HOME=str(self.cli_home)), log_path, timeout, self.procs, app, echo)

    def node_logs(self) -> list[Path]:
        return sorted((self.work / "logs").glob("supernode-*.log"))

    def stop(self) -> None:
        if self.procs is not None:
            self.procs.stop()
