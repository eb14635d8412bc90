"""What the configuration may hold: every key of conf/, its type, and the values a few of them take.

The server checks the configuration it composed against this schema before the first message (a
mistyped value stops the run with one line naming the key), and every node checks the configuration a
message brings against it before using it (client_app/node.py). `checked_config` takes plain data
only: whatever comes from a message was parsed first (JSON), and an interpolation or resolver call
anywhere in the parsed tree, keys included, is refused before OmegaConf could resolve it.
A method's own keys are its class's `__init__` parameters, typed by their annotations.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, AnyNode, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.model import LOSSES
from common.partition import PARTITIONS
from common.transport import TRANSPORT_DTYPES


class ConfigError(ValueError):
    """The configuration is not one this app can run: the message names the key, what it got and what it takes."""


@dataclass
class Dataset:
    source: str = MISSING
    root: str | None = MISSING
    hub_id: str | None = MISSING
    hub_split: str = MISSING
    domains: list[str] | None = MISSING
    classes: list[str] | None = MISSING
    held_out: str = MISSING
    split: list[float] = MISSING
    clients_per_domain: int = MISSING
    partition: str = MISSING
    dirichlet_alpha: float = MISSING


@dataclass
class Model:
    name_or_path: str = MISSING
    hub_id: str | None = MISSING
    prompt: str = MISSING
    encode_batch_size: int = MISSING
    dtype: str = MISSING


@dataclass
class Training:
    rounds: int = MISSING
    local_epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    loss: str = MISSING
    client_state_in_memory: bool = MISSING


@dataclass
class DifferentialPrivacy:
    side: str | None = MISSING
    clipping: str = MISSING
    noise_multiplier: float = MISSING
    clipping_norm: float = MISSING
    delta: float = MISSING
    target_clipped_quantile: float = MISSING
    clip_norm_lr: float = MISSING
    clipped_count_stddev: float | None = MISSING


@dataclass
class SecAgg:
    enabled: bool = MISSING
    num_shares: int = MISSING
    reconstruction_threshold: float = MISSING
    clipping_range: float = MISSING
    quantization_range: int = MISSING


@dataclass
class Strategy:
    weighting: str = MISSING
    server_optimizer: str = MISSING
    server_lr: float | None = MISSING
    server_momentum: float = MISSING
    server_betas: list[float] = MISSING
    server_tau: float = MISSING
    min_train_nodes: int = MISSING
    min_train_fraction: float = MISSING
    min_available_nodes: int = MISSING
    round_timeout: float = MISSING
    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING
    max_update_norm: float | None = MISSING
    max_norm_ratio: float | None = MISSING
    on_large_update: str = MISSING
    aggregation: str = MISSING
    num_malicious: int = MISSING
    transport_dtype: str = MISSING
    dp: DifferentialPrivacy = field(default_factory=DifferentialPrivacy)
    secagg: SecAgg = field(default_factory=SecAgg)


@dataclass
class Tracking:
    tensorboard: bool = MISSING
    mlflow_uri: str | None = MISSING
    mlflow_experiment: str = MISSING
    mlflow_run_name: str | None = MISSING


@dataclass
class Pretrain:
    width: int = MISSING
    layers: int = MISSING
    heads: int = MISSING
    patch_size: int = MISSING
    projection_dim: int = MISSING
    epochs: int = MISSING
    renders_per_epoch: int = MISSING
    photo_only_epochs: int = MISSING
    generic_caption_prob: dict[str, float] = MISSING
    style_words: dict[str, str] = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    style_mix: dict[str, float] = MISSING


@dataclass
class Demo:
    cache_dir: str = MISSING
    seed: int = MISSING
    image_size: int = MISSING
    num_pretrain_digits: int = MISSING
    pretrain: Pretrain = field(default_factory=Pretrain)


@dataclass
class Sweep:
    methods: list[str] = MISSING
    seeds: list[int] = MISSING
    held_out: list[str] | None = MISSING
    out_dir: str = MISSING
    client_cpus: int = MISSING
    client_gpus: float = MISSING
    run_timeout: float = MISSING
    max_runs: int | None = MISSING


@dataclass
class Config:
    """conf/config.yaml with its groups; `method` is checked against its own class (method_schema)."""

    seed: int = MISSING
    device: str = MISSING
    cpu_threads: int | None = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING
    selection: str = MISSING
    resume: str | None = MISSING
    tracking: Tracking = field(default_factory=Tracking)
    demo: Demo = field(default_factory=Demo)
    sweep: Sweep = field(default_factory=Sweep)
    dataset: Dataset = field(default_factory=Dataset)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    strategy: Strategy = field(default_factory=Strategy)
    method: Any = MISSING


# Keys whose values the client side acts on and nothing checks before the clients would: their choices.
CHOICES = {
    ("dataset", "source"): ("folder", "hub"),
    ("dataset", "partition"): PARTITIONS,
    ("model", "dtype"): ("float32", "float16", "bfloat16"),
    ("training", "loss"): LOSSES,
    ("strategy", "transport_dtype"): TRANSPORT_DTYPES,
}
PLAIN = (str, int, float, bool, type(None))


def interpolates(text: str) -> bool:
    """Whether OmegaConf would treat a string as an interpolation (`${` in it, escaped or not, valid or not)."""
    try:
        return OmegaConf.is_interpolation(AnyNode(text))
    except OmegaConfBaseException:  # its grammar refused it: an interpolation, malformed
        return True


def refuse_interpolations(data: object, path: str = "") -> None:
    """Raise ConfigError if parsed data holds anything but plain values, or a string OmegaConf would interpolate or
    resolve.

    OmegaConf itself tells an interpolation from a string (`${` anywhere in it, escaped or not, whatever encoding
    carried
    it before parsing): so a key, a value or an element of a list never reaches OmegaConf's resolver from here.
    """
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"{path or 'the configuration'}: key {key!r} is a {type(key).__name__}, keys are strings"
                )
            if interpolates(key):
                raise ConfigError(
                    f"{path or 'the configuration'}: a key holds an interpolation ({key!r}); configuration keys are "
                    f"plain names"
                )
            refuse_interpolations(value, f"{path}.{key}" if path else key)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            refuse_interpolations(value, f"{path}[{i}]")
    elif not isinstance(data, PLAIN):
        raise ConfigError(
            f"{path}: got a {type(data).__name__}; the configuration holds only strings, numbers, booleans, null, "
            f"lists and maps"
        )
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{path}: got {data}; a number in the configuration is finite")
    elif isinstance(data, str) and interpolates(data):
        raise ConfigError(
            f"{path}: holds an interpolation or resolver call ({data!r}); the configuration a run sends is plain "
            f"values: "
            "resolve it where it is composed"
        )


def method_schema(cls: type) -> type:
    """A method's keys as a dataclass: `_target_` and its class's `__init__` parameters, typed by their annotations."""
    hints = typing.get_type_hints(cls.__init__)
    fields = [("_target_", str)]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name != "self":
            default = MISSING if parameter.default is inspect.Parameter.empty else parameter.default
            fields.append((name, hints.get(name, Any), field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields)


def _schema_error(err: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's validation error as one line: the key, what it got, what it takes."""
    key = getattr(err, "full_key", None) or "the configuration"
    message = str(err).splitlines()[0]
    if type(err).__name__ == "ConfigKeyError":
        return ConfigError(f"{key}: not a key of this app's configuration ({message})")
    return ConfigError(f"{key}: {message}")


def checked_config(data: dict, complete: bool = True) -> DictConfig:
    """Plain configuration data (parsed JSON or YAML, or a resolved container) checked against the schema, as a
    plain DictConfig.

    Refused with a ConfigError naming the key: interpolations anywhere, unknown keys, values of the wrong type or
    outside
    CHOICES, a `method._target_` that is not a Method class of this app, and (`complete`) keys missing or without a
    value
    (`???`: conf/'s mandatory dataset.held_out, say; a sweep's plan composes without it).
    """
    # the methods import the model and data code, which import this module's users
    from common.methods.base import (
        method_class,
    )

    if not isinstance(data, dict):
        raise ConfigError(f"the configuration is a {type(data).__name__}, not a map of keys to values")
    refuse_interpolations(data)
    method = data.get("method")
    if not isinstance(method, dict):
        raise ConfigError(
            "method: missing, or not a map (conf/method/<name>.yaml: `_target_` and the method's options)"
        )
    schema = OmegaConf.structured(Config)
    try:
        cls = method_class(method.get("_target_"), method.get("name"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    schema.method = OmegaConf.structured(method_schema(cls))
    try:
        typed = OmegaConf.merge(schema, data)
        missing = sorted(OmegaConf.missing_keys(typed))
    except OmegaConfBaseException as err:
        raise _schema_error(err) from None
    if missing and complete:
        raise ConfigError(
            f"{missing[0]}: missing from the configuration ({len(missing)} key(s) missing: {', '.join(missing[:5])})"
        )
    for (group, key), choices in CHOICES.items():
        if not OmegaConf.is_missing(typed[group], key) and typed[group][key] not in choices:
            raise ConfigError(f"{group}.{key}: got {typed[group][key]!r}, takes one of {', '.join(choices)}")
    return OmegaConf.create(OmegaConf.to_container(typed))
