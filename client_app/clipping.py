"""Client-side clipping for central DP (strategy.dp.side=client): Flower's own mods, when the server asks for them."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.differential_privacy_constants import KEY_CLIPPING_NORM

from common import wire
from common.config import config_from_message


def dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod or adaptiveclipping_mod (strategy.dp.clipping) when the message carries the
    clipping norm that Flower's client-side DP wrappers send; otherwise the handler alone."""
    config = msg.content.config_records.get(wire.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    # the run's configuration, checked
    adaptive = config_from_message(str(config[wire.RUN_CONFIG])).strategy.dp.clipping == "adaptive"
    return (adaptiveclipping_mod if adaptive else fixedclipping_mod)(msg, ctxt, call_next)
