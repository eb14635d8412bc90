import pytest
import torch
import torch.nn.functional as F

from common.model import AttentionAdapter, adapter_loss, class_logits, class_prompts


def test_adapter_parameter_count_matches_paper():
    assert sum(p.numel() for p in AttentionAdapter(512).parameters()) == 525_312


def test_adapter_is_softmax_attention_times_features():
    torch.manual_seed(0)
    adapter = AttentionAdapter(8)
    f = torch.randn(5, 8)
    a = torch.softmax(adapter.fc2(torch.tanh(adapter.fc1(f))), dim=-1)
    assert torch.allclose(adapter(f), a * f)
    assert torch.allclose(a.sum(-1), torch.ones(5))


def test_zero_shot_logits_are_scaled_cosine():
    img, txt, scale = torch.randn(4, 6), torch.randn(3, 6), torch.tensor(2.0)
    expected = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    assert torch.allclose(class_logits(img, txt, scale, None), expected)


def test_contrastive_loss_is_the_reference_symmetric_clip_loss():
    torch.manual_seed(0)
    img, txt, scale = torch.randn(6, 5), torch.randn(3, 5), torch.tensor(1.0)
    labels = torch.tensor([0, 1, 1, 2, 0, 2])  # repeated classes: identical prompts count as negatives
    logits = class_logits(img, txt, scale, None)
    batch_text = F.normalize(txt[labels], dim=-1)
    per_image = scale.exp() * F.normalize(img, dim=-1) @ batch_text.T
    target = torch.arange(6)
    expected = (F.cross_entropy(per_image, target) + F.cross_entropy(per_image.T, target)) / 2
    assert torch.allclose(adapter_loss(logits, labels, "contrastive"), expected)
    assert torch.allclose(adapter_loss(logits, labels, "cross_entropy"), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="choose one of cross_entropy, contrastive"):
        adapter_loss(logits, labels, "hinge")


def test_prompts_clean_class_names():
    assert class_prompts(["art_painting", "dog"], "a picture of a {}") == [
        "a picture of a art painting",
        "a picture of a dog",
    ]


def test_a_clip_that_does_not_fit_its_device_says_so_in_one_line_naming_what_to_change(tiny_clip, monkeypatch):
    """Many client actors on one GPU: the one that runs out of memory loading CLIP says what to change, not a CUDA
    allocator dump (its node's reply carries the line to the server's log)."""
    from transformers import CLIPModel

    from common.model import load_clip

    def full(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.10 GiB total ...)")

    monkeypatch.setattr(CLIPModel, "to", full)
    with pytest.raises(RuntimeError) as raised:
        load_clip(str(tiny_clip), torch.device("cpu"))
    message = str(raised.value)
    assert "\n" not in message and f"CLIP {tiny_clip} (" in message and "GiB of weights) does not fit" in message
    assert "client-resources-num-gpus" in message and "docs/scale.md" in message
