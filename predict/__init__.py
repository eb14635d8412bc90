"""A site classifies its own images with the federation's adapter, and exports it for others.

- classifier.py: `FedClipClassifier`, from a run folder or an exported adapter (`from_run`, `from_pretrained`);
- export.py: the exported folder (config.json, adapter.safetensors or a PromptFL context and its class text features, a
  model card) and `push_to_hub`;
- cli.py: the `fedclip-predict` command (also `python -m predict`).
"""

from predict.classifier import Encoded, FedClipClassifier, InputImages, Predictions
from predict.export import model_card, push_to_hub

__all__ = ["Encoded", "FedClipClassifier", "InputImages", "Predictions", "model_card", "push_to_hub"]
