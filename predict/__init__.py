"""A site classifies its own images with what the federation trained, and exports it for others.

- classifier.py: `FedClipClassifier`, from a run folder or an export (`from_run`, `from_pretrained`), made from the
  run's weights by its method's hooks;
- export.py: the exported folder (config.json, the method's weights, the class text features, a model card) and
  `push_to_hub`;
- cli.py: the `fedclip-predict` command (also `python -m predict`).
"""

from predict.classifier import Encoded, FedClipClassifier, InputImages, Predictions
from predict.export import model_card, push_to_hub

__all__ = ["Encoded", "FedClipClassifier", "InputImages", "Predictions", "model_card", "push_to_hub"]
