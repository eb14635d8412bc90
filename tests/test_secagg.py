"""SecAgg+ end to end on the in-process grid: the aggregate equals the plain mean within one quantization step,
no reply carries an update in the clear, a client lost mid-protocol is recovered, a protocol that halts leaves the
adapter unchanged, weighting by examples and a 16-bit downlink work, and what cannot work fails at start."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow
from safetensors.numpy import load_file

import client_app.app as client_module
import server_app.secagg as server_secagg
from client_app.secagg import secagg_mod
from common.methods.fedclip import FedClip
from common.model import AttentionAdapter
from server_app.app import app as server_app
from server_app.privacy import privacy_spent
from server_app.secagg import share_count
from server_app.strategy import FedClipStrategy
from tests.conftest import reply_from, write_image_folder
from tests.inprocess import InProcessGrid, run_folder, run_in_process

QUANTIZATION_STEP = 2 * 1.0 / 4194304  # the default clipping_range over the default quantization_range


def within_one_step(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest difference between two adapters, asserted to be under one quantization step (plus float32 rounding).

    Each client's update is stochastically rounded to the step (an error in (-step, step)); the mean of such errors is
    too. The adapters are float32, so the sums before and after leave a few float32 ulps of the largest weight (1/32
    of a step for weights near 0.2). A second step would hide a unit error in the quantization (e.g. one level dropped).
    """
    difference = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    rounding = 4 * max(float(np.spacing(np.abs(a[k]).max().astype(np.float32))) for k in a)
    assert difference <= QUANTIZATION_STEP + rounding, f"{difference / QUANTIZATION_STEP:.3f} steps"
    return difference


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def overrides(folder: Path, tiny_clip: Path, tmp_path: Path, extra: str) -> str:
    return (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.batch_size=8 "
        f"cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'} {extra}"
    )


def final_adapter(tmp_path: Path) -> dict[str, np.ndarray]:
    [path] = (tmp_path / "out").glob("*/adapter_final.safetensors")
    return load_file(path)


def test_secure_mean_equals_plain_mean_and_no_update_is_seen(folder, tiny_clip, tmp_path, monkeypatch):
    replies: list[Message] = []
    pull = InProcessGrid.pull_messages
    monkeypatch.setattr(
        InProcessGrid, "pull_messages", lambda self, ids: replies.extend(r := list(pull(self, ids))) or r
    )
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    common = "training.rounds=1 dataset.clients_per_domain=2"  # 4 training clients
    run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, plain, common), 6)
    replies.clear()
    run_in_process(
        server_app, client_module.app, overrides(folder, tiny_clip, secure, f"{common} strategy.secagg.enabled=true"), 6
    )

    a, b = final_adapter(plain), final_adapter(secure)
    assert a.keys() == b.keys()
    assert within_one_step(a, b) > 0  # stochastic rounding: not bit-equal, within one step
    assert moved(b) > 100 * QUANTIZATION_STEP  # the comparison is not between two untouched adapters

    masked = [
        r
        for r in replies
        if not r.has_error() and Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked) == 4
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no tensor in the clear
    for reply in masked:
        assert reply.content["metrics"]["secagg-clipped"] == 0.0  # tiny updates: nothing cut by the clipping range
        vectors = [bytes_to_ndarray(b) for b in reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        values = np.concatenate([v.ravel() for v in vectors[1:]])  # the first is the weight factor
        # an unmasked quantized update lies in [0, 2^22); masked it is spread over [0, 2^32)
        assert np.mean(values >= 4194304) > 0.9


def test_fewer_neighbours_than_clients(folder, tiny_clip, tmp_path):
    """With strategy.secagg.num_shares below the round's clients each client masks against a few neighbours only;
    the masks still cancel: the plain mean within one quantization step."""
    assert share_count(3, 7) == 1.0 and share_count(8, 3) == 3 and share_count(8, 4) == 5
    common = "training.rounds=1 dataset.clients_per_domain=4"  # 8 training clients
    run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, tmp_path / "plain", common), 12)
    run_in_process(
        server_app,
        client_module.app,
        overrides(
            folder,
            tiny_clip,
            tmp_path / "secure",
            f"{common} strategy.secagg.enabled=true strategy.secagg.num_shares=3",
        ),
        12,
    )
    a, b = final_adapter(tmp_path / "plain"), final_adapter(tmp_path / "secure")
    within_one_step(a, b)
    assert moved(b) > 100 * QUANTIZATION_STEP


def test_resumed_run_goes_on_securely(folder, tiny_clip, tmp_path):
    """A checkpoint's tensors come back in their file's order: the secure round still adds each mean update to its
    own tensor."""
    finals = {}
    for name, extra in (("plain", ""), ("secure", "strategy.secagg.enabled=true")):
        first = tmp_path / name / "first"
        run_in_process(
            server_app, client_module.app, overrides(folder, tiny_clip, first, f"training.rounds=1 {extra}"), 3
        )
        run = run_folder(first / "out")
        run_in_process(
            server_app,
            client_module.app,
            overrides(folder, tiny_clip, tmp_path / name / "resumed", f"training.rounds=2 resume={run} {extra}"),
            3,
        )
        finals[name] = final_adapter(tmp_path / name / "resumed")
    checkpoint = final_adapter(tmp_path / "secure" / "first")
    # round 2 trained
    assert max(float(np.abs(finals["secure"][k] - checkpoint[k]).max()) for k in checkpoint) > 100 * QUANTIZATION_STEP
    assert max(float(np.abs(finals["secure"][k] - finals["plain"][k]).max()) for k in checkpoint) < 1e-4


def moved(adapter: dict[str, np.ndarray]) -> float:
    """How far an adapter is from the run's initial one (seed 0)."""
    torch.manual_seed(0)
    initial = AttentionAdapter(adapter["fc1.weight"].shape[1]).state_dict()
    return max(float(np.abs(adapter[k] - initial[k].numpy()).max()) for k in adapter)


def failing_client_app(mods: list) -> ClientApp:
    """The real handlers; partition 0 (art#0) dies while training, after it has shared its SecAgg+ keys."""

    def fail_training(msg: Message, ctxt: Context, call_next) -> Message:
        if int(ctxt.node_config["partition-id"]) == 0:
            raise RuntimeError("this node dies while training")
        return call_next(msg, ctxt)

    app = ClientApp()
    app.query()(client_module.query)
    app.train(mods=[*mods, fail_training])(client_module.train)
    app.evaluate()(client_module.evaluate)
    return app


def test_a_client_lost_mid_protocol_is_recovered(folder, tiny_clip, tmp_path):
    """Its masks are rebuilt from its neighbours' shares: the mean of the other three, as without SecAgg+."""
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    common = "training.rounds=1 dataset.clients_per_domain=2"
    run_in_process(server_app, failing_client_app([]), overrides(folder, tiny_clip, plain, common), 6)
    run_in_process(
        server_app,
        failing_client_app([secagg_mod]),
        overrides(folder, tiny_clip, secure, f"{common} strategy.secagg.enabled=true"),
        6,
    )
    a, b = final_adapter(plain), final_adapter(secure)
    within_one_step(a, b)
    assert moved(b) > 100 * QUANTIZATION_STEP


def test_client_side_dp_clips_inside_secagg(folder, tiny_clip, tmp_path):
    """The clients clip (Flower's fixedclipping_mod) before masking: with no noise the secure mean equals the plain
    client-side-DP mean of clipped updates; with noise it differs and epsilon is reported."""
    common = "training.rounds=1 dataset.clients_per_domain=2 strategy.dp.side=client strategy.dp.clipping_norm=0.01"
    runs = {
        "plain": "strategy.dp.noise_multiplier=0",
        "secure": "strategy.dp.noise_multiplier=0 strategy.secagg.enabled=true",
        "noisy": "strategy.dp.noise_multiplier=1 strategy.secagg.enabled=true",
    }
    for name, extra in runs.items():
        run_in_process(
            server_app, client_module.app, overrides(folder, tiny_clip, tmp_path / name, f"{common} {extra}"), 6
        )
    plain, secure, noisy = (final_adapter(tmp_path / name) for name in runs)
    within_one_step(plain, secure)
    assert 0 < moved(secure) <= 0.01 + 1e-6  # the mean of updates clipped to L2 norm 0.01
    # the noise, on the unmasked mean of the 4 clients' clipped updates: std noise_multiplier x clip / clients
    # 1,200 coordinates: the std within 2% (1 sd)
    noise = np.concatenate([(noisy[k] - secure[k]).ravel() for k in plain])
    assert np.std(noise) == pytest.approx(1.0 * 0.01 / 4, rel=0.1)
    [summary] = (tmp_path / "noisy" / "out").glob("*/summary.json")
    assert json.loads(summary.read_text())["dp"]["epsilon"] == pytest.approx(privacy_spent(1.0, 1, 1e-5))


def test_a_protocol_that_halts_keeps_the_adapter_and_the_run_goes_on(folder, tiny_clip, tmp_path, caplog):
    """Two training clients, one dies after sharing its keys: too few shares to unmask, so no mean; every round
    keeps the global adapter, says so, and the run finishes its rounds."""
    run_in_process(
        server_app,
        failing_client_app([secagg_mod]),
        overrides(folder, tiny_clip, tmp_path, "training.rounds=2 strategy.secagg.enabled=true"),
        3,
    )
    assert moved(final_adapter(tmp_path)) == 0.0
    assert caplog.text.count("secure aggregation gave no mean") == 2
    [path] = (tmp_path / "out").glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [sorted(k for k in r["train"] if k.endswith("/train-loss")) for r in rows[1:]] == [
        ["photo/train-loss"]
    ] * 2  # the survivor


class RecordingWorkflow(SecAggPlusWorkflow):
    """Flower's workflow, keeping the max_weight it was built with."""

    max_weights: list[float] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingWorkflow.max_weights.append(self.max_weight)


def test_weighting_by_examples_is_the_plain_weighted_mean_with_the_largest_train_split_as_max_weight(
    folder, tiny_clip, tmp_path, monkeypatch
):
    replies: list[Message] = []
    pull = InProcessGrid.pull_messages
    monkeypatch.setattr(
        InProcessGrid, "pull_messages", lambda self, ids: replies.extend(r := list(pull(self, ids))) or r
    )
    monkeypatch.setattr(server_secagg, "SecAggPlusWorkflow", RecordingWorkflow)
    RecordingWorkflow.max_weights = []
    common = "training.rounds=1 dataset.clients_per_domain=2"
    for name, extra in (
        ("equal", ""),
        ("plain", "strategy.weighting=examples"),
        ("secure", "strategy.weighting=examples strategy.secagg.enabled=true"),
    ):
        run_in_process(
            server_app, client_module.app, overrides(folder, tiny_clip, tmp_path / name, f"{common} {extra}"), 6
        )
    equal, plain, secure = (final_adapter(tmp_path / name) for name in ("equal", "plain", "secure"))
    within_one_step(plain, secure)
    assert max(float(np.abs(plain[k] - equal[k]).max()) for k in plain) > 20 * QUANTIZATION_STEP  # the weights mattered
    train_splits = [
        int(r.content["metrics"]["num-train"]) for r in replies if r.metadata.message_type == MessageType.QUERY
    ]
    # the query replies of the 3 runs; the splits differ
    assert len(train_splits) == 3 * 6 and len(set(train_splits)) > 1
    # each client's weight / max_weight <= 1: no overflow
    assert RecordingWorkflow.max_weights == [float(max(train_splits))]
    masked = [r for r in replies if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 4 and all(r.content["metrics"]["secagg-clipped"] == 0.0 for r in masked)


def test_equal_weighting_gives_the_workflow_max_weight_1(folder, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(server_secagg, "SecAggPlusWorkflow", RecordingWorkflow)
    RecordingWorkflow.max_weights = []
    run_in_process(
        server_app,
        client_module.app,
        overrides(folder, tiny_clip, tmp_path, "training.rounds=2 strategy.secagg.enabled=true"),
        3,
    )
    assert RecordingWorkflow.max_weights == [1.0, 1.0]


def test_a_16_bit_downlink_sends_half_the_adapter_and_the_mean_update_lands_on_the_float32_adapter(
    folder, tiny_clip, tmp_path
):
    """strategy.transport_dtype=bfloat16 with SecAgg+: the adapter goes down in 16 bits, each client's update is taken
    against what it received, and the server adds the mean update to its own float32 adapter. So the result is the plain
    16-bit run's (the mean of the 16-bit trained adapters) plus what the downlink rounded off the global adapter."""
    common = "training.rounds=1 dataset.clients_per_domain=2"
    runs = {
        "plain": "strategy.transport_dtype=bfloat16",
        "secure": "strategy.transport_dtype=bfloat16 strategy.secagg.enabled=true",
        "secure32": "strategy.secagg.enabled=true",
    }
    for name, extra in runs.items():
        run_in_process(
            server_app, client_module.app, overrides(folder, tiny_clip, tmp_path / name, f"{common} {extra}"), 6
        )
    plain, secure = final_adapter(tmp_path / "plain"), final_adapter(tmp_path / "secure")
    torch.manual_seed(0)
    initial = {k: v.numpy() for k, v in AttentionAdapter(plain["fc1.weight"].shape[1]).state_dict().items()}
    rounded_off = {k: v - torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in initial.items()}
    # the comparison can tell
    assert max(float(np.abs(v).max()) for v in rounded_off.values()) > 100 * QUANTIZATION_STEP
    within_one_step({k: plain[k] + rounded_off[k] for k in plain}, secure)
    assert moved(secure) > 100 * QUANTIZATION_STEP
    down = {}
    for name in ("secure", "secure32"):
        [summary] = (tmp_path / name / "out").glob("*/summary.json")
        down[name] = json.loads(summary.read_text())["bytes_down_per_client_per_round"]
    adapter = 2 * (24 * 24 + 24)  # parameters (projection dim 24)
    # the adapter goes down twice in this one-round run (the round's FitIns, the last evaluation), 2 bytes less a
    # parameter
    # each time; the keys and shares are the same size
    assert down["secure32"] - down["secure"] == 2 * 2 * adapter


def secure_strategy() -> FedClipStrategy:
    template = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    strategy = FedClipStrategy({1: "a", 2: "b", 3: "held"}, "held", template, "equal", 1, FedClip(), secagg=True)
    strategy.configure_train(
        1,
        ArrayRecord({"w": Array(np.full(4, 0.5, np.float32)), "b": Array(np.ones(2, np.float32))}),
        ConfigRecord(),
        None,
    )
    return strategy


def secure_replies() -> list[Message]:
    return [
        reply_from(n, RecordDict({"metrics": MetricRecord({"num-examples": 5, "train-loss": 0.5})})) for n in (1, 2)
    ]


def test_the_unmasked_mean_update_is_added_to_the_global_adapter():
    arrays, metrics = secure_strategy().aggregate_secure(
        1, secure_replies(), {"w": np.full(4, 0.25), "b": np.array([-1.0, 2.0])}
    )
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full(4, 0.75, np.float32))
    np.testing.assert_array_equal(arrays["b"].numpy(), np.array([0.0, 3.0], np.float32))
    assert arrays["w"].numpy().dtype == np.float32 and dict(metrics) == {
        "a/num-examples": 5,
        "a/train-loss": 0.5,
        "b/num-examples": 5,
        "b/train-loss": 0.5,
    }


@pytest.mark.parametrize(
    "mean,reason",
    [
        ({"w": np.full(4, np.nan), "b": np.zeros(2)}, "w holds NaN or Inf"),
        ({"w": np.zeros(4), "b": np.array([np.inf, 0.0])}, "b holds NaN or Inf"),
        ({"w": np.zeros(5), "b": np.zeros(2)}, r"w has shape \(5,\), expected \(4,\)"),
        ({"w": np.zeros(4)}, r"tensor names differ \(missing \['b'\]"),
        ({"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}, "w has dtype float32, expected float64"),
    ],
)
def test_an_unusable_mean_update_keeps_the_global_adapter(mean, reason, caplog):
    """The mean SecAgg+ unmasks is checked like any update (names, shapes, dtype, NaN/Inf) before it touches the
    adapter."""
    arrays, metrics = secure_strategy().aggregate_secure(3, secure_replies(), mean)
    assert arrays is None and "a/train-loss" in metrics  # the clients' metrics are still reported
    assert re.search(rf"round 3: the securely aggregated update is unusable \({reason}", caplog.text), caplog.text


def test_no_mean_or_too_few_updates_keeps_the_global_adapter(caplog):
    strategy = secure_strategy()
    assert strategy.aggregate_secure(1, secure_replies(), None)[0] is None  # the protocol halted
    assert (
        strategy.aggregate_secure(
            2, secure_replies()[:1] + [reply_from(2, error="lost")], {"w": np.zeros(4), "b": np.zeros(2)}
        )[0]
        is None
    )
    assert "round 2: secure aggregation gave no mean (1 update(s) collected)" in caplog.text


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            "strategy.aggregation=median",
            "strategy.secagg.enabled: the server sees only the sum of the updates, so strategy.aggregation=median, "
            "which "
            "needs each update, cannot run; use aggregation=mean, or turn SecAgg+ off",
        ),
        (
            "strategy.dp.side=server",
            "strategy.dp with strategy.secagg.enabled needs strategy.dp.side=client and strategy.dp.clipping=fixed: "
            "the server "
            "sees only the sum, so the clients clip and the server adds the noise to the unmasked mean (docs/trust.md)",
        ),
        (
            "method=fedavg",
            "strategy.secagg.enabled is for a method whose new weights are the mean of the clients' updates; "
            "method=fedavg's are not, "
            "so it cannot use it",
        ),
        (
            "dataset.domains=[art,sketch]",
            "strategy.secagg.enabled needs at least 2 training clients a round, this run has 1",
        ),
    ],
)
def test_what_needs_single_updates_fails_at_start(extra, message, folder, tiny_clip, tmp_path):
    with pytest.raises(
        ValueError, match=f"^{re.escape(message)}$"
    ):  # the whole message: what cannot work, and what to do
        run_in_process(
            server_app,
            client_module.app,
            overrides(folder, tiny_clip, tmp_path, f"training.rounds=1 strategy.secagg.enabled=true {extra}"),
            3,
        )
