"""Deployment end to end: a real SuperLink and one real SuperNode per domain over gRPC, with TLS and
SuperNode authentication, driven by `flwr run`, with the commands and flags of docker/compose.yml.

Each SuperNode runs in its own network namespace (`ip netns`, a veth pair to the host), so it
reaches the SuperLink over a network interface by the name `superlink`, as a container or a
separate machine would. Where namespaces cannot be made the deployment tests fail if the machine
promised them (root, with iproute2) and are skipped, saying why, otherwise: never run on the host instead. Ports are
free ones, so parallel runs
do not collide. Every SuperNode holds only its own domain's folder (a link to the demo's).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.common.constant import (
    CONTROL_API_DEFAULT_SERVER_ADDRESS,
    FLEET_API_GRPC_RERE_DEFAULT_ADDRESS,
    SERVERAPPIO_API_DEFAULT_SERVER_ADDRESS,
)

from common.config import load_config
from common.data import dataset_root
from common.model import model_name_or_path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr
DOMAINS = ["cartoon", "painting", "photo", "sketch"]  # the demo's; sketch is held out
ROUNDS = 6  # not the demo's 40: each message starts a ClientApp process (docs/measurements.md, "Deployment")
KILLED = "cartoon"  # a training domain whose node dies mid-run and comes back
KILL_AFTER_ROUND = 2
# the flags of docker/compose.yml's commands and docs/deployment.md's (tests/test_compose.py and the test below
# check they
# agree); here the SuperLink also gets free ports instead of 9091-9093, and --fleet-api-address to set its port
SUPERLINK_FLAGS = {
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--enable-supernode-auth",
    "--database",
    "--fleet-api-address",
    "--control-api-address",
    "--serverappio-api-address",
}
SUPERNODE_FLAGS = {
    "--superlink",
    "--root-certificates",
    "--auth-supernode-private-key",
    "--clientappio-api-address",
    "--node-config",
}
ROW = re.compile(r"^\S*\s*\S*\s*(\d+) \|\s+[-\d.]+ \|")  # a row of the per-round table
# where Flower 1.28 binds each API a `flower-superlink` command does not bind: every interface (flwr/common/constant.py)
FLOWER_BIND_DEFAULTS = {
    "--fleet-api-address": FLEET_API_GRPC_RERE_DEFAULT_ADDRESS,
    "--control-api-address": CONTROL_API_DEFAULT_SERVER_ADDRESS,
    "--serverappio-api-address": SERVERAPPIO_API_DEFAULT_SERVER_ADDRESS,
}


def documented_superlink() -> dict[str, str]:
    """The flags of docs/deployment.md's `flower-superlink` command (2b, the one command that starts it), flag -> value
    ("" for a switch)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "deployment.md").read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "flower-superlink" in words:
                commands.append(words[words.index("flower-superlink") + 1 :])
    assert len(commands) == 1, f"docs/deployment.md should start the SuperLink with one command, not {len(commands)}"
    words = commands[0]
    return {
        w: words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
        for i, w in enumerate(words)
        if w.startswith("--")
    }


DOCUMENTED_SUPERLINK = documented_superlink()


def documented_bind_host(flag: str) -> str:
    """The host the documented SuperLink command binds that API on (Flower's default where it sets none)."""
    return DOCUMENTED_SUPERLINK.get(flag, FLOWER_BIND_DEFAULTS[flag]).rpartition(":")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


class Deployment:
    """A SuperLink on the host and SuperNodes in their own network namespaces, as separate hosts."""

    def __init__(self, tmp: Path, cache: str) -> None:
        self.tmp, self.cache = tmp, cache
        self.procs: dict[str, subprocess.Popen] = {}
        self.namespaces: list[str] = []
        self.fleet, self.control, self.serverappio = free_port(), free_port(), free_port()
        self.env = dict(
            os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", FEDCLIP_OUTPUTS=str(tmp / "outputs")
        )
        self.env.pop("PYTHONPATH", None)  # the ClientApp and ServerApp must run from the FAB `flwr run` ships
        self.env.pop("FEDCLIP_CACHE", None)  # each node gets its cache from --node-config
        self.netns_error = self._probe_netns()
        self.certs = tmp / "certs"
        out = run(
            [
                "bash",
                str(REPO / "docker/make-certs.sh"),
                "-o",
                str(self.certs),
                *sum((["--node", d] for d in [*DOMAINS, "intruder"]), []),
                "superlink",
                "localhost",
                "127.0.0.1",
            ]
        )
        assert out.returncode == 0, out.stderr
        home = tmp / "flwr-cli"
        home.mkdir()
        # the `flwr` CLI's connection to the SuperLink's Control API, verified with the CA
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedclip"\n\n[superlink.fedclip]\naddress = "127.0.0.1:{self.control}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )
        self.cli_env = dict(self.env, FLWR_HOME=str(home))

    def _probe_netns(self) -> str | None:
        """None if network namespaces work here, else why not."""
        if shutil.which("ip") is None:
            return "no `ip` command (iproute2)"
        name = f"fcprobe{os.getpid()}"
        out = run(["ip", "netns", "add", name])
        if out.returncode != 0:
            return f"`ip netns add` failed: {out.stderr.strip()}"
        run(["ip", "netns", "del", name])
        return None

    def _netns(self, index: int) -> tuple[list[str], str]:
        """A namespace joined to the host by a veth pair; in it, `superlink` is the host's end."""
        ns, subnet = f"fc{os.getpid()}n{index}", f"10.{200 + os.getpid() % 50}.{index}"
        host_if, ns_if = f"fch{os.getpid() % 100000}{index}", f"fcn{os.getpid() % 100000}{index}"
        for cmd in (
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["ip", "link", "set", ns_if, "netns", ns],
            ["ip", "addr", "add", f"{subnet}.1/24", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", ns_if],
            ["ip", "-n", ns, "link", "set", ns_if, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ):
            out = run(cmd)
            assert out.returncode == 0, f"{cmd}: {out.stderr}"
            if cmd[:3] == ["ip", "netns", "add"]:
                self.namespaces.append(ns)
        hosts = Path("/etc/netns") / ns / "hosts"  # `ip netns exec` mounts it over /etc/hosts
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{subnet}.1 superlink\n")
        return ["ip", "netns", "exec", ns], "superlink"

    def _start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start_superlink(self) -> None:
        """docs/deployment.md's SuperLink command (and docker/compose.yml's): TLS, SuperNode authentication, each
        API bound on
        the host that command binds it on (ServerAppIo and Control: 127.0.0.1), on a free port."""
        home = self.tmp / "superlink-home"
        home.mkdir()
        command = [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(self.certs / "ca.crt"),
            "--ssl-certfile",
            str(self.certs / "superlink.crt"),
            "--ssl-keyfile",
            str(self.certs / "superlink.key"),
            "--enable-supernode-auth",
            "--database",
            str(home / "state.db"),
            "--fleet-api-address",
            f"{documented_bind_host('--fleet-api-address')}:{self.fleet}",
            "--control-api-address",
            f"{documented_bind_host('--control-api-address')}:{self.control}",
            "--serverappio-api-address",
            f"{documented_bind_host('--serverappio-api-address')}:{self.serverappio}",
        ]
        assert {c for c in command if c.startswith("--")} == SUPERLINK_FLAGS
        self._start("superlink", command, dict(self.env, FLWR_HOME=str(home)))
        self.wait_for(
            lambda: run([str(BIN / "flwr"), "supernode", "ls", "fedclip"], env=self.cli_env).returncode == 0,
            60,
            "SuperLink",
        )

    def register(self, name: str) -> None:
        out = run(
            [str(BIN / "flwr"), "supernode", "register", str(self.certs / f"supernode-{name}.pub"), "fedclip"],
            env=self.cli_env,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def start_supernode(
        self, index: int, domain: str, key: str | None = None, warm: list[str] | None = None
    ) -> subprocess.Popen:
        """docker/compose.yml's SuperNode command: the CA, its private key, its domain, data, cache and device.

        With `warm` (fedclip-clientapp's flags, e.g. --approved-apps FILE) the SuperNode runs with
        `--isolation process` and a warm ClientApp beside it on its host, from this checkout (PYTHONPATH).
        """
        data = self.tmp / f"data-{domain}"
        if not data.exists():  # only this node's domain, as on its own site
            data.mkdir()
            (data / domain).symlink_to(self.demo_root / domain)
        prefix, host = self._netns(index)
        home = self.tmp / f"supernode-home-{domain}-{index}"
        home.mkdir()
        node_config = f"domain='{domain}' data-dir='{data}' cache-dir='{self.cache}' device='cpu'"
        clientappio = f"127.0.0.1:{free_port()}"
        command = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"{host}:{self.fleet}",
            "--root-certificates",
            str(self.certs / "ca.crt"),
            "--auth-supernode-private-key",
            str(self.certs / f"supernode-{key or domain}"),
            "--clientappio-api-address",
            clientappio,
            "--node-config",
            node_config,
        ]
        assert {c for c in command if c.startswith("--")} == SUPERNODE_FLAGS
        env = dict(self.env, FLWR_HOME=str(home))
        if warm is not None:
            command += ["--isolation", "process"]
            self._start(
                f"warm-{domain}-{index}",
                [*prefix, str(BIN / "fedclip-clientapp"), "--clientappio-api-address", clientappio, *warm],
                dict(env, PYTHONPATH=str(REPO)),
            )
        return self._start(f"supernode-{domain}-{index}", [*prefix, *command], env)

    def online_nodes(self) -> int:
        out = run([str(BIN / "flwr"), "supernode", "ls", "fedclip", "--format", "json"], env=self.cli_env)
        if out.returncode != 0:
            return 0
        nodes = json.loads(out.stdout[out.stdout.index("{") :]).get("nodes", [])
        return sum(1 for n in nodes if n.get("status") == "online")

    @staticmethod
    def wait_for(check, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while not check():
            if time.time() > deadline:
                raise TimeoutError(f"{what} not ready after {seconds} s")
            time.sleep(1)

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started: a crash, not a clean shutdown."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(name)
        for ns in self.namespaces:  # deleting a namespace removes its veth pair too
            run(["ip", "netns", "del", ns])
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def skip_without_cert_tools() -> None:
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"docker/make-certs.sh needs {' and '.join(missing)} (Debian: openssl, openssh-client)")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    skip_without_cert_tools()
    tmp = tmp_path_factory.mktemp("deploy")
    cache = os.environ.get("FEDCLIP_CACHE") or str(tmp_path_factory.mktemp("cache"))  # set it to reuse a built demo
    cfg = load_config(f"cache_dir={cache}")
    dep = Deployment(tmp, str(Path(cache).resolve()))
    dep.demo_root = dataset_root(cfg)
    model_name_or_path(cfg)  # builds the demo CLIP once, before the nodes share the cache
    if dep.netns_error:  # each SuperNode is a separate host (README): never quietly the same one
        if os.geteuid() == 0 and shutil.which("ip"):
            pytest.fail(f"network namespaces should work here (root, iproute2) but do not: {dep.netns_error}")
        pytest.skip(f"each SuperNode needs its own network namespace, which needs root and iproute2: {dep.netns_error}")
    try:
        dep.start_superlink()
        yield dep
    finally:
        dep.close()


def stream_run(
    dep: Deployment,
    overrides: str,
    on_line=None,
    timeout: float = 900,
    app: Path = REPO,
    run_config: tuple[str, ...] = (),
) -> tuple[str, list[Path]]:
    """`flwr run --stream` of an app against the deployment's SuperLink (more run-config in `run_config`); returns
    the streamed log
    and the new run folders."""
    before = set((dep.tmp / "outputs").glob("*/config.yaml"))  # run folders (beside them, the sites' clients/)
    more = [arg for value in run_config for arg in ("--run-config", value)]
    proc = subprocess.Popen(
        [str(BIN / "flwr"), "run", str(app), "fedclip", "--stream", "--run-config", f'overrides="{overrides}"', *more],
        env=dep.cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=dep.tmp,
        start_new_session=True,  # its own process group, which the deadline kills whole
    )
    lines, expired = [], threading.Event()

    def expire() -> None:
        """The deadline, kept when the stream falls silent too (a run waiting for a reply that never comes)."""
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log = "".join(lines)
    (dep.tmp / f"flwr-run-{len(list(dep.tmp.glob('flwr-run-*.log')))}.log").write_text(log)
    if expired.is_set():
        raise TimeoutError(f"flwr run took over {timeout} s:\n{''.join(lines[-80:])}")
    return log, sorted(p.parent for p in set((dep.tmp / "outputs").glob("*/config.yaml")) - before)


def flwr_run(dep: Deployment, overrides: str, on_line=None, timeout: float = 900) -> tuple[str, Path]:
    """`flwr run` of this app against the deployment's SuperLink; returns the streamed log and the run folder, which
    holds summary.json."""
    log, new = stream_run(dep, overrides, on_line, timeout)
    assert new and (new[-1] / "summary.json").is_file(), f"the run wrote no summary.json:\n{log[-8000:]}"
    return log, new[-1]


def test_documented_superlink_keeps_its_server_side_apis_local():
    """docs/deployment.md's SuperLink binds the ServerAppIo API (plain gRPC, no TLS in Flower 1.28: it takes a
    running run's
    messages given only the run id) and the Control API on its loopback; Flower's defaults would bind them on every
    interface. Only the Fleet API is left to its default, every interface: SuperNodes connect there. The deployments
    of this
    module and tests/test_pinned_deployment.py start the SuperLink on these hosts (`documented_bind_host`), and the
    latter
    probes them from a SuperNode's network namespace."""
    assert set(DOCUMENTED_SUPERLINK) == SUPERLINK_FLAGS - {"--fleet-api-address"}
    assert DOCUMENTED_SUPERLINK["--serverappio-api-address"] == "127.0.0.1:9091"
    assert DOCUMENTED_SUPERLINK["--control-api-address"] == "127.0.0.1:9093"
    assert {flag: documented_bind_host(flag) for flag in FLOWER_BIND_DEFAULTS} == {
        "--fleet-api-address": "0.0.0.0",
        "--control-api-address": "127.0.0.1",
        "--serverappio-api-address": "127.0.0.1",
    }
    # why the flags must be there
    assert all(address.startswith("0.0.0.0:") for address in FLOWER_BIND_DEFAULTS.values())


def test_superlink_without_certificates_refuses_to_start(tmp_path):
    """TLS is not optional: without certificates (and without an explicit --insecure) there is no SuperLink."""
    out = run(
        [
            str(BIN / "flower-superlink"),
            "--fleet-api-address",
            f"127.0.0.1:{free_port()}",
            "--control-api-address",
            f"127.0.0.1:{free_port()}",
            "--serverappio-api-address",
            f"127.0.0.1:{free_port()}",
        ],
        env=dict(os.environ, FLWR_HOME=str(tmp_path)),
        timeout=120,
    )
    assert out.returncode != 0 and "Certificates are required" in out.stdout + out.stderr


def test_unregistered_supernode_is_refused(deployment):
    dep = deployment
    proc = dep.start_supernode(9, "photo", key="intruder")  # a key nobody registered
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"an unregistered SuperNode was not refused within 90 s:\n{dep.log('supernode-photo-9')[-3000:]}")
    assert proc.returncode != 0
    assert "No SuperNode found with the given public key" in dep.log("supernode-photo-9")
    assert dep.online_nodes() == 0


@pytest.fixture(scope="module")
def nodes(deployment) -> Deployment:
    """Four registered SuperNodes, one per domain, online: what every test that runs the app needs (without them a run
    waits for nodes until flwr_run's timeout)."""
    dep = deployment
    for domain in DOMAINS:
        dep.register(domain)
    for index, domain in enumerate(DOMAINS):
        dep.start_supernode(index, domain)
    dep.wait_for(lambda: dep.online_nodes() == len(DOMAINS), 120, f"{len(DOMAINS)} SuperNodes")
    return dep


@pytest.fixture(scope="module")
def federated_run(nodes):
    """A 6-round FedCLIP run; the cartoon node is killed after round 2 and started again once the server lost it."""
    dep = nodes
    events: dict[str, float] = {}

    def on_line(line: str) -> None:
        row = ROW.search(line.split("INFO")[-1].strip()) if "|" in line else None
        if row and int(row.group(1)) == KILL_AFTER_ROUND and "killed" not in events:
            dep.kill(f"supernode-{KILLED}-{DOMAINS.index(KILLED)}")
            events["killed"] = time.time()
        if "killed" in events and "restarted" not in events and f"({KILLED}) lost" in line:
            events["lost"] = time.time()
            dep.start_supernode(len(DOMAINS), KILLED)  # comes back, as a new process on a new host
            events["restarted"] = time.time()

    t0 = time.time()
    log, folder = flwr_run(dep, f"training.rounds={ROUNDS}", on_line)
    print(
        f"flwr run of {ROUNDS} rounds: {time.time() - t0:.1f} s; node "
        f"lost {events.get('lost', 0) - events.get('killed', 0):.1f} s after the kill"
    )
    return json.loads((folder / "summary.json").read_text()), folder, log, events


def test_real_processes_train_fedclip_over_tls(federated_run):
    summary, folder, log, _ = federated_run
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows:
        print(f"round {row['round']}: {row['seconds']:.2f} s, val mean {row['val_acc_mean']}")
    held_out = summary["held_out"]
    assert summary["generalization"][held_out] > summary["zero_shot"][held_out]
    assert summary["personalization_mean"] > summary["zero_shot_train_domains_mean"]
    # the server learnt which node holds which domain from the nodes themselves; sketch never trained
    assert all(f"holds '{d}'" in log for d in DOMAINS)
    assert not any(k.startswith("sketch/") for r in rows for k in r["train"])


def test_lost_node_does_not_stop_the_run_and_comes_back(deployment, federated_run):
    summary, folder, log, events = federated_run
    assert "killed" in events and "restarted" in events, log[-6000:]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    lost_rounds = [r["round"] for r in rows if r["round"] > 0 and f"{KILLED}/train-loss" not in r["train"]]
    # row r is printed once round r+1's exchange (which carries round r's evaluation) is done, so the node
    # dies during round r+2's exchange: that round went on without it
    assert lost_rounds and min(lost_rounds) == KILL_AFTER_ROUND + 2, lost_rounds
    assert all(f"{d}/train-loss" in rows[min(lost_rounds)]["train"] for d in DOMAINS if d not in (KILLED, "sketch"))
    assert re.search(rf"node \d+ \({KILLED}\) lost: .*Node Unavailable", log)  # the log names the lost node
    # the restarted SuperNode (same registered key, so the same node id; or a new id, then the log
    # says it rejoined) trains again: the new process received train messages
    assert f"{KILLED}/train-loss" in rows[-1]["train"]
    assert "Receiving: train message" in deployment.log(f"supernode-{KILLED}-{len(DOMAINS)}")


def test_resume_from_checkpoint(deployment, federated_run):
    _, folder, _, _ = federated_run
    log, resumed = flwr_run(deployment, f"training.rounds={ROUNDS + 1} resume={folder}")
    assert f"resumed from {folder} after round {ROUNDS}" in log
    old = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in new] == list(range(ROUNDS + 2))
    assert new[: ROUNDS + 1] == old  # earlier rounds carried over, not re-run
    assert "round | train loss" in log and json.loads((resumed / "summary.json").read_text())["rounds"] == ROUNDS + 1


def test_secure_aggregation_over_tls(nodes):
    """SecAgg+ across real SuperNodes: four exchanges a round, the masked vectors (int64) up, the run complete."""
    live = [name for name, proc in nodes.procs.items() if name.startswith("supernode-") and proc.poll() is None]
    before = {name: len(nodes.log(name)) for name in live}
    log, folder = flwr_run(nodes, "training.rounds=2 strategy.secagg.enabled=true")
    assert "Traceback" not in log and "Secure aggregation halted" not in log, log[-4000:]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # each training node gets the 4 SecAgg+ stages a round as train messages (setup, share keys, masked vectors, unmask)
    received = {name.split("-")[1]: nodes.log(name)[before[name] :].count("Receiving: train message") for name in live}
    assert received == {d: 0 if d == "sketch" else 4 * 2 for d in DOMAINS}, received
    summary = json.loads((folder / "summary.json").read_text())
    # masked int64 against float32
    assert summary["bytes_up_per_client_per_round"] > summary["bytes_down_per_client_per_round"]


def test_promptfl_over_tls(nodes):
    """PromptFL across real SuperNodes: only the context vectors travel, and the held-out domain is evaluated with
    them."""
    log, folder = flwr_run(nodes, "training.rounds=1 method=promptfl")
    assert "Traceback" not in log, log[-4000:]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "promptfl" and summary["generalization"]["sketch"] is not None
    assert summary["trained_parameters"] == 4 * 64  # "a picture of a": 4 vectors of the demo CLIP's text width
    # the context (1 KiB) and the .npy header, not an adapter (33 KiB)
    assert summary["bytes_up_per_client_per_round"] < 2048
    assert (folder / "prompt_final.safetensors").exists()


@pytest.mark.parametrize(
    "method,options,sites_keep",
    [
        ("conditioned_prompt", "", True),
        ("clustered_prompt", "", True),  # each site's cluster context
        ("two_tower_prompt", "", False),
        ("promptfl", "method.personalize_epochs=1", True),  # each site's context, fine-tuned after the last round
    ],  # personal_prompt: the restart test below
)
def test_the_other_prompt_methods_over_tls(nodes, method, options, sites_keep):
    """The prompt methods beyond PromptFL, and PromptFL fine-tuned at each site, across real SuperNodes, one round: each
    site reports its personalization and, for a method with a part of its own, writes its own weights to its own
    folder (never the server's)."""
    log, folder = flwr_run(nodes, f"training.rounds=1 method={method} {options}")
    assert "Traceback" not in log, log[-4000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == method and summary["rounds"] == 1 and summary["generalization"]["sketch"] is not None
    assert all(summary["personalization"][d] is not None for d in DOMAINS if d != "sketch")
    key = json.loads((folder / "run.json").read_text())["run_key"]
    sites = {p.parent.name for p in (nodes.tmp / "outputs" / "clients" / key).glob("*/prompt_final.safetensors")}
    assert sites == ({d for d in DOMAINS if d != "sketch"} if sites_keep else set())


RESTARTED = "photo"  # a training domain whose SuperNode restarts between a stop and the resume


def metric_rows(folder: Path) -> list[dict]:
    """Each round's metrics as a run folder has them, without wall-clock times."""
    rows = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = {k: v for k, v in json.loads(line).items() if k in ("round", "evaluate", "train")}
        row["train"] = {k: v for k, v in row["train"].items() if not k.endswith("seconds")}
        rows.append(row)
    return rows


def test_runs_resumed_after_a_site_restarted_end_as_the_runs_uninterrupted(nodes):
    """FedCLIP and personal_prompt, 1 round each; then the photo SuperNode is killed and started again (a new process:
    Flower's state is gone, and a resumed run is a new Flower run for every site); then each run resumes to round 2:
    every site restores what its client kept (optimiser moments, the personal part) from its own folder, so every row
    equals the uninterrupted run's."""
    methods = ("fedclip", "personal_prompt")
    uninterrupted = {m: flwr_run(nodes, f"training.rounds=2 method={m}")[1] for m in methods}
    stopped = {m: flwr_run(nodes, f"training.rounds=1 method={m}")[1] for m in methods}
    [old] = [n for n, proc in nodes.procs.items() if n.startswith(f"supernode-{RESTARTED}-") and proc.poll() is None]
    nodes.kill(old)
    # the SuperLink takes a node for offline 2 heartbeats (60 s) after its last; one started before is refused
    nodes.wait_for(lambda: nodes.online_nodes() == len(DOMAINS) - 1, 180, f"the old {RESTARTED} SuperNode offline")
    index = 10 + len(nodes.namespaces)  # a network namespace no node had
    nodes.start_supernode(index, RESTARTED)
    new = f"supernode-{RESTARTED}-{index}"
    nodes.wait_for(lambda: "SuperNode ID" in nodes.log(new), 120, f"the restarted {RESTARTED} SuperNode")
    for method in methods:
        log, resumed = flwr_run(nodes, f"training.rounds=2 method={method} resume={stopped[method]}")
        assert f"resumed from {stopped[method]} after round 1" in log
        assert metric_rows(resumed) == metric_rows(uninterrupted[method]), method
    assert nodes.log(new).count("Receiving: train message") == 2  # the new process trained round 2 of both runs
