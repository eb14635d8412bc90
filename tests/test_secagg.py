"""SecAgg+ end to end on the in-process grid: the aggregate equals the plain mean within the quantization step,
no reply carries an update in the clear, a client lost mid-protocol is recovered, and what cannot work fails at start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from safetensors.numpy import load_file

import client_app.app as client_module
from client_app.secagg import secagg_mod
from common.model import AttentionAdapter
from server_app.app import app as server_app
from server_app.secagg import share_count
from tests.conftest import write_image_folder
from tests.inprocess import InProcessGrid, run_in_process

QUANTIZATION_STEP = 2 * 1.0 / 4194304  # the default clipping_range over the default quantization_range


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def overrides(folder: Path, tiny_clip: Path, tmp_path: Path, extra: str) -> str:
    return (f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} training.batch_size=8 "
            f"cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'} {extra}")


def final_adapter(tmp_path: Path) -> dict[str, np.ndarray]:
    [path] = (tmp_path / "out").glob("*/adapter_final.safetensors")
    return load_file(path)


def test_secure_mean_equals_plain_mean_and_no_update_is_seen(folder, tiny_clip, tmp_path, monkeypatch):
    replies: list[Message] = []
    pull = InProcessGrid.pull_messages
    monkeypatch.setattr(InProcessGrid, "pull_messages", lambda self, ids: replies.extend(r := list(pull(self, ids))) or r)
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    common = "training.rounds=1 dataset.clients_per_domain=2"  # 4 training clients
    run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, plain, common), 6)
    replies.clear()
    run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, secure, f"{common} strategy.secagg.enabled=true"), 6)

    a, b = final_adapter(plain), final_adapter(secure)
    assert a.keys() == b.keys()
    difference = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert 0 < difference <= 2 * QUANTIZATION_STEP, difference  # stochastic rounding: not bit-equal, within one step
    assert moved(b) > 100 * QUANTIZATION_STEP  # the comparison is not between two untouched adapters

    masked = [r for r in replies if not r.has_error() and Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
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
    run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, tmp_path / "secure",
                                                            f"{common} strategy.secagg.enabled=true strategy.secagg.num_shares=3"), 12)
    a, b = final_adapter(tmp_path / "plain"), final_adapter(tmp_path / "secure")
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 2 * QUANTIZATION_STEP
    assert moved(b) > 100 * QUANTIZATION_STEP


def test_resumed_run_goes_on_securely(folder, tiny_clip, tmp_path):
    """A checkpoint's tensors come back in their file's order: the secure round still adds each mean update to its own tensor."""
    finals = {}
    for name, extra in (("plain", ""), ("secure", "strategy.secagg.enabled=true")):
        first = tmp_path / name / "first"
        run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, first, f"training.rounds=1 {extra}"), 3)
        [run] = (first / "out").glob("*")
        run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, tmp_path / name / "resumed", f"training.rounds=2 resume={run} {extra}"), 3)
        finals[name] = final_adapter(tmp_path / name / "resumed")
    checkpoint = final_adapter(tmp_path / "secure" / "first")
    assert max(float(np.abs(finals["secure"][k] - checkpoint[k]).max()) for k in checkpoint) > 100 * QUANTIZATION_STEP  # round 2 trained
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
    run_in_process(server_app, failing_client_app([secagg_mod]), overrides(folder, tiny_clip, secure, f"{common} strategy.secagg.enabled=true"), 6)
    a, b = final_adapter(plain), final_adapter(secure)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 2 * QUANTIZATION_STEP
    assert moved(b) > 100 * QUANTIZATION_STEP


def test_client_side_dp_clips_inside_secagg(folder, tiny_clip, tmp_path):
    """The clients clip (Flower's fixedclipping_mod) before masking: with no noise the secure mean equals the plain
    client-side-DP mean of clipped updates; with noise it differs and epsilon is reported."""
    common = "training.rounds=1 dataset.clients_per_domain=2 strategy.dp.side=client strategy.dp.clipping_norm=0.01"
    runs = {"plain": "strategy.dp.noise_multiplier=0", "secure": "strategy.dp.noise_multiplier=0 strategy.secagg.enabled=true",
            "noisy": "strategy.dp.noise_multiplier=1 strategy.secagg.enabled=true"}
    for name, extra in runs.items():
        run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, tmp_path / name, f"{common} {extra}"), 6)
    plain, secure, noisy = (final_adapter(tmp_path / name) for name in runs)
    assert max(float(np.abs(plain[k] - secure[k]).max()) for k in plain) <= 2 * QUANTIZATION_STEP
    assert 0 < moved(secure) <= 0.01 + 1e-6  # the mean of updates clipped to L2 norm 0.01
    assert max(float(np.abs(noisy[k] - secure[k]).max()) for k in plain) > 100 * QUANTIZATION_STEP
    [summary] = (tmp_path / "noisy" / "out").glob("*/summary.json")
    assert json.loads(summary.read_text())["dp"]["epsilon"] > 0


@pytest.mark.parametrize("extra,message", [
    ("strategy.aggregation=median", "aggregation=median"),
    ("strategy.dp.side=server", "needs strategy.dp.side=client and strategy.dp.clipping=fixed"),
    ("method=fedavg", "method=fedclip"),
    ("dataset.domains=[art,sketch]", "at least 2 training clients"),
])
def test_what_needs_single_updates_fails_at_start(extra, message, folder, tiny_clip, tmp_path):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        run_in_process(server_app, client_module.app, overrides(folder, tiny_clip, tmp_path, f"training.rounds=1 strategy.secagg.enabled=true {extra}"), 3)
