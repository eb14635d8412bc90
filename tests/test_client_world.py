"""A client builds its world (configuration, images, features, split) once per process and run, not per message."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from PIL import Image

import client_app.node as client
from client_app.app import app as client_app
from common.config import load_config, message_config
from common.model import AttentionAdapter
from server_app.app import app as server_app
from tests.conftest import write_image_folder
from tests.inprocess import run_in_process


@pytest.fixture
def setup(tiny_clip, tmp_path, monkeypatch) -> tuple[str, list]:
    folder = write_image_folder(tmp_path / "data")
    run_config = message_config(
        load_config(
            f"dataset=folder dataset.root={folder} dataset.held_out=sketch "
            f"model.name_or_path={tiny_clip} cache_dir={tmp_path / 'cache'}"
        )
    )
    builds = []
    real = client.load_local_data
    monkeypatch.setattr(client, "load_local_data", lambda *a: builds.append(a) or real(*a))
    return run_config, builds


def message(run_config: str, server_round: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    config = ConfigRecord(
        {"run-config": run_config, "server-round": server_round, "evaluate-round": server_round - 1, "zero-shot": False}
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
