"""A client builds its world (configuration, images, features, split) once per process and run, not per message."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from PIL import Image

import client_app.node as client
from client_app.app import app as client_app
from common.config import load_config, message_config
from common.fingerprint import app_code_fingerprint
from common.model import AttentionAdapter
from server_app.app import app as server_app
from tests.conftest import write_image_folder
from tests.inprocess import run_in_process


def counted_run(tiny_clip, tmp_path, monkeypatch, options: str = "") -> tuple[str, list]:
    """A run's configuration on a fresh image folder, and the list each build of a client's local data is added to."""
    folder = write_image_folder(tmp_path / "data")
    run_config = message_config(
        load_config(
            f"dataset=folder dataset.root={folder} dataset.held_out=sketch "
            f"model.name_or_path={tiny_clip} cache_dir={tmp_path / 'cache'} {options}"
        )
    )
    builds = []
    real = client.load_local_data
    monkeypatch.setattr(client, "load_local_data", lambda *a: builds.append(a) or real(*a))
    return run_config, builds


@pytest.fixture
def setup(tiny_clip, tmp_path, monkeypatch) -> tuple[str, list]:
    return counted_run(tiny_clip, tmp_path, monkeypatch)


def message(run_config: str, server_round: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord(
        {
            "run-config": run_config,
            "app-code": app_code_fingerprint(),
            "server-round": server_round,
            "evaluate-round": server_round - 1,
            "zero-shot": False,
        }
    )
    msg = Message(
        RecordDict({"arrays": ArrayRecord(AttentionAdapter(24).state_dict()), "config": config}),
        dst_node_id=1,
        message_type=message_type,
    )
    msg.metadata.__dict__["_message_id"] = f"m{server_round}"
    return msg


def context(run_id: int = 1, partition: int = 1) -> Context:
    return Context(
        run_id=run_id,
        node_id=1,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def test_later_messages_reuse_the_world(setup):
    run_config, builds = setup
    node = context()
    for r in (1, 2, 3):
        reply = client_app(message(run_config, r), node)
        assert not reply.has_error(), reply.error
        # the evaluation rode on the train message
        assert "evaluation/val-acc" in reply.content["metrics"] and "arrays" in reply.content
    client_app(message(run_config, 4, MessageType.EVALUATE), node)
    assert len(builds) == 1


def test_another_run_node_or_changed_data_builds_again(setup, tmp_path):
    run_config, builds = setup
    client_app(message(run_config), context(run_id=1))
    client_app(message(run_config), context(run_id=2))  # another run
    client_app(message(run_config), context(run_id=2, partition=0))  # another node
    assert len(builds) == 3
    Image.new("RGB", (20, 20)).save(tmp_path / "data" / "photo" / "dog" / "new.png")  # photo is partition 1
    reply = client_app(message(run_config, 2), context(run_id=1))
    assert len(builds) == 4 and reply.content["metrics"]["evaluation/num-all"] == 3 * 5 + 1


def test_a_message_without_the_run_config_is_a_clear_error(setup):
    msg = message("")
    del msg.content["config"]["run-config"]
    with pytest.raises(ValueError, match="no 'run-config'"):  # Flower turns it into an error reply
        client_app(msg, context())


def test_more_supernodes_than_clients_is_a_clean_run(tiny_clip, tmp_path, caplog):
    folder = write_image_folder(tmp_path / "data")
    with caplog.at_level("INFO"):
        run_in_process(
            server_app,
            client_app,
            f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
            f"training.rounds=2 cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'}",
            5,
        )  # 3 clients, 5 nodes
    [summary] = (tmp_path / "out").glob("*/summary.json")
    assert json.loads(summary.read_text())["rounds"] == 2
    assert caplog.text.count("is idle: no data in this run") == 2  # nodes 103 and 104, once each
    assert "Traceback" not in caplog.text and "query failed" not in caplog.text


def test_the_images_a_message_encodes_are_counted_in_its_own_reply(setup, tmp_path, monkeypatch):
    """Under Ray a client's query and its training may run in different processes, each encoding the client's images:
    each reply counts what its own process encoded (a train reply used to say 0, and the run's total was half the
    truth)."""
    from common import features

    run_config, _ = setup
    query = message(run_config, 0, MessageType.QUERY)
    encoded = client_app(query, context()).content["metrics"]["images-encoded"]
    assert encoded == 3 * 5  # photo: 3 classes x 5 images
    assert client_app(message(run_config, 1), context()).content["metrics"]["images-encoded"] == 0  # kept in memory
    monkeypatch.setattr(client, "_LOCAL", {})  # another process, on another machine: nothing kept, no disk cache
    monkeypatch.setattr(features, "_MEMORY", {})
    for entry in (tmp_path / "cache").rglob("*"):
        if entry.is_file() and entry.suffix != ".json":
            entry.unlink()
    reply = client_app(message(run_config, 2), context())
    assert reply.content["metrics"]["images-encoded"] == encoded
    evaluation = client_app(message(run_config, 3, MessageType.EVALUATE), context(run_id=2))
    assert evaluation.content["metrics"]["images-encoded"] == 0  # the features on disk again


@pytest.mark.parametrize("code", ["0" * 32, None])
def test_a_node_whose_app_code_is_not_the_runs_refuses_it(setup, code):
    """A Ray worker imports the app installed on its machine, not the run's: another version (or a server that does not
    say its version) is refused with both hashes and what to do, never run."""
    run_config, builds = setup
    msg = message(run_config)
    if code is None:
        del msg.content["config"]["app-code"]
    else:
        msg.content["config"]["app-code"] = code
    reply = client_app(msg, context())
    assert reply.has_error() and not builds
    assert f"this node's app code ({app_code_fingerprint()[:12]})" in reply.error.reason
    from common.fingerprint import APP_ROOT

    assert str(APP_ROOT) not in reply.error.reason  # the reply goes to the server: no folder of the site's
    assert f"is not the run's ({str(code)[:12]}): install the run's version" in reply.error.reason


def test_the_app_code_fingerprint_follows_every_client_file_and_nothing_else(tmp_path, monkeypatch):
    from common import fingerprint

    for folder in ("client_app", "common", "conf", "server_app", "docs"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    (tmp_path / "conf" / "b.yaml").write_text("x: 1\n")
    monkeypatch.setattr(fingerprint, "APP_ROOT", tmp_path)

    def code() -> str:
        fingerprint.app_code_fingerprint.cache_clear()
        return fingerprint.app_code_fingerprint()

    try:
        first = code()
        (tmp_path / "server_app" / "a.py").write_text("x = 2\n")  # the server's code: not what a client runs
        (tmp_path / "docs" / "a.py").write_text("x = 2\n")
        assert code() == first
        for changed in ("client_app/a.py", "common/a.py", "conf/b.yaml"):
            (tmp_path / changed).write_text((tmp_path / changed).read_text() + "# edited\n")
            assert code() != first, changed
            first = code()
    finally:
        fingerprint.app_code_fingerprint.cache_clear()


def test_a_process_serving_many_clients_loads_clip_once(tiny_clip, tmp_path, monkeypatch):
    """A Ray actor serves many clients one after another: it encodes each one's images and runs PromptFL's text tower
    for each with one CLIP, not one per client (6 clients here, in one process, as in one actor)."""
    from common import features, model

    loads = []
    real = model.load_clip
    monkeypatch.setattr(model, "load_clip", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(model, "_SHARED", {})
    monkeypatch.setattr(features, "_MEMORY", {})  # each client's images are encoded (a fresh cache folder below)
    folder = write_image_folder(tmp_path / "data")
    overrides = (
        f"method=promptfl dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds=1 training.batch_size=8 dataset.clients_per_domain=2 cache_dir={tmp_path / 'cache'} "
        f"output_dir={tmp_path / 'out'}"
    )
    run_in_process(server_app, client_app, overrides, 6)
    assert list(model._SHARED) and all(key[0] == str(tiny_clip) for key in model._SHARED)
    # one for the process's 6 clients (their encoding and PromptFL's text tower), and maybe the server's initial context
    assert 1 <= len(loads) <= 2


def test_a_process_keeps_every_client_of_a_run_it_serves(tiny_clip, tmp_path, monkeypatch):
    """A Ray actor serves many clients in turn: each is built once, not again on every message once more than KEPT
    (the bound on runs) were served (measured: 100 clients on one process rebuilt 600 times in 4 rounds, 60% of the
    round's time)."""
    run_config, builds = counted_run(tiny_clip, tmp_path, monkeypatch, "dataset.clients_per_domain=3")
    clients = 3 * 3
    assert clients > client.KEPT
    for server_round in (1, 2):
        for partition in range(clients):
            reply = client_app(message(run_config, server_round, MessageType.EVALUATE), context(partition=partition))
            assert not reply.has_error(), reply.error
    assert len(builds) == clients
