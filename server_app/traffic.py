"""What a run moves over the network: each message's bytes, counted per client each way, and the clients lost.

Traffic per client is averaged over the clients each way actually concerns: down over those sent to, up over those
that replied. An error reply (for a lost node the SuperLink answers itself) is no up traffic: that client sent
nothing, and counted as a client that sent 0 bytes it would drag the per-client mean down.
"""

from __future__ import annotations

from collections import defaultdict

from flwr.app import Message

from common import wire
from server_app.selection import mean


def message_bytes(message: Message) -> int:
    """Bytes of tensors a message carries: its ArrayRecords' serialized arrays, and the bytes in its ConfigRecords
    (SecAgg+'s masked vectors, keys and shares)."""
    if message.has_error():
        return 0
    arrays = sum(len(array.data) for record in message.content.array_records.values() for array in record.values())
    values = [v for record in message.content.config_records.values() for v in record.values()]
    return arrays + sum(len(b) for v in values for b in (v if isinstance(v, list) else [v]) if isinstance(b, bytes))


class Traffic:
    """A round's bytes each way per client and the clients it lost, over its exchanges; the run's images encoded."""

    def __init__(self) -> None:
        self.down: dict[str, int] = defaultdict(int)  # bytes sent to each client this round
        self.up: dict[str, int] = defaultdict(int)
        self.lost: set[str] = set()  # clients sent a message this round that got no reply, or an error
        self.images_encoded = 0  # images that went through the CLIP image encoder in this run

    def count(self, node_clients: dict[int, str], messages: list[Message], replies: list[Message]) -> None:
        """Add one exchange's bytes each way per client, and the images its replies say were encoded."""
        # per client: messages sent minus replies that came back without an error
        unanswered: dict[str, int] = defaultdict(int)
        for msg in messages:
            self.down[node_clients[msg.metadata.dst_node_id]] += message_bytes(msg)
            unanswered[node_clients[msg.metadata.dst_node_id]] += 1
        for msg in replies:
            if msg.has_error():
                continue
            self.up[node_clients.get(msg.metadata.src_node_id, "?")] += message_bytes(msg)
            unanswered[node_clients.get(msg.metadata.src_node_id, "?")] -= 1
            # a train reply's evaluation may have encoded images too (fedavg/fedprox)
            self.images_encoded += sum(
                int(value)
                for record in msg.content.metric_records.values()
                for key, value in record.items()
                if key.endswith(wire.IMAGES_ENCODED)
            )
        self.lost |= {client for client, count in unanswered.items() if count > 0}

    def end_round(self, train_clients: list[str]) -> dict:
        """The round's figures for its row, after which the next round counts afresh: the lost clients; per training
        client, bytes down averaged over the clients sent to and bytes up over those that replied (None: none did);
        `bytes_round`, every byte moved."""
        figures = {
            "lost": sorted(self.lost),
            "bytes_down_per_client": mean(self.down[c] for c in train_clients if c in self.down),
            "bytes_up_per_client": mean(self.up[c] for c in train_clients if c in self.up),
            "bytes_round": sum(self.down.values()) + sum(self.up.values()),
        }
        self.down.clear()
        self.up.clear()
        self.lost.clear()
        return figures
