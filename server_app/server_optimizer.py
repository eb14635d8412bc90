"""Server optimizers (Reddi et al., ICLR 2021): the round's combined update as a pseudo-gradient for an optimizer step.

Whatever made the combined weights (the mean, a robust rule, DP's noised mean, SecAgg+'s unmasked
mean), `step` treats delta = combined - current as the update direction. `mean` takes the combined
weights as they are (the paper's FedCLIP); the others follow Flower's own FedAvgM, FedAdam, FedYogi
and FedAdagrad step for step (flwr.serverapp.strategy; tests/test_server_optimizer.py compares
them), which cannot be used as they are here because each averages the replies itself.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from omegaconf import DictConfig

SERVER_OPTIMIZERS = ("mean", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
DEFAULT_LR = {"mean": 1.0, "fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1}  # Flower's defaults
STATE_PREFIX = "server-optimizer/"  # how the optimizer's moments are named in a checkpoint, beside the weights


class ServerOptimizer:
    """The next global weights from the current ones and the round's combined weights; keeps its moments between
    rounds."""

    def __init__(
        self,
        kind: str = "mean",
        lr: float | None = None,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:  # a run's is refused before its first message (server_app/options.py)
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.kind, self.momentum, self.tau = kind, float(momentum), float(tau)
        self.lr = DEFAULT_LR[kind] if lr is None else float(lr)
        # FedAdagrad: m = delta
        self.beta_1, self.beta_2 = (0.0, 0.0) if kind == "fedadagrad" else (float(betas[0]), float(betas[1]))
        self.m: dict[str, np.ndarray] = {}  # first moment (FedAvgM: the momentum vector)
        self.v: dict[str, np.ndarray] = {}  # second moment

    @classmethod
    def from_config(cls, strategy_cfg: DictConfig) -> ServerOptimizer:
        """strategy.server_optimizer with its options (conf/strategy/fedclip.yaml)."""
        return cls(
            strategy_cfg.server_optimizer,
            strategy_cfg.server_lr,
            strategy_cfg.server_momentum,
            tuple(strategy_cfg.server_betas),
            strategy_cfg.server_tau,
        )

    def step(self, server_round: int, current: ArrayRecord, combined: ArrayRecord) -> ArrayRecord:
        """The weights after this round's step: `combined` itself for the mean."""
        if self.kind == "mean":
            return combined
        x = {k: v.numpy().astype(np.float64) for k, v in current.items()}
        delta = {k: combined[k].numpy().astype(np.float64) - x[k] for k in x}
        if self.kind == "fedavgm":  # pseudo-gradient -delta; momentum vector mv <- momentum * mv + pg (the first: pg)
            self.m = {k: self.momentum * self.m[k] - delta[k] if k in self.m else -delta[k] for k in x}
            new = {k: x[k] - self.lr * self.m[k] for k in x}
        else:
            self.m = {k: self.beta_1 * self.m.get(k, 0.0) + (1 - self.beta_1) * delta[k] for k in x}
            v, d2 = {k: self.v.get(k, np.zeros_like(x[k])) for k in x}, {k: delta[k] ** 2 for k in x}
            if self.kind == "fedadam":
                self.v = {k: self.beta_2 * v[k] + (1 - self.beta_2) * d2[k] for k in x}
            elif self.kind == "fedyogi":
                self.v = {k: v[k] - (1 - self.beta_2) * d2[k] * np.sign(v[k] - d2[k]) for k in x}
            else:
                self.v = {k: v[k] + d2[k] for k in x}
            lr = self.lr
            if self.kind == "fedadam":  # Flower's bias-corrected step size, with t = server_round + 1
                lr *= np.sqrt(1 - self.beta_2 ** (server_round + 1.0)) / (1 - self.beta_1 ** (server_round + 1.0))
            new = {k: x[k] + lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau) for k in x}
        return ArrayRecord({k: Array(new[k].astype(current[k].numpy().dtype)) for k in x})

    def state(self) -> dict[str, np.ndarray]:
        """The moments, named for a checkpoint (empty for the mean, and before the first step)."""
        return {
            f"{STATE_PREFIX}{name}/{k}": a
            for name, moments in (("m", self.m), ("v", self.v))
            for k, a in moments.items()
        }

    def load_state(self, tensors: dict[str, np.ndarray]) -> None:
        """The moments back from a checkpoint's tensors (those named by `state`)."""
        for key, array in tensors.items():
            name, _, tensor = key.removeprefix(STATE_PREFIX).partition("/")
            (self.m if name == "m" else self.v)[tensor] = np.asarray(array, dtype=np.float64)
