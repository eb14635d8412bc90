"""A site takes data, never instructions, from the server: the two findings of issue 25 reproduced, a mistyped
configuration
stopped before round 1, a failure every node shares said once, and the quick form of the fuzzing campaign
(benchmarks/site_fuzz.py; its long form's figures are in docs/security.md)."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from benchmarks import site_fuzz
from client_app.app import app as client_app
from common import wire
from common.config import ConfigError, load_config, message_config
from common.fingerprint import app_code_fingerprint
from server_app.app import app as server_app
from server_app.federation import FederationError
from tests.conftest import write_image_folder
from tests.inprocess import InProcessGrid, run_in_process

SECRET = "site-secret-3f9a"


@pytest.fixture
def site(tiny_clip, tmp_path, monkeypatch):
    """A deployed site's ClientApp context (domain and data-dir in its node config) with a secret in its environment."""
    monkeypatch.setenv("SITE_SECRET", SECRET)
    data = write_image_folder(tmp_path / "data", domains=("photo",))
    node_config = {"domain": "photo", "data-dir": str(data), "cache-dir": str(tmp_path / "cache"), "device": "cpu"}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def query(run_config: str) -> Message:
    message = Message(
        RecordDict({wire.CONFIG: ConfigRecord({wire.RUN_CONFIG: run_config, wire.APP_CODE: app_code_fingerprint()})}),
        dst_node_id=7,
        message_type=MessageType.QUERY,
    )
    message.metadata.__dict__["_message_id"] = "q1"
    return message


def hostile_configs(tiny_clip) -> dict[str, str]:
    """The finding's two carriers of `${oc.env:...}` (a tab after `${`; YAML's \\x24 for `$`), in the YAML a message
    carried
    before, and the same in JSON, as messages carry it now (with JSON's \\u0024 escape too)."""
    plain = json.loads(
        message_config(
            load_config(
                f"dataset=folder dataset.root=/server dataset.domains=[art,photo,sketch] "
                f"dataset.held_out=sketch model.name_or_path={tiny_clip}"
            )
        )
    )
    tab = {**plain, "device": "${\toc.env:SITE_SECRET,cpu}"}
    return {
        "yaml, tab": yaml.safe_dump(tab),
        "yaml, \\x24": yaml.safe_dump({**plain, "device": "DOLLAR{oc.env:SITE_SECRET}"})
        .replace("DOLLAR", "\\x24")
        .replace("device: \\x24{oc.env:SITE_SECRET}", 'device: "\\x24{oc.env:SITE_SECRET}"'),
        "json, tab": json.dumps(tab),
        "json, \\u0024": json.dumps({**plain, "device": "${oc.env:SITE_SECRET}"}).replace("$", "\\u0024"),
    }


@pytest.mark.parametrize("carrier", ["yaml, tab", "yaml, \\x24", "json, tab", "json, \\u0024"])
def test_finding_1_a_sites_environment_never_reaches_the_server(carrier, site, tiny_clip):
    """On the old code the site resolved the run's `device` from its environment and its reply carried the secret
    ("Invalid device string: '<secret>'"). Now the site refuses the configuration before resolving anything."""
    reply = client_app(query(hostile_configs(tiny_clip)[carrier]), site)
    assert reply.has_error() and SECRET not in reply.error.reason
    assert "interpolation" in reply.error.reason or "not JSON" in reply.error.reason


def test_finding_1_from_the_overrides_the_server_refuses_a_resolver_call(monkeypatch):
    """The issue's one-line reproduction started from an override; the server now resolves conf/'s own ${key} only."""
    monkeypatch.setenv("S", SECRET)
    with pytest.raises(
        ConfigError, match=r"^device: '\$\{\\toc.env:S,cpu\}' calls the resolver oc.env; .*give the value itself$"
    ):
        load_config("device='${\toc.env:S,cpu}'")
    # ${.hub_id} still resolves
    assert load_config("model=clip-vit-b32").model.name_or_path == "openai/clip-vit-base-patch32"


def test_finding_3_a_mistyped_value_stops_before_any_message(tiny_clip, tmp_path):
    grid = InProcessGrid(client_app, {}, 3)
    sent = []
    grid.push_messages = lambda messages: sent.extend(messages) or []
    overrides = f"training.lr=abc model.name_or_path={tiny_clip} output_dir={tmp_path}"
    with pytest.raises(ConfigError) as err:
        server_app(grid, Context(1, 0, {}, RecordDict(), {"overrides": overrides}))
    assert str(err.value) == "training.lr: Value 'abc' of type 'str' could not be converted to Float"
    assert sent == [] and not list(tmp_path.iterdir())  # no node asked, no run folder


def test_a_failure_every_node_shares_is_said_once(tiny_clip, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(FederationError, match="no node holds a training domain"):
        run_in_process(
            server_app,
            client_app,
            f"dataset=folder dataset.root={tmp_path / 'nonexistent'} dataset.held_out=sketch "
            f"model.name_or_path={tiny_clip} cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'}",
            4,
        )
    assert caplog.text.count("is not a folder") == 1
    assert "4 nodes (100, 101, 102, 103) left out" in caplog.text and "Traceback" not in caplog.text


def test_fuzzing_campaign_quick_form(tmp_path, monkeypatch):
    """Every kind of the campaign, seeded: no crash, no leak, the site's files unchanged and the site still training
    after
    each hostile message; every configuration carrying an interpolation refused, whatever its encoding."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tallies = site_fuzz.run(list(site_fuzz.KINDS), examples=40, seed=0, root=tmp_path)
    for kind, tally in tallies.items():
        assert tally.inputs >= 30, kind
        assert (tally.crashes, tally.leaks, tally.examples) == (0, 0, []), kind
    for kind in ("config-values", "config-keys", "config-yaml"):  # what a message brings: every one refused
        assert tallies[kind].outcomes["refused"] == tallies[kind].inputs, kind
    # overrides: a resolver call is refused on the server; a plain ${key} of the run's own configuration is resolved
    # there
    # and reaches the site as a plain value (parse_at_site: exactly as sent)
    assert tallies["config-overrides"].outcomes["refused"] > tallies["config-overrides"].outcomes["accepted"]
    assert tallies["messages"].outcomes["refused"] > 0 and tallies["messages"].outcomes["answered"] > 0


def test_a_sites_error_reply_names_its_folders_by_key(site, tiny_clip, tmp_path):
    """A site whose data folder lacks the run's domain says so without giving the folder's path to the server."""
    site.node_config["domain"] = "art"  # the run has art, but this site's folder holds only photo
    run_config = message_config(
        load_config(
            f"dataset=folder dataset.root=/server dataset.domains=[art,photo,sketch] "
            f"dataset.held_out=sketch model.name_or_path={tiny_clip}"
        )
    )
    reply = client_app(query(run_config), site)
    assert reply.has_error() and "<data-dir>" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason and SECRET not in reply.error.reason
