import os
import shutil

import pytest
import torch

import common.features as features
import common.fingerprint as fingerprint
from common.data import dataset_classes, domain_folder
from common.features import domain_features
from common.model import load_clip
from tests.conftest import save_tiny_clip


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    real = features.encode_domain

    def counting(*args, **kwargs):
        calls.append(args[2].domain)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "encode_domain", counting)
    monkeypatch.setattr(features, "_MEMORY", {})
    monkeypatch.setattr(fingerprint, "_FILE_HASHES", {})
    return calls


def features_of(model_dir, root, cache, domain="art"):
    folder = domain_folder(root, domain, dataset_classes(root, ["art", "photo", "sketch"]))
    return domain_features(str(model_dir), folder, "a picture of a {}", cache, torch.device("cpu"), 4, "float32")


def test_features_are_encoded_once_and_reused_from_disk(tiny_clip, image_folder, tmp_path, count_encodes, monkeypatch):
    cache = tmp_path / "cache"
    first = features_of(tiny_clip, image_folder, cache)
    assert count_encodes == ["art"]
    assert first.image.shape == (15, 24) and first.text.shape == (3, 24)  # the corrupt file is skipped
    assert len(first.skipped) == 1 and first.skipped[0].endswith("broken.jpg")
    monkeypatch.setattr(features, "_MEMORY", {})  # a new process: only the disk cache is left
    monkeypatch.setattr(fingerprint, "_FILE_HASHES", {})
    again = features_of(tiny_clip, image_folder, cache)
    assert count_encodes == ["art"]
    assert torch.equal(first.image, again.image) and again.skipped == first.skipped


def test_cached_features_equal_a_fresh_clip_forward(tiny_clip, image_folder, tmp_path, count_encodes):
    feats = features_of(tiny_clip, image_folder, tmp_path / "cache", domain="photo")
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    from PIL import Image

    path = image_folder / "photo" / "bird" / "0.png"
    pixels = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"]
    expected = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(feats.image[0], expected[0], atol=1e-5)


def test_cache_is_invalidated_when_the_data_change(tiny_clip, image_folder, tmp_path, count_encodes):
    cache = tmp_path / "cache"
    features_of(tiny_clip, image_folder, cache)
    shutil.copy(image_folder / "art" / "dog" / "0.png", image_folder / "art" / "dog" / "new.png")
    features_of(tiny_clip, image_folder, cache)
    assert count_encodes == ["art", "art"]
    target = image_folder / "art" / "dog" / "1.png"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    features_of(tiny_clip, image_folder, cache)
    assert count_encodes == ["art", "art", "art"]


def test_cache_is_invalidated_when_the_model_changes(tmp_path, image_folder, count_encodes):
    cache = tmp_path / "cache"
    first = features_of(save_tiny_clip(tmp_path / "clip", seed=0), image_folder, cache)
    second = features_of(save_tiny_clip(tmp_path / "clip", seed=1), image_folder, cache)  # same folder, new weights
    assert count_encodes == ["art", "art"]
    assert not torch.allclose(first.image, second.image)


def test_saved_clip_loads_offline(tiny_clip):
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    assert model.config.projection_dim == 24 and not any(p.requires_grad for p in model.parameters())


def test_unavailable_hub_id_explains_how_to_use_a_local_folder(tmp_path, image_folder):
    # conftest makes the session offline with an empty HF_HOME, so the hub id cannot resolve
    with pytest.raises(RuntimeError, match="save_pretrained.*model.name_or_path=DIR"):
        load_clip("openai/clip-vit-base-patch32", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="neither a local folder"):
        features_of("openai/clip-vit-base-patch32", image_folder, tmp_path / "cache")


def test_model_fingerprint_follows_content_not_just_size_and_mtime(tmp_path, monkeypatch):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * (3 << 20))  # several MiB, like real weights
    stat = weights.stat()
    before = fingerprint.model_files_fingerprint(str(folder))
    weights.write_bytes(b"b" * (3 << 20))  # same size, same mtime (as cp -p or rsync -a leave it)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(fingerprint, "_FILE_HASHES", {})  # a new process
    assert fingerprint.model_files_fingerprint(str(folder)) != before


def test_unreadable_cache_entry_is_encoded_again(tiny_clip, image_folder, tmp_path, count_encodes, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first = features_of(tiny_clip, image_folder, cache)
    (entry,) = (cache / "features").glob("*.safetensors")
    entry.write_bytes(b"truncated")
    monkeypatch.setattr(features, "_MEMORY", {})
    again = features_of(tiny_clip, image_folder, cache)
    assert count_encodes == ["art", "art"] and "unreadable feature cache entry" in caplog.text
    assert torch.allclose(first.image, again.image)


def test_file_hashes_are_kept_on_disk_for_fresh_processes(tiny_clip, tmp_path, monkeypatch):
    first = fingerprint.model_files_fingerprint(str(tiny_clip), tmp_path)
    assert (tmp_path / "file-hashes.json").is_file()
    monkeypatch.setattr(fingerprint, "_FILE_HASHES", {})  # a fresh process
    monkeypatch.setattr(features.hashlib, "blake2b", _no_file_reads(features.hashlib.blake2b))
    assert fingerprint.model_files_fingerprint(str(tiny_clip), tmp_path) == first


def _no_file_reads(blake2b):
    """blake2b that fails once fed more than a few bytes: model files must not be read again."""

    class Guard:
        def __init__(self, *args, **kwargs):
            self.h = blake2b(*args, **kwargs)

        def update(self, data):
            assert len(data) < 4096, "a model file was hashed again"
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    return Guard


def test_encoding_progress_is_logged_at_a_steady_pace_with_the_rate_and_time_left(caplog):
    """One line every 5 s of work (not every batch) and one at the end: done of total, images per second, time left."""
    now = [0.0]
    progress = features.Progress("photo", 1000, every=5, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="common.features"):
        for _ in range(100):  # 100 batches of 10 images, one a second
            now[0] += 1
            progress.update(10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20  # t = 5, 10, ..., 100 s: the last is the end
    assert lines[0] == "[photo] encoded 50/1000 images (10 images/s), about 1m35s left"
    assert lines[-2] == "[photo] encoded 950/1000 images (10 images/s), about 5 s left"
    assert lines[-1] == "[photo] encoded 1000/1000 images (10 images/s)"


def test_encode_images_logs_its_progress(tiny_clip, image_folder, caplog):
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    images = domain_folder(image_folder, "photo", dataset_classes(image_folder, ["art", "photo", "sketch"]))
    with caplog.at_level("INFO", logger="common.features"):
        features.encode_images(model, processor, images, torch.device("cpu"), 4)
    assert caplog.records[-1].getMessage().startswith(f"[photo] encoded {len(images)}/{len(images)} images (")
