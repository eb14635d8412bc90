"""A method is one module plus one yaml (docs/methods.md), for training, the run folder, predict and export alike.

The toy method below lives only in this test: its module is put beside common/methods/ for the test's length and its
yaml in a folder that Hydra searches (`hydra.searchpath`). Nothing else of the app learns its name, and a real
in-process run, fedclip-predict and an export all work with it.
"""

from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import common.methods
from client_app.app import app as client_app
from common.data import domain_folder
from predict import FedClipClassifier
from predict.cli import accuracy
from predict.cli import main as predict_main
from server_app.app import app as server_app
from tests.inprocess import run_folder, run_in_process
from tests.test_predict import write_coloured_folder

ROOT = Path(__file__).resolve().parent.parent

TOY_METHOD = '''
"""A learned shift of every class's text feature, trained by gradient steps on a client's cached features."""

import torch
import torch.nn.functional as F

from common import wire
from common.features import DomainFeatures, encode_prompts
from common.methods.base import Method, scores
from common.model import class_logits, class_prompts
from common.transport import decode


class TextShift(Method):
    weights_name = "shift"

    def __init__(self, name: str = "text_shift", lr: float = 1.0, steps: int = 5) -> None:
        super().__init__(name)
        self.lr, self.steps = float(lr), int(steps)

    def initial_weights(self, cfg, feature_dim):
        return {"shift": torch.zeros(feature_dim)}

    def train(self, local, content, state, server_round):
        shift = decode(content[wire.ARRAYS])["shift"].requires_grad_(True)
        feats, rows = local.feats, torch.as_tensor(local.split.train)
        for _ in range(self.steps):
            logits = class_logits(feats.image[rows], feats.text + shift, feats.logit_scale, None)
            loss = F.cross_entropy(logits, feats.labels[rows])
            (grad,) = torch.autograd.grad(loss, shift)
            shift = (shift - self.lr * grad).detach().requires_grad_(True)
        return {"shift": shift.detach()}, {
            wire.TRAIN_LOSS: loss.item(), wire.NUM_EXAMPLES: len(rows), wire.IMAGES_ENCODED: 0
        }

    def evaluate(self, local, content, state, server_round, zero_shot):
        feats = local.feats
        if not zero_shot:
            shift = decode(content[wire.ARRAYS])["shift"]
            feats = DomainFeatures(feats.image, feats.labels, feats.text + shift, feats.logit_scale, [])
        return scores(local, feats, [None])

    def class_text(self, weights, model, processor, classes, prompt):
        device = next(model.parameters()).device
        with torch.no_grad():
            return encode_prompts(model, processor, class_prompts(classes, prompt), device) + weights["shift"]

    def image_head(self, weights, feature_dim):
        if weights["shift"].shape != (feature_dim,):
            raise ValueError(f"the shift has {weights['shift'].shape[0]} features, this CLIP gives {feature_dim}")
        return None
'''


@pytest.fixture(scope="module")
def toy_run(tiny_clip, tmp_path_factory) -> Path:
    """A real 3-round run of the toy method; its module importable as common.methods.text_shift meanwhile."""
    tmp = tmp_path_factory.mktemp("toy")
    (tmp / "methods").mkdir()
    (tmp / "methods" / "text_shift.py").write_text(TOY_METHOD)
    (tmp / "conf" / "method").mkdir(parents=True)
    (tmp / "conf" / "method" / "text_shift.yaml").write_text(
        "_target_: common.methods.text_shift.TextShift\nname: text_shift\nlr: 1.0\nsteps: 5\n"
    )
    data = write_coloured_folder(tmp / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common.methods, "__path__", [*common.methods.__path__, str(tmp / "methods")])
        overrides = (
            f"hydra.searchpath=[file://{tmp / 'conf'}] method=text_shift dataset=folder dataset.root={data} "
            f"dataset.held_out=sketch model.name_or_path={tiny_clip} training.rounds=3 "
            f"cache_dir={tmp / 'cache'} output_dir={tmp / 'out'}"
        )
        run_in_process(server_app, client_app, overrides, 3)
        folder = run_folder(tmp / "out")
        yield folder, data
    sys.modules.pop("common.methods.text_shift", None)


def test_a_method_defined_outside_the_app_trains_predicts_and_exports(toy_run, tmp_path, capsys):
    """The run folder keeps the toy's weights under its own name; predict reproduces the run's held-out accuracy from
    them through the method's hooks; the export loads back to the same logits, and the card says what it holds."""
    run, data = toy_run
    summary = json.loads((run / "summary.json").read_text())
    assert (run / "shift_best.safetensors").is_file() and not (run / "adapter_best.safetensors").exists()
    clf = FedClipClassifier.from_run(run)
    assert clf.head is None and clf.info["weights"] == "shift"
    encoded = clf.encode(domain_folder(data, "sketch", clf.classes))
    assert accuracy(clf, encoded) == pytest.approx(summary["generalization"]["sketch"], abs=1e-6)
    assert accuracy(clf.zero_shot(), encoded) == pytest.approx(summary["zero_shot"]["sketch"], abs=1e-6)
    assert not torch.equal(clf.text, clf.zero_shot().text)  # the shift moved the class features

    folder = clf.export(tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "class_text_features.safetensors",
        "config.json",
        "shift.safetensors",
    ]
    assert "The shift that method text_shift trained (24 parameters)" in (folder / "README.md").read_text()
    loaded = FedClipClassifier.from_pretrained(folder)
    assert torch.equal(loaded.logits(encoded.features), clf.logits(encoded.features))
    assert predict_main(["--model", str(folder), str(data / "sketch")]) == 0
    header = next(line.split() for line in capsys.readouterr().err.splitlines() if line.split()[:1] == ["domain"])
    assert header[2] == "shift"


def test_an_export_naming_a_class_outside_the_app_is_refused(toy_run, tmp_path):
    """An export's config.json is a file from elsewhere: its method's `_target_` must name a Method class of this app
    (not any callable Hydra could import)."""
    run, _ = toy_run
    folder = FedClipClassifier.from_run(run, which="final").export(tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "method": {"_target_": "os.system", "name": "x"}}))
    with pytest.raises(ValueError, match="is not a method of this app"):
        FedClipClassifier.from_pretrained(folder)


def test_the_loop_predict_and_the_client_import_no_concrete_method():
    """server_app/, predict/ and the ClientApp reach methods only through common/methods/base.py."""
    files = [*sorted((ROOT / "server_app").glob("*.py")), *sorted((ROOT / "predict").glob("*.py"))]
    files.append(ROOT / "client_app" / "app.py")
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.startswith("common.methods.")]
    assert all(line.endswith(": common.methods.base") for line in found), textwrap.indent("\n".join(found), "  ")
