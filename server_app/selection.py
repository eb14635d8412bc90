"""Which round's weights a run keeps: its clients' accuracies in a round's evaluation, and the selection rules.

A client lost in a round (its node died, its reply was dropped) leaves that round's means over fewer clients, and a mean
over other clients is not comparable: so a round beats the best so far on the clients both were evaluated on.
"""

from __future__ import annotations

from flwr.app import MetricRecord

SELECTIONS = ("val_mean", "val_pooled", "last")  # the ways to choose the best round (RoundSelection.beats)


class Scores:
    """The run's clients by domain, and a round's accuracies over them: a domain's pooled over its clients' images."""

    def __init__(self, client_domains: dict[str, str], held_out: str) -> None:
        self.held_out = held_out
        self.clients = {
            d: sorted(c for c, cd in client_domains.items() if cd == d) for d in set(client_domains.values())
        }
        self.source_domains = sorted(d for d in self.clients if d != held_out)
        self.domains = self.source_domains + [d for d in self.clients if d == held_out]  # held-out last
        self.all_clients = set(client_domains)
        self.source_clients = {c for d in self.source_domains for c in self.clients[d]}  # evaluated on val and test

    def accuracy(
        self, metrics: MetricRecord | dict, domain: str, split: str | None = None, clients: set[str] | None = None
    ) -> float | None:
        """A domain's accuracy over its clients' images (only `clients`, if given): all of them if held out,
        else the test splits (after local fine-tuning, if any); or the given split."""
        split = split or ("all" if domain == self.held_out else "test")
        pairs = []
        for client in self.clients[domain]:
            if clients is not None and client not in clients:
                continue
            acc = metrics.get(f"{client}/personalized-test-acc") if split == "test" else None
            acc = metrics.get(f"{client}/{split}-acc") if acc is None else acc
            if acc is not None and metrics.get(f"{client}/num-{split}", 1) > 0:
                pairs.append((acc, metrics.get(f"{client}/num-{split}", 1)))
        return pooled(pairs)

    def evaluated(self, metrics: MetricRecord | dict) -> set[str]:
        """The run's clients that a round's evaluation holds an accuracy of."""
        return {key.rpartition("/")[0] for key in metrics if key.endswith("-acc")} & self.all_clients

    def val_mean(self, metrics: MetricRecord | dict, clients: set[str] | None = None) -> float | None:
        """Mean over the training domains of their validation accuracy (over `clients` only, if given)."""
        return mean(self.accuracy(metrics, d, "val", clients) for d in self.source_domains)

    def val_pooled(self, metrics: MetricRecord | dict, clients: set[str] | None = None) -> float | None:
        """Validation accuracy over the training clients' validation images pooled (over `clients` only, if given):
        every image counts once, so a domain of many tiny clients is not scored on a few images each."""
        pairs = [
            (metrics[f"{c}/val-acc"], metrics.get(f"{c}/num-val", 1))
            for c in sorted(self.source_clients)
            if (clients is None or c in clients) and f"{c}/val-acc" in metrics and metrics.get(f"{c}/num-val", 1) > 0
        ]
        return pooled(pairs)


class RoundSelection:
    """Each selection rule's best round so far; `best` is the run's own rule's (conf/config.yaml's `selection`)."""

    def __init__(self, scores: Scores, rule: str) -> None:
        if rule not in SELECTIONS:  # a run's is refused before its first message (server_app/options.py)
            raise ValueError(f"unknown selection rule {rule!r}")
        self.scores, self.rule = scores, rule
        self.chosen: dict[str, dict] = {}  # each rule's best round so far
        self.best: dict | None = None

    def beats(self, row: dict, best: dict | None, rule: str | None = None) -> bool:
        """Whether a round's weights beat the best round's so far under a selection rule (default: the run's):
        `last` takes every new round; `val_mean` (the mean over the training domains) and `val_pooled` (all validation
        images pooled) compare the validation accuracy over the clients evaluated in both rounds, so that a round that
        lost a client is not compared on a different set of clients. Two rounds with no training client in common
        (sampled evaluation) are compared on their own scores; a tie keeps the earlier."""
        rule = rule or self.rule
        if rule == "last":
            return True
        score = {"val_mean": self.scores.val_mean, "val_pooled": self.scores.val_pooled}[rule]
        if score(row["evaluate"]) is None:
            return False
        if best is None:
            return True
        common = self.scores.evaluated(row["evaluate"]) & self.scores.evaluated(best["evaluate"])
        mine, theirs = score(row["evaluate"], common), score(best["evaluate"], common)
        if mine is None or theirs is None:
            mine, theirs = score(row["evaluate"]), score(best["evaluate"])
        return mine > theirs

    def choose(self, row: dict) -> bool:
        """Update each selection rule's best round with a new round; whether it is the run's own rule's new best."""
        for rule in SELECTIONS:
            if self.beats(row, self.chosen.get(rule), rule):
                self.chosen[rule] = row
        self.best = self.chosen.get(self.rule)
        return self.best is row


def pooled(pairs: list[tuple[float, float]]) -> float | None:
    """Accuracy over all the images of (accuracy, images) pairs; None without images."""
    total = sum(n for _, n in pairs)
    return sum(a * n for a, n in pairs) / total if total else None


def mean(values) -> float | None:
    """The mean of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
