import numpy as np
import pytest
from omegaconf import OmegaConf

from common.data import dataset_classes, dataset_domains, dataset_root, domain_folder, read_image, split_domain


def cfg_for(root, held_out="sketch", domains=None):
    return OmegaConf.create({"dataset": {"root": str(root), "domains": domains, "held_out": held_out, "split": [0.6, 0.2, 0.2]}})


def test_split_is_deterministic_disjoint_and_complete():
    a = split_domain(101, [0.6, 0.2, 0.2], seed=0, domain="photo")
    b = split_domain(101, [0.6, 0.2, 0.2], seed=0, domain="photo")
    for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        np.testing.assert_array_equal(x, y)
    assert (len(a.train), len(a.val), len(a.test)) == (61, 20, 20)
    everything = np.concatenate([a.train, a.val, a.test])
    assert len(set(everything.tolist())) == 101 and sorted(everything.tolist()) == list(range(101))
    other = split_domain(101, [0.6, 0.2, 0.2], seed=1, domain="photo")
    assert not np.array_equal(a.train, other.train)


def test_bad_split_fractions_are_rejected():
    with pytest.raises(ValueError, match="three fractions"):
        split_domain(10, [0.5, 0.5], seed=0, domain="x")


def test_folder_layout_is_read_with_shared_class_labels(image_folder):
    (image_folder / ".ipynb_checkpoints").mkdir()
    (image_folder / "__MACOSX" / "cat").mkdir(parents=True)
    (image_folder / "photo" / ".cache").mkdir()
    cfg = cfg_for(image_folder)
    root = dataset_root(cfg)
    domains = dataset_domains(cfg, root)
    assert domains == ["art", "photo", "sketch"]
    classes = dataset_classes(root, domains)
    assert classes == ["bird", "cat", "dog"]
    folder = domain_folder(root, "photo", classes)
    assert len(folder.paths) == 15 and sorted(set(folder.labels)) == [0, 1, 2]
    assert all(folder.paths[i].parent.name == classes[folder.labels[i]] for i in range(15))


def test_unknown_domain_and_held_out_are_clear_errors(image_folder):
    with pytest.raises(ValueError, match="valid domains: art, photo, sketch"):
        dataset_domains(cfg_for(image_folder, domains=["art", "clipart"]), image_folder)
    with pytest.raises(ValueError, match="held_out='real'"):
        dataset_domains(cfg_for(image_folder, held_out="real"), image_folder)


def test_missing_root_says_what_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="ROOT/<domain>/<class>/<image>"):
        dataset_root(cfg_for(tmp_path / "nope"))


def test_corrupt_image_is_skipped_not_fatal(image_folder, caplog):
    assert read_image(image_folder / "art" / "cat" / "broken.jpg") is None
    assert "skipping unreadable image" in caplog.text
    assert read_image(image_folder / "art" / "cat" / "0.png").size == (20, 20)
