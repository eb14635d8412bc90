"""A Flower Grid that hands each message straight to the ClientApp in this process.

The ServerApp's main and the ClientApp's handlers run unchanged, one node per partition, with
no SuperLink and no Ray: fast end-to-end runs of every method for the tests. A handler that
raises becomes an error reply, as in a real run. Each node gets its own copy of a message, as
over the wire: a mod that changes what it received (Flower's secaggplus_mod does) changes no other node's.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.typing import Run
from flwr.serverapp import Grid, ServerApp


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, run_config: dict, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_src_node_id"] = 0
            try:
                reply = self.client_app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - a failing ClientApp is an error reply
                reply = Message(error=Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(server_app: ServerApp, client_app: ClientApp, overrides: str, num_nodes: int) -> None:
    """One whole run of the app, as `flwr run` would do it with `--run-config overrides=...`."""
    run_config = {"overrides": overrides}
    server_app(InProcessGrid(client_app, run_config, num_nodes), Context(1, 0, {}, RecordDict(), run_config))


def run_folder(output_dir: Path) -> Path:
    """The one run folder in `output_dir` (beside it, `clients/` holds what the clients keep between rounds)."""
    [config] = output_dir.glob("*/config.yaml")
    return config.parent
