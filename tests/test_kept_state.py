"""What a client keeps between rounds survives a resumed run and a restarted site (client_app/kept_state.py)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from omegaconf import OmegaConf

from client_app import kept_state
from client_app.app import app as client_app
from common.local_data import LocalData
from server_app.app import app as server_app
from server_app.checkpoint import load_checkpoint
from tests.conftest import write_image_folder
from tests.inprocess import InProcessGrid
from tests.test_checkpoint import common, serve

KEY = uuid.uuid4().hex


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def client(tmp_path: Path, name: str = "photo", in_memory: bool = False) -> LocalData:
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "training": {"client_state_in_memory": in_memory}})
    return LocalData(cfg, "photo", name, None, None, None, torch.device("cpu"))


def moments(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"optimizer": {"0.exp_avg": torch.full((3,), value), "0.step": torch.tensor(float(value))}}


def test_a_fresh_state_loads_the_newest_file_from_before_the_round(tmp_path):
    local = client(tmp_path)
    for r in (1, 2, 3):
        kept_state.save(moments(r), local, KEY, r)
    folder = kept_state.state_folder(local, KEY)
    assert sorted(p.name for p in folder.iterdir()) == ["state-r2.safetensors", "state-r3.safetensors"]
    kept = kept_state.restore(local, KEY, 3)  # round 3 again (the server had not checkpointed it): round 2's state
    assert torch.equal(kept["optimizer"]["0.exp_avg"], torch.full((3,), 2.0))
    assert kept_state.restore(local, uuid.uuid4().hex, 4) == {}  # another run's key: nothing of this one


@pytest.mark.parametrize("in_memory", [False, True])
def test_flowers_context_holds_what_a_client_keeps_only_when_it_lives_in_memory(in_memory, tmp_path):
    """In files (the default) the context a simulation keeps for every client, and sends to the Ray actor and back with
    every message, stays empty; in memory the context holds it, marked with the run key, and a message reads it from
    there (the file is what a restart reads)."""
    local, state, config = client(tmp_path, in_memory=in_memory), RecordDict(), ConfigRecord({"run-key": KEY})
    kept_state.keep(state, local, KEY, 1, moments(1))
    assert bool(state.array_records) == in_memory
    kept_state.save(moments(7), local, KEY, 1)  # the file now differs from what the context holds
    key, kept = kept_state.restored(config, state, local, 2)
    assert key == KEY and torch.equal(kept["optimizer"]["0.exp_avg"], torch.full((3,), 1.0 if in_memory else 7.0))
    other = RecordDict()
    kept_state.keep(other, local, KEY, 1, moments(1))
    _, kept = kept_state.restored(ConfigRecord({"run-key": uuid.uuid4().hex}), other, local, 2)
    assert kept == {}  # another run's key: nothing of this one, nor of what the context held


def test_a_client_that_cannot_save_keeps_it_in_memory(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    local, state = client(tmp_path / "a-file"), RecordDict()
    with caplog.at_level(logging.WARNING):
        kept_state.keep(state, local, KEY, 1, moments(1))
    _, kept = kept_state.restored(ConfigRecord({"run-key": KEY}), state, local, 2)
    assert torch.equal(kept["optimizer"]["0.exp_avg"], torch.ones(3)) and "could not save" in caplog.text


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_restore_is_news_only_when_the_state_lives_in_memory(in_memory, tmp_path, caplog):
    """With the state in files every message reads it back: one INFO line a client a message would bury the log."""
    local = client(tmp_path, in_memory=in_memory)
    kept_state.save(moments(1), local, KEY, 1)
    with caplog.at_level(logging.INFO):
        kept_state.restore(local, KEY, 2)
    assert ("restored what it kept after round 1" in caplog.text) == in_memory


@pytest.mark.parametrize("damage", [b"not a safetensors file", None])
def test_a_corrupt_file_is_a_fresh_start_with_a_warning(damage, tmp_path, caplog):
    local = client(tmp_path)
    kept_state.save(moments(1), local, KEY, 1)
    path = kept_state.state_folder(local, KEY) / "state-r1.safetensors"
    if damage is None:  # a NaN in the moments
        kept_state.save(moments(float("nan")), local, KEY, 1)
    else:
        path.write_bytes(damage)
    with caplog.at_level(logging.WARNING):
        assert kept_state.restore(local, KEY, 2) == {}
    assert "goes on from a fresh one" in caplog.text


@pytest.mark.parametrize("key", ["../../etc", "", "0" * 31, f"{KEY}/.."])
def test_a_run_key_is_a_uuid_or_refused(key):
    with pytest.raises(ValueError, match="is not a run key"):
        kept_state.run_key(key)


def test_a_client_name_that_is_not_a_file_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot name a folder"):
        kept_state.state_folder(client(tmp_path, "../photo"), KEY)


def evaluations(run: Path) -> list[dict]:
    return [json.loads(line)["evaluate"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_ends_exactly_where_the_run_uninterrupted_does(folder, tiny_clip, tmp_path):
    """The server stops while pushing round 4 (its clients trained round 3, it checkpointed round 2); the resumed run
    trains round 3 again from round 2's moments and ends with the uninterrupted run's weights and accuracies, to the
    bit."""
    _, whole = serve(common(folder, tiny_clip, tmp_path, 4), tmp_path / "whole")
    _, crashed = serve(common(folder, tiny_clip, tmp_path, 4), tmp_path / "again", crash_round=4)
    _, resumed = serve(common(folder, tiny_clip, tmp_path, 4, f"resume={crashed}"), tmp_path / "again")
    assert load_checkpoint(crashed).round == 2
    for key, value in load_checkpoint(whole).arrays.to_torch_state_dict().items():
        np.testing.assert_array_equal(load_checkpoint(resumed).arrays.to_torch_state_dict()[key].numpy(), value)
    assert evaluations(resumed) == evaluations(whole)
    assert sorted(p.name for p in (tmp_path / "again" / "clients").iterdir()) == [json_key(crashed)]


def json_key(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["run_key"]


class RestartingGrid(InProcessGrid):
    """The in-process grid whose SuperNodes all restart before round `restart_round` trains: Flower's context state
    (the clients' optimiser moments) is lost, as when a site's SuperNode process is started again mid-run."""

    def __init__(self, client_app, run_config: dict, num_nodes: int, restart_round: int) -> None:
        super().__init__(client_app, run_config, num_nodes)
        self.restart_round = restart_round

    def push_messages(self, messages):
        messages = list(messages)
        rounds = {m.content["config"]["server-round"] for m in messages if m.metadata.message_type == MessageType.TRAIN}
        if self.restart_round in rounds:
            for context in self.contexts.values():
                context.state = RecordDict()
            self.restart_round = None
        return super().push_messages(messages)


def test_a_site_restarted_mid_run_goes_on_with_what_it_kept(folder, tiny_clip, tmp_path):
    _, whole = serve(common(folder, tiny_clip, tmp_path, 4), tmp_path / "whole")
    run_config = {"overrides": f"{common(folder, tiny_clip, tmp_path, 4)} output_dir={tmp_path / 'restarted'}"}
    server_app(RestartingGrid(client_app, run_config, 3, restart_round=3), Context(1, 0, {}, RecordDict(), run_config))
    [restarted] = (p.parent for p in (tmp_path / "restarted").glob("*/config.yaml"))
    assert evaluations(restarted) == evaluations(whole)


def test_a_site_keeps_the_state_of_its_16_latest_runs_only(tmp_path):
    """A server that sends a new run key with every message cannot fill the site's disk."""
    local = client(tmp_path)
    keys = [uuid.uuid4().hex for _ in range(kept_state.KEPT_RUNS + 3)]
    for key in keys:
        kept_state.save(moments(1), local, key, 1)
    (tmp_path / "clients" / "not-a-run").mkdir()  # nothing the app did not write is removed
    kept_state.save(moments(1), local, keys[-1], 2)
    left = {p.name for p in (tmp_path / "clients").iterdir()}
    assert left == set(keys[3:]) | {"not-a-run"}


def test_a_site_that_cannot_write_its_folder_goes_on_with_a_warning(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    local = client(tmp_path / "a-file")  # output_dir is a file: nothing can be made under it
    with caplog.at_level(logging.WARNING):
        kept_state.save(moments(1), local, KEY, 1)
        assert kept_state.save_site_weights(local, KEY, "prompt", {"ctx": torch.zeros(2)}) is None
    assert "could not save what it keeps" in caplog.text and "could not write its own weights" in caplog.text


def test_the_optimiser_state_a_client_keeps_is_three_arrays_and_comes_back_exactly(caplog):
    """AdamW's state of every parameter in one flat tensor per kind (Flower decodes each array of a record on its own:
    12 arrays for the adapter's 4 parameters cost 1.7 ms a message); loaded back, the next step is the same to the bit;
    a state that does not fit (an older format, other parameters) starts the optimiser afresh with a warning."""
    from common.model import AttentionAdapter
    from common.train import load_optimizer_state, make_optimizer, optimizer_state

    settings = OmegaConf.create({"lr": 1e-2, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2})
    torch.manual_seed(0)
    trained, batch = AttentionAdapter(8), torch.randn(4, 8)
    optimizer = make_optimizer(trained, settings)
    for _ in range(3):
        trained(batch).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    kept = optimizer_state(optimizer)
    assert sorted(kept) == ["exp_avg", "exp_avg_sq", "step"]
    restored = AttentionAdapter(8)
    restored.load_state_dict(trained.state_dict())
    again = make_optimizer(restored, settings)
    load_optimizer_state(again, {k: v.clone() for k, v in kept.items()})
    for model, opt in ((trained, optimizer), (restored, again)):
        model(batch).square().sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), restored.parameters()))
    fresh = make_optimizer(AttentionAdapter(8), settings)
    with caplog.at_level(logging.WARNING):
        load_optimizer_state(fresh, {"0.exp_avg": torch.zeros(8, 8)})  # the format before
    assert not fresh.state_dict()["state"] and "the optimiser starts afresh" in caplog.text


def test_a_client_whose_state_lives_only_in_its_files_ends_as_one_that_keeps_it_in_memory(folder, tiny_clip, tmp_path):
    """By default (training.client_state_in_memory=false) nothing stays in Flower's context between rounds (in a
    simulation of 10,000 clients, the memory of the process running it), each train message reads the moments back
    from the file; the run ends as one that keeps them in memory too, to the bit."""
    _, memory = serve(common(folder, tiny_clip, tmp_path, 3, "training.client_state_in_memory=true"), tmp_path / "m")
    grid, files = serve(common(folder, tiny_clip, tmp_path, 3), tmp_path / "f")
    for key, value in load_checkpoint(memory).arrays.to_torch_state_dict().items():
        np.testing.assert_array_equal(load_checkpoint(files).arrays.to_torch_state_dict()[key].numpy(), value)
    assert evaluations(files) == evaluations(memory)
    assert all(not context.state.array_records for context in grid.contexts.values())
    assert list((tmp_path / "f" / "clients").glob("*/*/state-r3.safetensors"))  # and yet kept, at the site


def test_an_empty_record_comes_back_too(tmp_path):
    """A method may keep a record with no tensor in it (conditioned_prompt's personal part at rank 0): it has no tensor
    in the file to name it, and its absence would mean "nothing kept" (the site then wrote no weights of its own)."""
    local, kept = client(tmp_path), moments(1)
    kept["personal"] = {}
    assert kept_state.save(kept, local, KEY, 1)
    restored = kept_state.restore(local, KEY, 2)
    assert sorted(restored) == ["optimizer", "personal"] and restored["personal"] == {}
    assert torch.equal(restored["optimizer"]["0.exp_avg"], torch.ones(3))
