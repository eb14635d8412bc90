"""Flower's simulation on a Ray cluster of two nodes on this machine, with docs/scale.md's commands.

A Ray head and a Ray worker, 1 CPU each, run in their own network namespaces (`ip netns`, one veth pair between
them), each with its own `/tmp/ray` (a tmpfs in a private mount namespace: a worker takes its temporary folder from
the head, so `--temp-dir` would not separate them, and a head's `/tmp/ray/ray_current_cluster` on this machine would
capture every later `flwr run`). `flwr run` runs in the head's namespaces, as a user runs it there. The commands are
read from docs/scale.md's ```bash blocks and run as they are, with HEAD_IP, NODE_IP and CPUS set.

The cases share one cluster (a module fixture): 8 clients, 3 rounds on the demo, spread over both nodes; the same run
with RAY_ADDRESS=local beside the head (it must not touch the cluster) ends with the same accuracies and bit-identical
weights; and a worker that cannot import the app fails the run loudly. Where network namespaces cannot be made the
module is skipped, saying why, unless the machine promised them (root, with iproute2): then it fails. Every process
of the namespaces is killed by its PID at the end (never `ray stop`: it kills every Ray process on the machine), and
the namespaces are deleted, which removes the veth pair and, with the last process, the mount namespaces and tmpfs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common.config import load_config
from common.data import dataset_root
from common.model import model_name_or_path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # ray, flwr, python
DOC = REPO / "docs" / "scale.md"
TAG = os.getpid() % 100000
SUBNET = f"192.168.{100 + os.getpid() % 100}"  # tests/test_deployment.py uses 10.200-249.x.x
HEAD_IP, WORKER_IP = f"{SUBNET}.1", f"{SUBNET}.2"
NAMESPACES = {"head": f"fcray{os.getpid()}h", "worker": f"fcray{os.getpid()}w"}  # the pid: remove_stale_clusters
TOOLS = ("ip", "unshare", "nsenter", "mount")  # iproute2, util-linux, mount
RUN_TIMEOUT = 300  # a run takes about 30 s here
# what summary.json reports as accuracy; the rest (seconds, run folder, Flower's run id) differs between runs
ACCURACY_KEYS = (
    "zero_shot",
    "best_round",
    "best_val_acc_mean",
    "generalization",
    "personalization",
    "personalization_mean",
    "zero_shot_train_domains_mean",
)


def documented_commands() -> dict[str, str]:
    """docs/scale.md's ```bash blocks by what they do: head, worker, run (on the cluster), local, tasks."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.DOTALL)
    kinds = {
        "head": lambda b: "ray start --head" in b,
        "worker": lambda b: "ray start --address" in b,
        "run": lambda b: 'RAY_ADDRESS="$HEAD_IP:6379" flwr run' in b and "resume=" not in b,
        "resume": lambda b: 'RAY_ADDRESS="$HEAD_IP:6379" flwr run' in b and "resume=$RUN_FOLDER" in b,
        "local": lambda b: "RAY_ADDRESS=local flwr run" in b,
        "tasks": lambda b: "GetTaskEvents" in b,
    }
    found = {}
    for kind, match in kinds.items():
        matching = [b for b in blocks if match(b)]
        assert len(matching) == 1, f"docs/scale.md should have one ```bash block for {kind}, not {len(matching)}"
        found[kind] = matching[0]
    return found


COMMANDS = documented_commands()


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def kill_pids(pids: set[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` seconds; waits until they are gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while (pids := {p for p in pids if _alive(p)}) and time.time() < deadline:
            time.sleep(0.2)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def remove_stale_clusters() -> None:
    """The namespaces of an earlier run of this module whose pytest is gone (killed before its teardown): kill the Ray
    processes left in them, by PID, and delete them. Left alone they hold memory, never a run: their Ray head's address
    and GCS port stay inside their own mount and network namespaces."""
    stale = []
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        match = re.fullmatch(r"(fcray(\d+)[hw])( \(id: \d+\))?", line.strip())
        if match and not Path(f"/proc/{match.group(2)}").exists():
            stale.append(match.group(1))
    kill_pids({int(p) for ns in stale for p in run(["ip", "netns", "pids", ns]).stdout.split()})
    for ns in stale:
        run(["ip", "netns", "del", ns])


def ray_temp_dir(env: dict[str, str]) -> Path:
    """The temporary folder Ray uses with this environment (ray._common.utils.get_ray_temp_dir)."""
    return Path(env.get("RAY_TMPDIR") or env.get("TMPDIR") or "/tmp") / "ray"


class Cluster:
    """A Ray head and a Ray worker, each in its own network and mount namespaces."""

    def __init__(self, tmp: Path, cache: str) -> None:
        self.tmp, self.cache = tmp, cache
        self.namespaces: list[str] = []
        self.anchor: dict[str, int] = {}  # a process in each node's namespaces, for nsenter
        self.env = dict(
            os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", FEDCLIP_CACHE=cache, CPUS="1"
        )
        for name in ("PYTHONPATH", "RAY_ADDRESS", "FLWR_HOME", "FEDCLIP_OUTPUTS"):  # nothing of the caller's
            self.env.pop(name, None)
        self.ray_tmp = ray_temp_dir(self.env)

    @staticmethod
    def probe() -> str | None:
        """None if network and mount namespaces can be made here, else why not."""
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            return f"no {', '.join(missing)} (Debian: iproute2, util-linux, mount)"
        name = f"fcrayprobe{os.getpid()}"
        out = run(["ip", "netns", "add", name])
        if out.returncode != 0:
            return f"`ip netns add` failed: {out.stderr.strip()}"
        run(["ip", "netns", "del", name])
        return None

    def make_network(self) -> None:
        head, worker = NAMESPACES["head"], NAMESPACES["worker"]
        head_if, worker_if = f"fcrh{TAG}", f"fcrw{TAG}"
        for cmd in (
            ["ip", "netns", "add", head],
            ["ip", "netns", "add", worker],
            ["ip", "link", "add", head_if, "type", "veth", "peer", "name", worker_if],
            ["ip", "link", "set", head_if, "netns", head],
            ["ip", "link", "set", worker_if, "netns", worker],
            ["ip", "-n", head, "addr", "add", f"{HEAD_IP}/24", "dev", head_if],
            ["ip", "-n", worker, "addr", "add", f"{WORKER_IP}/24", "dev", worker_if],
            ["ip", "-n", head, "link", "set", head_if, "up"],
            ["ip", "-n", worker, "link", "set", worker_if, "up"],
            ["ip", "-n", head, "link", "set", "lo", "up"],
            ["ip", "-n", worker, "link", "set", "lo", "up"],
        ):
            out = run(cmd)
            assert out.returncode == 0, f"{cmd}: {out.stderr}"
            if cmd[:3] == ["ip", "netns", "add"]:
                self.namespaces.append(cmd[3])

    def pids(self, *namespaces: str) -> set[int]:
        """Every process in these network namespaces (default: the cluster's: its Ray nodes, and what ran in the
        head's)."""
        found = set()
        for ns in namespaces or self.namespaces:
            out = run(["ip", "netns", "pids", ns])
            found |= {int(p) for p in out.stdout.split()}
        return found

    def start_node(self, node: str, ip: str) -> None:
        """docs/scale.md's `ray start` for this node, in its network namespace and a private mount namespace whose
        Ray temporary folder is a tmpfs of its own."""
        ns = NAMESPACES[node]
        self.ray_tmp.mkdir(parents=True, exist_ok=True)  # the mount point; Ray makes it on first use anyway
        script = 'mount -t tmpfs -o size=512m fcray "$1" && exec bash -euo pipefail -c "$2"'
        log = self.tmp / f"ray-start-{node}.log"
        with open(log, "w") as fh:
            out = subprocess.run(
                ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private"]
                + ["bash", "-c", script, "node", str(self.ray_tmp), COMMANDS[node]],
                env=dict(self.env, NODE_IP=ip, HEAD_IP=HEAD_IP),
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                timeout=180,
                check=False,
            )
        assert out.returncode == 0, f"ray start ({node}) failed:\n{log.read_text()[-4000:]}"
        process = "gcs_server" if node == "head" else "raylet"
        for pid in self.pids(ns):
            try:
                program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if program.endswith(process.encode()):
                self.anchor[node] = pid
        assert node in self.anchor, f"no {process} in {ns} after ray start:\n{log.read_text()[-4000:]}"

    def enter(self, node: str) -> list[str]:
        return ["nsenter", "--target", str(self.anchor[node]), "--net", "--mount", "--"]

    def enter_mount(self, node: str) -> list[str]:
        return ["nsenter", "--target", str(self.anchor[node]), "--mount", "--"]

    def on_head(self, command: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """A docs/scale.md command in the head's namespaces, from the app's folder."""
        return run(
            [*self.enter("head"), "bash", "-euo", "pipefail", "-c", f"cd {shlex.quote(str(REPO))}\n{command}"],
            env=dict(self.env, HEAD_IP=HEAD_IP, **env),
            timeout=timeout,
        )

    def alive_nodes(self) -> list[str]:
        code = (
            "import sys, grpc\n"
            "from ray.core.generated import gcs_service_pb2 as pb, gcs_service_pb2_grpc as rpc\n"
            "nodes = rpc.NodeInfoGcsServiceStub(grpc.insecure_channel(sys.argv[1]))"
            ".GetAllNodeInfo(pb.GetAllNodeInfoRequest(), timeout=30).node_info_list\n"
            "print(' '.join(sorted(n.node_manager_address for n in nodes if n.state == 0)))\n"
        )
        out = self.on_head(f"python -c {shlex.quote(code)} {HEAD_IP}:6379")
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.split()

    def tasks(self) -> dict[tuple[str, str, str], int]:
        """docs/scale.md's task count: (Ray job, node address, ok/failed) -> ClientAppActor.run tasks."""
        out = self.on_head(COMMANDS["tasks"])
        assert out.returncode == 0, out.stdout + out.stderr
        counts = {}
        for line in out.stdout.splitlines():
            job, node, outcome, count = line.split()
            counts[job, node, outcome] = int(count)
        return counts

    def settled_tasks(self) -> dict[tuple[str, str, str], int]:
        """The task counts once the nodes' task events (reported every second) have reached the GCS."""
        last = self.tasks()
        for _ in range(10):
            time.sleep(2)
            now = self.tasks()
            if now == last:
                return now
            last = now
        return last

    def flwr_run(
        self,
        command: str,
        name: str,
        timeout: float = RUN_TIMEOUT,
        while_running: Callable[[Path], None] | None = None,
        **env: str,
    ) -> tuple[str, Path | None]:
        """A docs/scale.md `flwr run` in the head's namespaces, with a private FLWR_HOME and output folder; every
        process it left (its SuperLink, a local Ray) is stopped after. `while_running(output folder)` is called once
        the run started; `env`: more of its environment. Returns the log and the run folder (or None)."""
        folder = self.tmp / name
        home = folder / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        log = folder / "flwr.log"
        env = dict(self.env, **env, HEAD_IP=HEAD_IP, FLWR_HOME=str(home), FEDCLIP_OUTPUTS=str(folder))
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [*self.enter("head"), "bash", "-euo", "pipefail", "-c", f"cd {shlex.quote(str(REPO))}\n{command}"],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                if while_running is not None:
                    while_running(folder)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"flwr run ({name}) still running after {timeout} s:\n{log.read_text()[-6000:]}")
            finally:
                self.stop_run(home)
        runs = sorted(p for p in folder.glob("*/config.yaml"))
        return log.read_text(errors="replace"), runs[-1].parent if runs else None

    @staticmethod
    def stop_run(home: Path) -> None:
        """Every process of one `flwr run` (the CLI, the SuperLink it leaves, flwr-simulation, a local Ray): they all
        carry its FLWR_HOME in their environment, and nothing else does."""
        pids = {
            int(proc.name)
            for proc in Path("/proc").iterdir()
            if proc.name.isdigit() and environ_of(int(proc.name)).get("FLWR_HOME") == str(home)
        }
        kill_pids(pids)

    def hide(self, paths: list[Path]) -> list[Path]:
        """Mount an empty folder over each path in the worker's mount namespace only; returns those mounted."""
        empty = self.tmp / "empty"
        empty.mkdir(exist_ok=True)
        mounted = []
        for path in paths:
            out = run([*self.enter_mount("worker"), "mount", "--bind", str(empty), str(path)])
            assert out.returncode == 0, f"mount over {path} in the worker: {out.stderr}"
            mounted.append(path)
        return mounted

    def unhide(self, paths: list[Path]) -> None:
        for path in paths:
            run([*self.enter_mount("worker"), "umount", str(path)])

    def close(self) -> list[str]:
        """Kill every process of the namespaces, delete them; returns what could not be cleaned up."""
        problems = []
        kill_pids(self.pids())
        if left := self.pids():
            problems.append(f"processes left in the namespaces: {sorted(left)}")
        for ns in self.namespaces:  # deleting a namespace removes its end of the veth pair, and so the pair
            out = run(["ip", "netns", "del", ns])
            if out.returncode != 0:
                problems.append(f"ip netns del {ns}: {out.stderr.strip()}")
        mounts = Path("/proc/mounts").read_text()
        if " fcray " in mounts or mounts.startswith("fcray "):
            problems.append("a Ray tmpfs (fcray) is still mounted on this machine")
        return problems


@pytest.fixture(scope="module")
def cluster(demo_cache):
    netns_error = Cluster.probe()
    if netns_error:  # each Ray node is a separate host (docs/scale.md): never quietly the same one
        if os.geteuid() == 0 and all(shutil.which(tool) for tool in TOOLS):
            pytest.fail(f"network namespaces should work here (root, {', '.join(TOOLS)}) but do not: {netns_error}")
        pytest.skip(
            f"each Ray node needs its own network and mount namespaces (root, {', '.join(TOOLS)}): {netns_error}"
        )
    cache = str(Path(demo_cache).resolve())
    cfg = load_config(f"cache_dir={cache}")
    dataset_root(cfg)  # builds the demo once, before the nodes share the cache
    model_name_or_path(cfg)
    # a short folder: Ray's socket paths under it must stay within 107 characters
    c = Cluster(Path(tempfile.mkdtemp(prefix="fcray")), cache)
    host_address_file = c.ray_tmp / "ray_current_cluster"
    had_address_file = host_address_file.exists()
    remove_stale_clusters()
    try:
        t0 = time.time()
        c.make_network()
        c.start_node("head", HEAD_IP)
        c.start_node("worker", WORKER_IP)
        deadline = time.time() + 60
        while (nodes := c.alive_nodes()) != sorted([HEAD_IP, WORKER_IP]):
            assert time.time() < deadline, f"the cluster has nodes {nodes}, not the head and the worker"
            time.sleep(1)
        print(f"two-node Ray cluster up in {time.time() - t0:.1f} s")
        # the head wrote its address into its own /tmp/ray, not this machine's (where it would capture every run)
        assert host_address_file.exists() == had_address_file, "the head wrote this machine's ray_current_cluster"
        yield c
    finally:
        problems = c.close()
        shutil.rmtree(c.tmp, ignore_errors=True)
        assert not problems, problems


def excerpt(log: str) -> str:
    """What explains a failed run: the log's ERROR and WARNING lines (the ServerApp's, Ray's), then its end."""
    lines = [line for line in log.splitlines() if "ERROR" in line or "WARNING" in line]
    return "\n".join(lines)[-6000:] + "\n...\n" + log[-3000:]


def summary_of(folder: Path | None, log: str) -> dict:
    assert folder is not None and (folder / "summary.json").is_file(), f"the run wrote no summary.json:\n{excerpt(log)}"
    return json.loads((folder / "summary.json").read_text())


def new_jobs(before: dict, after: dict) -> set[str]:
    return {job for job, _, _ in after} - {job for job, _, _ in before}


@pytest.fixture(scope="module")
def cluster_run(cluster):
    """docs/scale.md's run on the cluster: the log, the run folder and the Ray tasks of its job by node and outcome."""
    before = cluster.tasks()
    t0 = time.time()
    log, folder = cluster.flwr_run(COMMANDS["run"], "cluster")
    print(f"flwr run on the cluster: {time.time() - t0:.1f} s")
    summary = summary_of(folder, log)
    after = cluster.settled_tasks()
    jobs = new_jobs(before, after)
    assert len(jobs) == 1, f"the run should be one new Ray job on the cluster, not {sorted(jobs)}"
    [job] = jobs
    return log, folder, summary, {(node, outcome): n for (j, node, outcome), n in after.items() if j == job}


def test_clients_ran_on_both_nodes(cluster_run):
    log, _, summary, tasks = cluster_run
    assert summary.get("status", "completed") == "completed", excerpt(log)
    assert summary["rounds"] == 3
    ran = {node: n for (node, outcome), n in tasks.items() if outcome == "ok"}
    print(f"ClientAppActor.run tasks by node: {ran}")
    assert set(ran) == {HEAD_IP, WORKER_IP}, tasks  # both nodes ran client messages
    assert not any(outcome == "failed" for _, outcome in tasks), tasks


def tensors_of(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and each tensor's dtype, shape and bytes."""
    with safe_open(str(path), framework="pt") as fh:
        tensors = {}
        for key in fh.keys():
            t = fh.get_tensor(key)
            tensors[key] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return fh.metadata(), tensors


def test_cluster_run_equals_one_node_run(cluster, cluster_run):
    """docs/scale.md's RAY_ADDRESS=local run, on the head's machine beside the head: it runs on a Ray of its own (no
    task of it reaches the cluster) and ends as the cluster's run did."""
    _, cluster_folder, cluster_summary, _ = cluster_run
    local = COMMANDS["local"]
    assert local == COMMANDS["run"].replace('RAY_ADDRESS="$HEAD_IP:6379"', "RAY_ADDRESS=local"), (
        "docs/scale.md's local run should be its cluster run with RAY_ADDRESS=local"
    )
    before = cluster.tasks()
    t0 = time.time()
    log, folder = cluster.flwr_run(local, "local")
    print(f"flwr run with RAY_ADDRESS=local: {time.time() - t0:.1f} s")
    summary = summary_of(folder, log)
    assert cluster.settled_tasks() == before, "the RAY_ADDRESS=local run ran tasks on the cluster"
    assert summary.get("status", "completed") == "completed", excerpt(log)
    assert {k: summary[k] for k in ACCURACY_KEYS} == {k: cluster_summary[k] for k in ACCURACY_KEYS}
    # the tensors bit for bit (safetensors orders its metadata keys differently in each process, so not the file)
    assert tensors_of(folder / "adapter_final.safetensors") == tensors_of(cluster_folder / "adapter_final.safetensors")


def app_folders() -> list[Path]:
    """Where a Python on this machine imports the app's packages from, outside any FAB (the installed copy: this
    checkout for `pip install -e .`)."""
    code = (
        "import importlib.util as u\n"
        "for name in ('client_app', 'server_app', 'common'):\n"
        "    spec = u.find_spec(name)\n"
        "    for p in (spec.submodule_search_locations or []) if spec else []: print(p)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run([sys.executable, "-c", code], env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    return [Path(p) for p in out.stdout.split()]


def test_worker_without_the_app_fails_the_run(cluster):
    """The worker cannot import the app: neither the run's FAB (the driver's FLWR_HOME/apps, on its PYTHONPATH) nor the
    installed copy. Every client it runs fails; the ServerApp ends with an error naming the failed clients and the
    ModuleNotFoundError, and summary.json says so. Runs last: it changes the worker until it ends."""
    home = cluster.tmp / "hidden" / "flwr-home"
    home.mkdir(parents=True)  # the FAB is installed under it once the run starts: hidden from the worker before that
    hidden = cluster.hide([home, *app_folders()])
    try:
        before = cluster.tasks()
        t0 = time.time()
        log, folder = cluster.flwr_run(COMMANDS["run"], "hidden")
        print(f"flwr run with the app hidden from the worker: {time.time() - t0:.1f} s")
        after = cluster.settled_tasks()
    finally:
        cluster.unhide(hidden)
    summary = summary_of(folder, log)
    assert summary.get("status") == "failed", json.dumps(summary, indent=1)[:4000]
    failed = summary.get("failed_clients")
    assert isinstance(failed, dict) and failed, json.dumps(summary, indent=1)[:4000]
    reasons = {name: reason for clients in failed.values() for name, reason in clients.items()}
    assert reasons and all(isinstance(r, str) for r in reasons.values()), failed
    assert any("ModuleNotFoundError" in r and "client_app" in r for r in reasons.values()), reasons
    # the ServerApp's log names the failed clients and the error
    assert "ModuleNotFoundError: No module named 'client_app" in log, excerpt(log)
    for name in reasons:
        assert name.split()[-1] in log, f"the log does not name the failed client {name}"
    # Ray's own record: the failed client messages are the worker's, and it had some
    [job] = new_jobs(before, after)
    failed_on = {node: n for (j, node, outcome), n in after.items() if j == job and outcome == "failed"}
    assert set(failed_on) == {WORKER_IP}, after


@pytest.fixture(scope="module")
def lost_worker_run(cluster) -> tuple[str, Path | None]:
    """docs/scale.md's run, with the worker node killed (every process in its namespace) once the run has written its
    first row. The tests that use it run last: the cluster has no worker after it."""

    def kill_the_worker(folder: Path) -> None:
        deadline = time.time() + RUN_TIMEOUT
        while not any(p.stat().st_size for p in folder.glob("*/metrics.jsonl")):
            assert time.time() < deadline, "the run wrote no row"
            time.sleep(0.2)
        kill_pids(cluster.pids(NAMESPACES["worker"]))

    return cluster.flwr_run(COMMANDS["run"], "lost-worker", while_running=kill_the_worker)


def test_a_worker_lost_mid_run_stops_the_run_naming_its_clients(cluster, lost_worker_run):
    """The worker node dies once the run has written its first row. Flower turns Ray's ActorDiedError for each message
    the dead actor was given into an error reply, and its actor pool keeps giving the dead actor messages, which fail
    at once (tried with strategy.min_train_fraction=0: 7 of 8 clients failed in each later round). So the round loses
    most of its training clients, and the run stops there with an error that names them and Ray's reason; summary.json
    says failed and lists them."""
    log, folder = lost_worker_run
    summary = summary_of(folder, log)
    assert cluster.alive_nodes() == [HEAD_IP]
    assert summary.get("status") == "failed", json.dumps(summary, indent=1)[:4000]
    assert "training clients failed" in summary["error"] and "min_train_fraction" in summary["error"], summary
    failed = summary.get("failed_clients")
    assert isinstance(failed, dict) and failed, json.dumps(summary, indent=1)[:4000]
    reasons = {name: reason for clients in failed.values() for name, reason in clients.items()}
    assert all("ray.exceptions.ActorDiedError" in reason for reason in reasons.values()), reasons
    for name in reasons:
        assert name in log, f"the log does not name the failed client {name}"


def test_the_run_resumed_on_the_nodes_left_ends_as_the_run_uninterrupted(cluster, cluster_run, lost_worker_run):
    """docs/scale.md's resume, on the head alone after the worker died: a new actor pool on the live node goes on from
    the failed run's last checkpoint, keeps its rows, and ends with the adapter of the same run on both nodes
    uninterrupted, to the bit (the clients' optimiser moments come back from their sites' folders, whichever node
    wrote them)."""
    _, cluster_folder, cluster_summary, _ = cluster_run
    _, lost = lost_worker_run
    finished = [json.loads(line)["round"] for line in (lost / "metrics.jsonl").read_text().splitlines()]
    assert finished and max(finished) < 3, finished
    before = cluster.tasks()
    # the same outputs folder as the failed run's: the sites' folders (their kept state) are under it
    log, folder = cluster.flwr_run(COMMANDS["resume"], "lost-worker", RUN_FOLDER=str(lost))
    assert folder != lost
    summary = summary_of(folder, log)
    assert summary.get("status", "completed") == "completed", excerpt(log)
    assert f"going on with round {max(finished) + 1}" in log, excerpt(log)
    rows = [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3], rows
    after = cluster.settled_tasks()
    [job] = new_jobs(before, after)
    assert {(node, outcome) for (j, node, outcome), n in after.items() if j == job and n} == {(HEAD_IP, "ok")}, after
    assert {k: summary[k] for k in ACCURACY_KEYS} == {k: cluster_summary[k] for k in ACCURACY_KEYS}
    assert tensors_of(folder / "adapter_final.safetensors") == tensors_of(cluster_folder / "adapter_final.safetensors")
