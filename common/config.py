"""One place that turns conf/ (Hydra) plus a run's overrides into the resolved configuration.

The server composes it once per run, checks it (common/schema.py) and sends it, as JSON, with every message: a client
never runs Hydra (0.2 s a call, and its import); it checks what it received (`config_from_message`) and applies its own
machine's settings (client_app/node.py).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf, grammar_parser
from omegaconf.errors import OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from common.schema import ConfigError, checked_config, interpolates, refuse_interpolations

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MACHINE_ENV = (("cache_dir", "FEDCLIP_CACHE"), ("output_dir", "FEDCLIP_OUTPUTS"))  # each machine's own paths win


def split_overrides(overrides: str) -> list[str]:
    """Split on spaces outside quotes, keeping the quotes: Hydra parses quoted values itself."""
    return re.findall(r"""(?:[^\s'"]|'[^']*'|"[^"]*")+""", overrides)


def compose_config(overrides: str | list[str] = "", conf_dir: Path = CONF_DIR) -> DictConfig:
    """conf/config.yaml with Hydra overrides, before this machine's settings and interpolations are applied
    (`conf_dir`: another copy of conf/, for tests)."""
    from hydra import compose, initialize_config_dir

    if isinstance(overrides, str):
        overrides = split_overrides(overrides)
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


# a run's configuration is about 5 KB (DomainNet's 345 classes included); a node parses no more
MESSAGE_CONFIG_MAX_CHARS = 1 << 20


def load_config(overrides: str | list[str] = "", complete: bool = True) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides, e.g. "training.lr=1e-4 dataset.held_out=photo", for this machine:
    FEDCLIP_CACHE/FEDCLIP_OUTPUTS win, interpolations resolved, and the result checked against the schema
    (common/schema.py;
    `complete=False` lets a mandatory key such as dataset.held_out stay `???`)."""
    return resolved_config(compose_config(overrides), complete)


def refuse_resolvers(tree: object, path: str = "") -> None:
    """Raise a ConfigError for a resolver call anywhere in a composed configuration: the server resolves conf/'s own
    `${key}`
    interpolations, never `${oc.env:NAME}` and the like, which would put this machine's environment into the
    configuration
    every site receives. Decided on OmegaConf's own parse of each interpolation (its grammar's resolver nodes), not
    its text."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            refuse_resolvers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            refuse_resolvers(value, f"{path}[{i}]")
    elif isinstance(tree, str) and interpolates(tree):
        try:
            calls = _resolver_calls(grammar_parser.parse(tree))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {tree!r} is not a valid interpolation ({str(err).splitlines()[0]})") from None
        if calls:
            raise ConfigError(
                f"{path}: {tree!r} calls the resolver {calls[0]}; a run's configuration may refer to its own keys "
                "(${key}) but call no resolver: give the value itself"
            )


def _resolver_calls(node: object) -> list[str]:
    found = (
        [node.resolverName().getText()] if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext) else []
    )
    return found + [
        name
        for child in (node.getChildren() if hasattr(node, "getChildren") else ())
        for name in _resolver_calls(child)
    ]


def resolved_config(composed: DictConfig, complete: bool = True) -> DictConfig:
    """A composed configuration as this machine runs it: its paths from the environment, resolved (conf/'s own `${key}`
    interpolations only: refuse_resolvers), checked, plain values only."""
    refuse_resolvers(OmegaConf.to_container(composed, resolve=False))
    cfg = composed.copy()
    for key, env in MACHINE_ENV:
        if os.environ.get(env):
            cfg[key] = os.environ[env]
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"{getattr(err, 'full_key', None) or 'the configuration'}: {str(err).splitlines()[0]}"
        ) from None
    return checked_config(data, complete)


def message_config(cfg: DictConfig) -> str:
    """The run's checked configuration as a message carries it: JSON, a format with no interpolation at all."""
    return json.dumps(OmegaConf.to_container(cfg))


def _refuse_constant(name: str) -> None:
    raise ConfigError(f"the run's configuration holds {name}; a number in the configuration is finite")


@functools.lru_cache(maxsize=8)
def _parsed_message_config(text: str) -> DictConfig:
    if len(text) > MESSAGE_CONFIG_MAX_CHARS:
        raise ConfigError(
            f"the run's configuration is {len(text)} characters, more than a node reads ({MESSAGE_CONFIG_MAX_CHARS})"
        )
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(
            f"the run's configuration is not JSON ({type(err).__name__}: {str(err).splitlines()[0][:200]}): the "
            f"ServerApp of "
            "this run is not FedCLIP's, or another version of it"
        ) from None
    return checked_config(data)


def config_from_message(text: str) -> DictConfig:
    """The configuration a message brings, parsed as JSON and checked before anything in it is used (a ConfigError
    otherwise).

    It is data from the server, never instructions: a string OmegaConf would interpolate or resolve
    (`${oc.env:NAME}` would
    put this machine's environment into values that replies carry back) is refused in the parsed tree, keys included,
    whatever escape carried it; so are unknown keys, missing ones and values of the wrong type. A copy: the caller
    may change it.
    """
    return copy.deepcopy(_parsed_message_config(text))


@functools.lru_cache(maxsize=8)
def shared_message_config(text: str) -> DictConfig:
    """config_from_message's configuration as one read-only object, for every node of a process that runs it as it is
    (a simulation's: a Ray actor serves thousands of clients, and a copy each cost 15 ms and 0.2 MB)."""
    cfg = config_from_message(text)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_from_file(path: Path) -> DictConfig:
    """The configuration a run folder keeps (config.yaml), which may come from another machine: parsed as YAML,
    plain data
    only (refuse_interpolations), not held to today's schema (a run folder may be older than it)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds no configuration (a map of keys to values)")
    refuse_interpolations(data)
    return OmegaConf.create(data)


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA when it is there, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but CUDA is not available here; use device=cpu or device=auto")
    return device


def setup_logging() -> None:
    """The app's own log lines, INFO and up with their time, on stderr.

    Flower's records reach the root logger too (its DEBUG ones included) but Flower prints them with
    its own handler at its own level: ours leaves them out, so a normal run shows no Flower debug
    lines and no Flower line twice. Errors, ours and Flower's, still print in full.
    """
    handler = logging.StreamHandler()
    handler.addFilter(lambda record: not record.name.startswith("flwr"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=[handler])
