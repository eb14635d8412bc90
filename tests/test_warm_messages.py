"""The warm ClientApp process (gate/warm.py) message by message, with the SuperNode's ClientAppIo calls replaced
by fakes: a FAB with a new hash loads its own code, an app that raises gives an error reply and the process goes on,
and the process handles a second run's messages after the first's. The real FABs are built and installed by Flower.
(tests/test_warm_clientapp.py runs it against real SuperNodes.)"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field

import pytest
from flwr.app import Context, Message, MessageType, Metadata, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.common import object_ref
from flwr.common.constant import ErrorCode
from flwr.common.typing import Fab, Run

from gate import warm
from gate.pinning import AppPolicy

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tester"

[tool.flwr.app.components]
serverapp = "toyapp:server"
clientapp = "toyapp:{clientapp}"

[tool.flwr.app.config]
"""

TOYAPP = """from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

VERSION = {version}
app = ClientApp()


@app.query()
def query(message, context):
    metrics = MetricRecord({{"version": VERSION, "run": context.run_id}})
    return Message(RecordDict({{"metrics": metrics}}), reply_to=message)


@app.train()
def train(message, context):
    raise ValueError("this app cannot train: version {version}")
"""


def fab(version: int, clientapp: str = "app") -> Fab:
    """A FAB of the toy app, built by Flower; another version is other code, so another hash."""
    content, _ = build_fab_from_files(
        {
            "pyproject.toml": PYPROJECT.format(clientapp=clientapp).encode(),
            "toyapp.py": TOYAPP.format(version=version).encode(),
        }
    )
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def incoming(run_id: int, message_type: str = MessageType.QUERY) -> tuple[Message, Context]:
    metadata = Metadata(
        run_id=run_id,
        message_id=f"m{time.time_ns()}",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=60,
        message_type=message_type,
    )
    return Message(content=RecordDict(), metadata=metadata), Context(run_id, 7, {}, RecordDict(), {})


@dataclass
class FakeSuperNode:
    """What warm.py asks the SuperNode's ClientAppIo API for: runs to launch, a token per run, the message's inputs, and
    where the reply goes. `pending` is what ListAppsToLaunch answers, call after call (then the process is stopped)."""

    inputs: dict[str, tuple] = field(default_factory=dict)  # token -> (message, context, run, fab)
    pending: list[list[int]] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)

    def add(self, token: str, run_id: int, fab_: Fab | None, message_type: str = MessageType.QUERY) -> None:
        run = Run.create_empty(run_id)
        run.fab_id, run.fab_version, run.fab_hash = "tester/toyapp", "1.0.0", fab_.hash_str if fab_ else ""
        self.inputs[token] = (*incoming(run_id, message_type), run, fab_)

    def ListAppsToLaunch(self, request):  # noqa: N802 - the gRPC stub's name
        if not self.pending:
            raise StopServing
        return type("Response", (), {"run_ids": self.pending.pop(0)})

    def RequestToken(self, request):  # noqa: N802
        return type("Response", (), {"token": f"run{request.run_id}"})


class StopServing(Exception):
    """Ends warm.serve's endless loop in a test."""


class NoHeartbeat:
    def __init__(self, *args) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.fixture
def supernode(tmp_path, monkeypatch) -> FakeSuperNode:
    """The fake SuperNode behind warm.py's ClientAppIo calls; FAB installs go to a fresh FLWR_HOME, and the modules and
    sys.path entry Flower's loader adds for the toy app are taken back afterwards."""
    node = FakeSuperNode()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(warm, "pull_appinputs", lambda stub, token: stub.inputs[token])
    monkeypatch.setattr(warm, "push_appoutputs", lambda stub, token, message, context: stub.replies.append(message))
    monkeypatch.setattr(warm, "HeartbeatSender", NoHeartbeat)
    monkeypatch.setattr(warm, "make_app_heartbeat_fn_grpc", lambda stub, token: None)
    monkeypatch.setattr(warm, "POLL_SECONDS", 0.0)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(object_ref, "_current_sys_path", None)
    yield node
    for name in [
        m for m, module in sys.modules.items() if str(getattr(module, "__file__", "")).startswith(str(tmp_path))
    ]:
        del sys.modules[name]


# no --approved-apps or --trusted-keys: every app runs (tests/test_pinning.py checks the pinned cases)
OPEN = AppPolicy()


def test_a_fab_with_a_new_hash_replaces_the_loaded_code(supernode):
    v1, v2 = fab(1), fab(2)
    assert v1.hash_str != v2.hash_str
    seen: set[str] = set()
    for token, version in (("a", v1), ("b", v2), ("c", v1)):
        supernode.add(token, 1, version)
        warm.handle(supernode, token, OPEN, seen)
    # each message runs its own FAB's code
    assert [r.content["metrics"]["version"] for r in supernode.replies] == [
        1,
        2,
        1,
    ]


def test_an_exception_in_the_app_is_the_messages_error_reply_and_the_process_goes_on(supernode):
    seen: set[str] = set()
    supernode.add("train", 1, fab(3), MessageType.TRAIN)
    supernode.add("query", 1, fab(3))
    warm.handle(supernode, "train", OPEN, seen)
    warm.handle(supernode, "query", OPEN, seen)
    failed, answered = supernode.replies
    assert failed.has_error() and failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ValueError" in failed.error.reason and "this app cannot train: version 3" in failed.error.reason
    assert failed.metadata.reply_to_message_id == supernode.inputs["train"][0].metadata.message_id
    assert not answered.has_error() and answered.content["metrics"]["version"] == 3


@pytest.mark.parametrize(
    "fab_,code,reason",
    [
        (lambda: fab(4, clientapp="missing"), ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "Unable to load attribute missing"),
        # nothing to check: refused
        (
            lambda: None,
            ErrorCode.INVALID_FAB,
            "refused the run: no FAB came with its message",
        ),
    ],
)
def test_an_app_that_cannot_be_loaded_is_an_error_reply(fab_, code, reason, supernode):
    supernode.add("t", 1, fab_())
    warm.handle(supernode, "t", OPEN, set())
    [reply] = supernode.replies
    assert reply.has_error() and reply.error.code == code and reason in reply.error.reason


def test_the_process_serves_a_second_run_after_the_first(supernode, monkeypatch):
    """warm.serve polls for runs with a message to handle: nothing, run 1, nothing, run 2 (another FAB), run 1 again."""
    monkeypatch.setattr(warm, "create_channel", lambda **kwargs: None)
    monkeypatch.setattr(warm, "ClientAppIoStub", lambda channel: supernode)
    monkeypatch.setattr(warm, "wrap_stub", lambda stub, invoker: None)
    supernode.add("run1", 1, fab(5))
    supernode.add("run2", 2, fab(6))
    supernode.pending = [[], [1], [], [2], [1]]
    with pytest.raises(StopServing):
        warm.serve("127.0.0.1:9094", OPEN)
    assert [(r.content["metrics"]["run"], r.content["metrics"]["version"]) for r in supernode.replies] == [
        (1, 5),
        (2, 6),
        (1, 5),
    ]
