import numpy as np
import pytest
import torch

from common.config import load_config
from common.data import dataset_domains, dataset_root, domain_images
from common.features import domain_features, features_key
from common.partition import client_images, client_name, shard_domain, split_domain
from common.sources import HubDomain
from tests.conftest import write_image_folder


def folder_cfg(root, *overrides, held_out="sketch"):
    return load_config(["dataset=folder", f"dataset.root={root}", f"dataset.held_out={held_out}", *overrides])


def hub_cfg(copy, *overrides):
    return load_config(
        ["dataset=pacs", "dataset.source=hub", f"dataset.hub_id={copy}", "dataset.held_out=sketch", *overrides]
    )


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
    cfg = folder_cfg(image_folder)
    assert dataset_domains(cfg) == ["art", "photo", "sketch"]
    images = domain_images(cfg, "photo")
    assert images.classes == ["bird", "cat", "dog"]
    assert len(images) == 15 and sorted(set(images.labels)) == [0, 1, 2]
    assert all(images.paths[i].parent.name == images.classes[images.labels[i]] for i in range(15))


def test_folder_with_a_corrupt_file_is_read_with_it_skipped_and_counted(image_folder, caplog):
    images = domain_images(folder_cfg(image_folder), "art")
    read = [images.read(i) for i in range(len(images))]
    skipped = [images.name(i) for i, img in enumerate(read) if img is None]
    assert len(images) == 16 and len(skipped) == 1 and skipped[0].endswith("art/cat/broken.jpg")
    assert "skipping unreadable image" in caplog.text


def test_configured_classes_fix_the_label_order_and_unknown_class_folders_are_errors(image_folder):
    images = domain_images(folder_cfg(image_folder, "dataset.classes=[dog,cat,bird,fish]"), "photo")
    assert images.classes == ["dog", "cat", "bird", "fish"]  # fish: a class this folder lacks, allowed
    assert all(images.paths[i].parent.name == images.classes[images.labels[i]] for i in range(len(images)))
    with pytest.raises(ValueError, match=r"class folder\(s\) \['dog'\] that are not among the 2 classes"):
        domain_images(folder_cfg(image_folder, "dataset.classes=[cat,bird]"), "photo")


def test_unknown_domain_and_held_out_are_clear_errors(image_folder):
    with pytest.raises(ValueError, match="valid domains: art, photo, sketch"):
        dataset_domains(folder_cfg(image_folder, "dataset.domains=[art,clipart]"))
    with pytest.raises(ValueError, match="held_out='real'"):
        dataset_domains(folder_cfg(image_folder, held_out="real"))


def test_benchmark_domain_typo_lists_the_valid_domains(tmp_path):
    root = write_image_folder(
        tmp_path / "PACS", domains=("art_painting", "cartoon", "photo", "sketch"), classes=("dog", "horse")
    )
    cfg = load_config(["dataset=pacs", f"dataset.root={root}", "dataset.held_out=sketch"])
    assert dataset_domains(cfg) == ["art_painting", "cartoon", "photo", "sketch"]
    assert domain_images(cfg, "photo").classes[:2] == ["dog", "elephant"]  # the benchmark's 7 classes, in its order
    with pytest.raises(ValueError, match="held_out='skech'.*valid: art_painting, cartoon, photo, sketch"):
        dataset_domains(load_config(["dataset=pacs", f"dataset.root={root}", "dataset.held_out=skech"]))
    with pytest.raises(ValueError, match=r"\['paint'\] not found.*valid domains: art_painting, cartoon, photo, sketch"):
        dataset_domains(
            load_config(
                ["dataset=pacs", f"dataset.root={root}", "dataset.held_out=sketch", "dataset.domains=[paint,sketch]"]
            )
        )


@pytest.mark.parametrize(
    "name, num_domains, num_classes",
    [("pacs", 4, 7), ("vlcs", 4, 5), ("office_home", 4, 65), ("domainnet", 6, 345), ("terra_incognita", 4, 10)],
)
def test_benchmark_configs_name_every_domain_and_class_once(name, num_domains, num_classes):
    dataset = load_config([f"dataset={name}"], complete=False).dataset
    assert len(set(dataset.domains)) == len(dataset.domains) == num_domains
    assert len(set(dataset.classes)) == len(dataset.classes) == num_classes
    assert list(dataset.classes) == sorted(dataset.classes)  # DomainBed's (ImageFolder's) label order
    assert dataset.clients_per_domain == 1 and dataset.source == "folder"


def test_missing_root_says_what_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="ROOT/<domain>/<class>/<image>"):
        dataset_root(folder_cfg(tmp_path / "nope"))


def test_saved_hub_dataset_goes_through_flwr_datasets_with_its_corrupt_image_skipped(hub_dataset, caplog):
    cfg = hub_cfg(hub_dataset)
    assert dataset_domains(cfg) == ["art_painting", "cartoon", "photo", "sketch"]
    images = domain_images(cfg, "art_painting")
    assert isinstance(images, HubDomain) and len(images) == 12
    assert images.classes == list(load_config(["dataset=pacs"], complete=False).dataset.classes)
    # the hub's ClassLabel order (giraffe, dog, elephant) is mapped onto the configured order by name
    assert images.labels == [2] * 4 + [0] * 4 + [1] * 4
    read = [images.read(i) for i in range(len(images))]
    assert [i for i, img in enumerate(read) if img is None] == [1]
    assert "skipping unreadable image" in caplog.text and images.name(1).endswith("art_painting[1]")
    assert all(img.mode == "RGB" and img.size == (20, 20) for img in read if img is not None)
    other = domain_images(cfg, "photo")
    assert len(other) == 12 and all(img is not None for img in map(other.read, range(12)))


def test_hub_domain_typo_and_missing_dataset_are_clear_errors(hub_dataset, tmp_path):
    with pytest.raises(
        ValueError, match=r"\['Sketch'\] not found in .*valid domains: art_painting, cartoon, photo, sketch"
    ):
        dataset_domains(hub_cfg(hub_dataset, "dataset.domains=[photo,Sketch]"))
    with pytest.raises(RuntimeError, match="hf download flwrlabs/pacs --repo-type dataset"):
        dataset_domains(load_config(["dataset=pacs", "dataset.source=hub", "dataset.held_out=sketch"]))  # offline
    with pytest.raises(ValueError, match=r"classes \['giraffe'\] of .* are not in dataset.classes"):
        domain_images(hub_cfg(hub_dataset, "dataset.classes=[dog,elephant]"), "photo")


def test_hub_features_are_encoded_with_the_corrupt_image_skipped(hub_dataset, tiny_clip, tmp_path):
    images = domain_images(hub_cfg(hub_dataset), "art_painting")
    feats = domain_features(
        str(tiny_clip), images, "a picture of a {}", tmp_path / "cache", torch.device("cpu"), 5, "float32"
    )
    assert feats.image.shape == (11, 24) and feats.text.shape == (7, 24)
    assert len(feats.skipped) == 1 and feats.skipped[0].endswith("art_painting[1]")
    assert feats.labels.tolist() == [2] * 3 + [0] * 4 + [1] * 4


@pytest.mark.parametrize("partition", ["shards", "dirichlet"])
def test_shards_are_deterministic_disjoint_cover_the_domain_and_respect_k(partition):
    labels = np.repeat(np.arange(5), 40)
    for k in (1, 3, 7):
        shards = shard_domain(labels, k, partition, 0.5, seed=0, domain="photo")
        again = shard_domain(labels, k, partition, 0.5, seed=0, domain="photo")
        assert len(shards) == k and all(len(s) > 0 for s in shards)
        assert all(np.array_equal(a, b) for a, b in zip(shards, again))
        everything = np.concatenate(shards)
        assert sorted(everything.tolist()) == list(range(len(labels)))  # disjoint and complete
    other = shard_domain(labels, 3, partition, 0.5, seed=0, domain="sketch")
    assert not all(np.array_equal(a, b) for a, b in zip(shard_domain(labels, 3, partition, 0.5, 0, "photo"), other))


def test_equal_shards_and_dirichlet_skew():
    labels = np.repeat(np.arange(4), 100)
    assert [len(s) for s in shard_domain(labels, 3, "shards", 0.5, 0, "photo")] == [134, 133, 133]

    def largest_class_share(alpha):
        shards = shard_domain(labels, 4, "dirichlet", alpha, 0, "photo")
        return np.mean([np.bincount(labels[s], minlength=4).max() / len(s) for s in shards])

    assert largest_class_share(1000.0) < 0.35 < 0.6 < largest_class_share(0.05)  # 0.25 = every class equally


def test_impossible_shard_requests_are_clear_errors():
    with pytest.raises(ValueError, match="has 3 images, fewer than dataset.clients_per_domain=4"):
        shard_domain([0, 1, 2], 4, "shards", 0.5, 0, "photo")
    with pytest.raises(ValueError, match="left a client with no image in 10 draws.*dataset.partition=shards"):
        shard_domain([0] * 20, 5, "dirichlet", 0.001, 0, "photo")
    with pytest.raises(ValueError, match="dataset.partition='iid' is not one of: shards, dirichlet"):
        shard_domain([0] * 20, 2, "iid", 0.5, 0, "photo")
    with pytest.raises(ValueError, match="dirichlet_alpha must be positive"):
        shard_domain([0] * 20, 2, "dirichlet", 0.0, 0, "photo")


def test_client_images_are_shards_of_their_domain(image_folder):
    cfg = folder_cfg(
        image_folder, "dataset.clients_per_domain=3", "dataset.partition=dirichlet", "dataset.dirichlet_alpha=1.0"
    )
    domain = domain_images(cfg, "photo")
    shards = [client_images(cfg, "photo", s) for s in range(3)]
    assert sorted(p for s in shards for p in s.paths) == sorted(domain.paths)
    assert all(len(s) > 0 and s.labels == [domain.labels[domain.paths.index(p)] for p in s.paths] for s in shards)
    assert [client_name("photo", s, 3) for s in range(3)] == ["photo#0", "photo#1", "photo#2"] and client_name(
        "photo", 0, 1
    ) == "photo"
    with pytest.raises(ValueError, match="shard 3 does not exist: dataset.clients_per_domain=3"):
        client_images(cfg, "photo", 3)


def test_feature_cache_key_differs_between_shards_and_sources(image_folder, hub_dataset):
    cfg = folder_cfg(image_folder, "dataset.clients_per_domain=2")
    key = lambda images: features_key("model", images, ["p"], "float32")  # noqa: E731
    folder_keys = {key(domain_images(cfg, "art")), key(client_images(cfg, "art", 0)), key(client_images(cfg, "art", 1))}
    hub = hub_cfg(hub_dataset, "dataset.clients_per_domain=2")
    hub_keys = {
        key(domain_images(hub, "photo")),
        key(client_images(hub, "photo", 0)),
        key(client_images(hub, "photo", 1)),
    }
    assert len(folder_keys | hub_keys) == 6
    assert key(client_images(hub, "photo", 1)) in hub_keys  # and stable


def test_simulation_partition_ids_map_to_domain_and_shard(image_folder, tiny_clip, tmp_path):
    from client_app.node import NoClient, load_local_data

    def cfg():
        return load_config(
            f"dataset=folder dataset.root={image_folder} dataset.held_out=sketch dataset.clients_per_domain=2 "
            f"model.name_or_path={tiny_clip} cache_dir={tmp_path / 'cache'} device=cpu"
        )

    local = [load_local_data(cfg(), {"partition-id": p}) for p in range(6)]
    assert [x.client for x in local] == ["art#0", "art#1", "photo#0", "photo#1", "sketch#0", "sketch#1"]
    assert sum(len(x.images) for x in local[2:4]) == 15 and all(x.domain == "sketch" and x.held_out for x in local[4:])
    assert all(len(x.feats.labels) == len(x.split.train) + len(x.split.val) + len(x.split.test) for x in local)
    with pytest.raises(NoClient, match="the run has 6 clients"):  # a SuperNode beyond the run's clients sits it out
        load_local_data(cfg(), {"partition-id": 6})
    with pytest.raises(ValueError, match="node-config shard=0..1"):
        load_local_data(cfg(), {"domain": "photo", "data-dir": str(image_folder)})
    site = {"domain": "photo", "data-dir": str(image_folder), "cache-dir": str(tmp_path / "cache"), "device": "cpu"}
    deployed = load_local_data(cfg(), {**site, "shard": 1})
    assert deployed.client == "photo#1" and deployed.images.paths == local[3].images.paths
