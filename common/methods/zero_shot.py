"""Zero-shot CLIP: nothing trains; the run is round 0's evaluation with the class prompts."""

from __future__ import annotations

from common.methods.fedclip import FedClip


class ZeroShot(FedClip):
    trains = False
    weights_name = None
    combines_updates = False
    narrows_to_16_bits = False
    averages_updates = False

    def __init__(self, name: str = "zero_shot") -> None:
        super().__init__(name)
