"""What every method is asked, on the server and on a client; the defaults are those of a method that averages one
set of weights.

A method is one class that its conf/method/<name>.yaml names (`_target_`, with the method's own
options beside it). The server's round loop and strategy and the ClientApp call these hooks and
never ask which method they have: adding a method is one module here and one file in conf/method/
(docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from common import wire
from common.features import DomainFeatures
from common.local_data import LocalData
from common.train import evaluate_adapter


@dataclass
class Update:
    """One client's update as the server combines it, after screening: its tensors (float32) and its example count."""

    client: str
    state: dict[str, np.ndarray]
    num_examples: float


Combine = Callable[[list[Update]], dict[str, np.ndarray]]  # the strategy's rule: weighted mean, or a robust one
# What a client keeps between rounds (an optimiser's moments, a personal part): records of named tensors, which the
# ClientApp saves at the site after each round it trains and hands back with the client's next message
# (client_app/kept_state.py). Plain tensors: they never travel, so they never go through Flower's arrays.
Kept = dict[str, dict[str, torch.Tensor]]


class Method:
    """One federated method: what it trains and sends, who trains, what a client does with a message, how the server
    combines."""

    trains = True  # False: nothing trains, the run is round 0's evaluation
    weights_name: str | None = (
        "adapter"  # the run folder's <weights_name>_best/_final.safetensors; None: no global weights
    )
    combines_updates = True  # several clients' updates make one: strategy.aggregation's robust rules apply
    narrows_to_16_bits = True  # what travels survives 16 bits: strategy.transport_dtype may narrow it
    # the new global weights are the mean of the clients' updates to one shared set: SecAgg+ and central DP apply
    averages_updates = False

    def __init__(self, name: str) -> None:
        self.name = name

    def refuse(self, cfg: DictConfig) -> None:
        """Raise a ValueError, saying why and what to do, for an option this method cannot run with (before any
        round)."""

    # On the server
    def initial_weights(self, cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
        """What the run trains, as first sent."""
        raise NotImplementedError

    def train_nodes(self, nodes: list[int]) -> list[int]:
        """Of the training clients' nodes (in client order), those that train."""
        return nodes

    def records(self, client: str, arrays: ArrayRecord, held_out: bool) -> dict[str, ArrayRecord]:
        """The weights a client's message carries, given the global ones (as they travel); `held_out`: the held-out
        domain's."""
        return {wire.ARRAYS: arrays}

    def update_base(self, client: str, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights a client's update was trained from: screening measures the update against them."""
        return global_state

    def max_examples(self, client: str, num_train: dict[str, int]) -> int | None:
        """The most examples a client can have trained on (its train split at discovery); None: not known."""
        return num_train.get(client)

    def aggregate(self, updates: list[Update], combine: Combine) -> dict[str, np.ndarray] | None:
        """The new global weights from a round's screened updates; None keeps the current ones."""
        return combine(updates)

    # On a client
    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """Train from the received weights: the trained weights and the metrics (train-loss, num-examples,
        images-encoded).

        `kept` is what the client kept from the rounds it trained before (an optimiser's moments); what train leaves
        in it is kept for the next.
        """
        raise NotImplementedError

    def evaluate(self, local: LocalData, content: RecordDict, kept: Kept, server_round: int, zero_shot: bool) -> dict:
        """Accuracy and loss of the received weights (or of zero-shot CLIP) on the client's val, test and all images;
        `kept` is what the client kept (train's), for a method whose client has a part of its own."""
        return scores(local, local.feats, [None])

    def site_weights(self, content: RecordDict, kept: Kept) -> dict[str, torch.Tensor] | None:
        """The weights this client predicts with after the run, from the last global ones it received and what it kept;
        None: the global ones (the server's run folder has them). The ClientApp writes them to the site's own folder.

        Here: those the run's last evaluation fine-tuned at the site (`keep_fine_tuned`), handed over once."""
        return kept.pop(FINE_TUNED, None)

    # For fedclip-predict and its export: a classifier is CLIP's logits between the image features, through
    # `image_head`, and the class text features, from `class_text`, given the weights a run saved
    def class_text(
        self, weights: dict[str, torch.Tensor], model, processor, classes: list[str], prompt: str
    ) -> torch.Tensor | None:
        """The class text features [classes, d] these weights give; None: CLIP's encoded class prompts."""
        return None

    def image_head(self, weights: dict[str, torch.Tensor], feature_dim: int) -> torch.nn.Module | None:
        """The module these weights put on the image features before the logits; None: none. A ValueError says why
        the weights do not fit a CLIP of `feature_dim` features, or that this method gives predict no classifier."""
        raise ValueError(f"method={self.name} trains its {self.weights_name}: fedclip-predict has no classifier for it")

    def image_features(self, weights: dict[str, torch.Tensor], model) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """CLIP's image features [B, d] of pixel values with these weights in the image encoder; None: the frozen
        encoder's (`get_image_features`)."""
        return None

    def describe(self, weights: dict[str, torch.Tensor]) -> str:
        """What the weights are, in a phrase for an export's model card."""
        parameters = sum(t.numel() for t in weights.values())
        return f"The {self.weights_name} that method {self.name} trained ({parameters:,} parameters)"


FINE_TUNED = "fine-tuned"  # kept for one message: the weights the client's last evaluation fine-tuned for it


def keep_fine_tuned(local: LocalData, kept: Kept, server_round: int, weights: dict[str, torch.Tensor]) -> None:
    """After the run's last round, the weights a client fine-tuned for its own test (`personalize_epochs`) are the ones
    it predicts with: kept for `site_weights`, not thrown away after the evaluation."""
    if server_round == int(local.cfg.training.rounds):
        kept[FINE_TUNED] = {name: t.detach().cpu().contiguous() for name, t in weights.items()}


def scores(local: LocalData, feats: DomainFeatures, adapters: list, images_encoded: int = 0) -> dict:
    """Accuracy and loss on val, test and all of a client's images, averaged over `adapters` (None: zero-shot CLIP)."""
    metrics: dict = {
        "num-all": len(local.feats.labels),
        "num-val": len(local.split.val),
        "num-test": len(local.split.test),
        wire.NUM_EXAMPLES: len(local.feats.labels),
        wire.IMAGES_ENCODED: images_encoded,
    }
    splits = {
        name: indices
        for name, indices in (
            ("val", local.split.val),
            ("test", local.split.test),
            ("all", np.arange(len(local.feats.labels))),
        )
        if len(indices) > 0
    }  # a small client's split can be empty: it reports nothing for it
    results = [evaluate_adapter(adapter, feats, splits, local.device) for adapter in adapters]
    for name in splits:
        metrics[f"{name}-acc"] = sum(r[name][0] for r in results) / len(results)
        metrics[f"{name}-loss"] = sum(r[name][1] for r in results) / len(results)
    return metrics


def method_class(target: object, name: object = None) -> type[Method]:
    """The Method class a configuration's `method._target_` names, which must be one of this app's.

    The configuration comes with the run, from whoever started it, and Hydra's `instantiate` calls any
    importable callable a `_target_` names (`method._target_=os.system` would run a command on every
    site, whatever app the site approved): only a Method class of this app is ever looked up, and nothing nested.
    """
    if target is None:
        raise ValueError(
            f"method {name!r} names no class: its conf/method/ file needs `_target_: common.methods.<module>.<Class>`"
        )
    cls = get_class(target) if isinstance(target, str) and target.startswith(f"{__package__}.") else None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(
            f"method._target_={target!r} is not a method of this app: it must name a Method class in {__package__} "
            f"(common.methods.<module>.<Class>)"
        )
    return cls


def method_from_options(options: Mapping) -> Method:
    """A method from its options (conf/method/<name>.yaml's keys, as a run or an export keeps them): its `_target_`
    class (method_class) called with the other keys; options the class does not take are a ValueError."""
    method_class(options.get("_target_"), options.get("name"))
    try:
        return instantiate(options, _convert_="all", _recursive_=False)
    except InstantiationException as err:
        raise ValueError(f"method {options.get('name')!r}: its options do not fit its class: {err}") from err


def load_method(cfg: DictConfig) -> Method:
    """The run's method, built from conf/method/<name>.yaml."""
    return method_from_options(cfg.method)
