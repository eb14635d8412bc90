"""One place that turns conf/ (Hydra) plus a run's overrides into the resolved configuration.

The server composes it once per run and sends it, as YAML, with every message: a client never runs
Hydra (0.2 s a call, and its import), it only applies its own machine's settings (`local_config`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

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


RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")  # ${oc.env:NAME}, ${oc.decode:...}: an OmegaConf resolver call, not a plain ${key}


def local_config(composed: DictConfig | str) -> DictConfig:
    """A composed configuration (or its YAML, as a message brings it) as this machine sees it: FEDCLIP_CACHE/FEDCLIP_OUTPUTS win,
    then resolved.

    YAML from a message may interpolate other keys (`${cache_dir}`) but call no resolver: `${oc.env:NAME}` would put
    this machine's environment (secrets included) into values that error messages carry back to the server.
    """
    if isinstance(composed, str) and (call := RESOLVER.search(composed)):
        raise ValueError(f"the run's configuration calls an OmegaConf resolver ({composed[call.start():].split('}')[0]}}}); a node "
                         "resolves only plain ${key} interpolations in the configuration a run sends: remove it from the overrides")
    cfg = OmegaConf.create(composed) if isinstance(composed, str) else composed.copy()
    for key, env in MACHINE_ENV:
        if os.environ.get(env):
            cfg[key] = os.environ[env]
    OmegaConf.resolve(cfg)
    return cfg


def load_config(overrides: str | list[str] = "") -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides, e.g. "training.lr=1e-4 dataset.held_out=photo", resolved here."""
    return local_config(compose_config(overrides))


def config_from_run(run_config: Mapping) -> DictConfig:
    """The configuration of a Flower run: conf/ plus the run config's `overrides` string."""
    return load_config(str(run_config.get("overrides", "")))


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
