"""App pinning across real processes: a SuperLink (TLS, SuperNode authentication) and two SuperNodes in their own
network
namespaces, each with a warm ClientApp (`--isolation process`) that runs only the app its site approved: the photo
site by
its approved-apps file, the sketch site by a signature of a key it trusts, which comes with the run (run-config
fab-signature).

The approved app trains; the same app with one line changed (it writes a marker file when its ClientApp module is
imported) is refused by every site before any of its code runs, the ServerApp names each refusal and the run stops at
once. The SuperLink's server-side APIs, bound to its loopback as docs/deployment.md binds them (ServerAppIo, which
takes a
running run's messages given only the run id, and Control), refuse connections from a SuperNode's namespace while a run
works: only the Fleet API answers there.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from gate.pinning import fab_sha256
from tests.conftest import write_image_folder
from tests.test_deployment import (
    BIN,
    DOCUMENTED_SUPERLINK,
    REPO,
    ROW,
    Deployment,
    documented_bind_host,
    run,
    skip_without_cert_tools,
    stream_run,
)
from tests.test_pinning import app_copy

SITES = ("photo", "sketch")  # sketch is held out: photo trains


def overrides(clip: Path) -> str:
    return f"dataset=folder dataset.held_out=sketch model.name_or_path={clip} training.rounds=2 training.batch_size=8"


def changed_copy(dest: Path, marker: Path, approved: str) -> Path:
    """This app's files (what git tracks or would track: the approved FAB) with one line added to the ClientApp: it
    writes `marker`
    on import."""
    app_copy(dest)
    assert fab_sha256(build_fab_from_disk(dest)) == approved  # unchanged, the copy is the approved app
    with open(dest / "client_app" / "app.py", "a") as app:
        app.write(f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('the changed app ran')\n")
    return dest


@pytest.fixture(scope="module")
def pinned(tmp_path_factory, tiny_clip):
    skip_without_cert_tools()
    tmp = tmp_path_factory.mktemp("pinned")
    dep = Deployment(tmp, str(tmp / "cache"))
    dep.demo_root = write_image_folder(tmp / "data", domains=SITES, per_class=6)
    # the release's publisher: a signing key (the sketch site trusts it) and the release's hash and signature
    keygen = run([sys.executable, "-m", "gate.approve", "--keygen", str(tmp / "release-key")], cwd=REPO)
    out = run([sys.executable, "-m", "gate.approve", str(REPO), "--sign", str(tmp / "release-key")], cwd=REPO)
    assert keygen.returncode == 0 and out.returncode == 0, keygen.stderr + out.stderr
    approval_line, signature = out.stdout.splitlines()
    (tmp / "approved-apps.txt").write_text(f"# approved by the photo site after review\n{approval_line}\n")
    (tmp / "trusted-keys.yaml").write_text(keygen.stdout)
    policies = {
        "photo": ["--approved-apps", str(tmp / "approved-apps.txt")],
        "sketch": ["--trusted-keys", str(tmp / "trusted-keys.yaml")],
    }
    try:
        dep.start_superlink()
        for index, site in enumerate(SITES):
            dep.register(site)
            dep.start_supernode(index, site, warm=policies[site])
        dep.wait_for(lambda: dep.online_nodes() == len(SITES), 120, f"{len(SITES)} SuperNodes")
        yield dep, approval_line.split()[0], signature
    finally:
        dep.close()


def connects(dep: Deployment, port: int) -> str:
    """From the first SuperNode's network namespace, a TCP connection to the SuperLink's host (`superlink`) at
    `port`: 'open',
    or the error (ConnectionRefusedError: nothing listens on the address the namespace reaches)."""
    probe = (
        f"import socket\ns = socket.socket(); s.settimeout(5)\ntry:\n s.connect(('superlink', {port})); print('open')\n"
        "except OSError as err:\n print(type(err).__name__)"
    )
    return run(["ip", "netns", "exec", dep.namespaces[0], sys.executable, "-c", probe]).stdout.strip()


def connects_locally(port: int) -> str:
    """The same from the SuperLink's own host, over loopback (where its ServerApp connects from)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return "open"
    except OSError as err:
        return type(err).__name__


@pytest.fixture(scope="module")
def approved_run(pinned, tiny_clip):
    """The approved app's run: its log and run folders, and what the SuperLink's ports answered while it ran (probed
    once the
    first row of the per-round table is out: the ServerApp is connected and a round is still to come)."""
    dep, _, signature = pinned
    probes: dict[str, str] = {}

    def on_line(line: str) -> None:
        if probes or not dep.namespaces or "|" not in line or not ROW.search(line.split("INFO")[-1].strip()):
            return
        for api, port in (("fleet", dep.fleet), ("control", dep.control), ("serverappio", dep.serverappio)):
            probes[f"{api} from a SuperNode's host"] = connects(dep, port)
            probes[f"{api} from the SuperLink's host"] = connects_locally(port)

    log, folders = stream_run(dep, overrides(tiny_clip), on_line=on_line, run_config=(signature,))
    return log, folders, probes


def test_the_approved_app_trains(pinned, approved_run):
    dep, sha256, _ = pinned
    log, folders, _ = approved_run
    assert folders and (folders[-1] / "summary.json").is_file(), log[-6000:]
    rows = [json.loads(line) for line in (folders[-1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and "photo/train-loss" in rows[-1]["train"]
    for index, site in enumerate(SITES):
        assert f"app fedclip/fedclip 0.1.0 with SHA-256 {sha256} is approved: it runs" in dep.log(
            f"warm-{site}-{index}"
        )


def test_a_changed_app_is_refused_by_every_site_before_it_runs(pinned, tiny_clip, tmp_path):
    dep, sha256, signature = pinned
    marker = tmp_path / "changed-app-ran"
    app = changed_copy(tmp_path / "fedclip", marker, sha256)
    t0 = time.time()
    # the release's signature
    log, folders = stream_run(dep, overrides(tiny_clip), timeout=300, app=app, run_config=(signature,))
    seconds = time.time() - t0
    print(f"the refused run ended after {seconds:.1f} s")
    assert not marker.exists(), "the changed ClientApp was imported on a site"
    assert not folders, "a run folder was written for an app nobody ran"
    refusals = re.findall(
        r"node (\d+) refused the app: node (\d+) \((\w+)\) refused the app: app fedclip/fedclip 0.1.0 with SHA-256 "
        r"([0-9a-f]{64}) is not approved: (.*?)\. To run",
        log,
    )
    assert sorted(site for _, _, site, _, _ in refusals) == sorted(SITES), log[-6000:]
    assert all(a == b for a, b, *_ in refusals) and len({r[3] for r in refusals}) == 1 and refusals[0][3] != sha256
    reasons = {site: reason for _, _, site, _, reason in refusals}
    assert reasons["photo"].startswith("its SHA-256 is not in the approved-apps file")
    assert reasons["sketch"].startswith("its fab-signature by fpk_") and "does not match this FAB" in reasons["sketch"]
    assert "2 of 2 node(s) refused to run this app" in log
    assert seconds < 120, f"the refused run took {seconds:.0f} s to end"
    for index, site in enumerate(SITES):
        warm_log = dep.log(f"warm-{site}-{index}")
        assert "REFUSED run" in warm_log and refusals[0][3] in warm_log
    assert not list(dep.tmp.glob(f"supernode-home-*/**/*.{refusals[0][3][:8]}"))  # never installed


def test_control_api_is_not_reachable_from_a_supernodes_host(pinned):
    """Bound to 127.0.0.1 (as docs/deployment.md starts it), the Control API answers on the SuperLink's host only."""
    dep = pinned[0]
    if dep.netns_error or not dep.namespaces:
        pytest.skip(f"no network namespaces here: {dep.netns_error}")
    assert documented_bind_host("--control-api-address") == "127.0.0.1"  # what the fixture's SuperLink was started with
    assert connects(dep, dep.fleet) == "open"  # the namespace does reach the SuperLink's host
    assert connects(dep, dep.control) == "ConnectionRefusedError"
    assert connects_locally(dep.control) == "open"  # from the host itself it answers
    assert run([str(BIN / "flwr"), "supernode", "ls", "fedclip"], env=dep.cli_env).returncode == 0


def test_serverappio_api_is_not_reachable_from_a_supernodes_host_while_a_run_works(pinned, approved_run):
    """The ServerAppIo API takes a running run's messages given only the run id (plain gRPC: no TLS, no token for
    pushing
    messages in Flower 1.28). Bound to 127.0.0.1:9091 as docs/deployment.md's command binds it (Flower's default:
    0.0.0.0), it
    refuses connections from a SuperNode's namespace in the middle of a run, as the Control API does, while the
    ServerApp (a
    subprocess of the SuperLink, told the address the SuperLink bound) reaches it over loopback: the run completes."""
    dep = pinned[0]
    if dep.netns_error or not dep.namespaces:
        pytest.skip(f"no network namespaces here: {dep.netns_error}")
    log, folders, probes = approved_run
    assert probes == {
        "fleet from a SuperNode's host": "open",
        "fleet from the SuperLink's host": "open",  # the namespace reaches the host
        "control from a SuperNode's host": "ConnectionRefusedError",
        "control from the SuperLink's host": "open",
        "serverappio from a SuperNode's host": "ConnectionRefusedError",
        "serverappio from the SuperLink's host": "open",
    }, f"{probes or 'no probe: no row of the per-round table was streamed'}\n{log[-4000:]}"
    assert folders and (folders[-1] / "summary.json").is_file(), log[-6000:]  # and the run went on to its end
    # the fixture's SuperLink bound it where docs/deployment.md's command does
    assert f"Starting ServerAppIo API on 127.0.0.1:{dep.serverappio}" in dep.log("superlink")
    assert documented_bind_host("--serverappio-api-address") == "127.0.0.1"
    assert DOCUMENTED_SUPERLINK["--serverappio-api-address"] == "127.0.0.1:9091"
