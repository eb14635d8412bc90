"""Deployment with warm ClientApps: `flower-supernode --isolation process` plus one `fedclip-clientapp` per
SuperNode, which handles every message of a run in one process (imports and the client's data built once)
and reports exactly what the same run reports in one process."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from client_app.app import app as client_app
from server_app.app import app as server_app
from tests.conftest import write_image_folder
from tests.inprocess import run_in_process
from tests.test_deployment import BIN, REPO, free_port

DOMAINS = ("art", "photo", "sketch")
ROUNDS = 3


def overrides(folder: Path, clip: Path) -> str:
    return (
        f"dataset=folder dataset.held_out=sketch model.name_or_path={clip} training.rounds={ROUNDS} "
        "training.batch_size=8"
    )


@pytest.fixture(scope="module")
def warm_run(tiny_clip, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    folder = write_image_folder(tmp / "data", per_class=6)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", FEDCLIP_OUTPUTS=str(tmp / "outputs"))
    env.pop("FEDCLIP_CACHE", None)
    fleet, control, serverappio = free_port(), free_port(), free_port()
    procs, logs = [], {}

    def start(name: str, cmd: list[str], home: str) -> None:
        logs[name] = tmp / f"{name}.log"
        procs.append(
            subprocess.Popen(
                cmd,
                env=dict(env, FLWR_HOME=str(tmp / home)),
                stdout=open(logs[name], "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp,
            )
        )

    try:
        start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--fleet-api-address",
                f"127.0.0.1:{fleet}",
                "--control-api-address",
                f"127.0.0.1:{control}",
                "--serverappio-api-address",
                f"127.0.0.1:{serverappio}",
                "--database",
                str(tmp / "state.db"),
            ],
            "superlink",
        )
        for domain in DOMAINS:
            appio = f"127.0.0.1:{free_port()}"
            node_config = f"domain='{domain}' data-dir='{folder}' cache-dir='{tmp / 'cache'}' device='cpu'"
            start(
                f"supernode-{domain}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{fleet}",
                    "--isolation",
                    "process",
                    "--clientappio-api-address",
                    appio,
                    "--node-config",
                    node_config,
                ],
                f"home-{domain}",
            )
            start(
                f"warm-{domain}", [str(BIN / "fedclip-clientapp"), "--clientappio-api-address", appio], f"home-{domain}"
            )
        (tmp / "cli").mkdir()
        (tmp / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{control}"\ninsecure = true\n'
        )
        time.sleep(5)  # the SuperNodes connect
        out = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(REPO),
                "local",
                "--stream",
                "--run-config",
                f'overrides="{overrides(folder, tiny_clip)}"',
            ],
            env=dict(env, FLWR_HOME=str(tmp / "cli")),
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp,
        )
        summaries = list((tmp / "outputs").glob("*/summary.json"))
        assert summaries, f"no summary.json:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
        yield summaries[0].parent, {name: path.read_text(errors="replace") for name, path in logs.items()}, folder
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_one_warm_process_builds_the_client_once_and_handles_every_message(warm_run):
    _, logs, _ = warm_run
    for domain in DOMAINS:
        log = logs[f"warm-{domain}"]
        # the query, one message a round (held out: its evaluation), the last evaluation
        assert log.count("handled a ") == 1 + ROUNDS + 1, log[-3000:]
        assert log.count(f"[{domain}] encoding") + log.count(f"[{domain}] reusing cached features") == 1, log[-3000:]
        # started without --approved-apps / --trusted-keys: it says so
        assert "ANY app the SuperLink sends runs here" in log


def test_warm_deployment_reports_what_the_same_run_reports_in_process(warm_run, tiny_clip, tmp_path):
    run_folder, _, folder = warm_run
    run_in_process(
        server_app,
        client_app,
        f"{overrides(folder, tiny_clip)} dataset.root={folder} cache_dir={tmp_path / 'cache'} "
        f"output_dir={tmp_path / 'out'}",
        len(DOMAINS),
    )
    [local] = (tmp_path / "out").glob("*/metrics.jsonl")
    deployed = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in local.read_text().splitlines()]
    for d, e in zip(deployed, expected, strict=True):
        assert {
            k: v for k, v in d.items() if k.startswith("acc/") or k in ("round", "train_loss", "val_acc_mean")
        } == pytest.approx(
            {k: v for k, v in e.items() if k.startswith("acc/") or k in ("round", "train_loss", "val_acc_mean")}
        )
