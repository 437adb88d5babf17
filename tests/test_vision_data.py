"""Image data sets (vision_ext.data): the file formats, the splits, and the batches."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vision_ext.data import (
    FASHION_MNIST_DIR,
    ImageData,
    VisionDataConfig,
    load_cifar,
    load_fashion_mnist,
    load_image_folder,
    load_vision_data,
    read_idx,
    split_rows,
)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """``array`` (uint8) as an IDX file: zero bytes, dtype code 0x08, ndim, big-endian dims."""
    content = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    content += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def write_fashion_mnist(folder: Path, n_train: int = 20, n_test: int = 5) -> Path:
    """A tiny Fashion-MNIST folder: pixel value = row id mod 256, label = row id mod 10."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, start, count in (("train", 0, n_train), ("t10k", n_train, n_test)):
        ids = np.arange(start, start + count)
        write_idx(folder / f"{name}-images-idx3-ubyte.gz", np.broadcast_to((ids % 256)[:, None, None], (count, 28, 28)), True)
        write_idx(folder / f"{name}-labels-idx1-ubyte.gz", ids % 10, True)
    return folder


def tiny_data(n: int = 12, channels: int = 3, size: int = 6, **options) -> ImageData:
    """``n`` random uint8 images, label = row id mod 3, all rows in ``train``."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    splits = {"train": torch.arange(n)}
    options = {"mean": [0.5] * channels, "std": [0.25] * channels, **options}
    return ImageData(images, torch.arange(n) % 3, ["a", "b", "c"], splits, **options)


# --- file formats -------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_reads_images_and_labels(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    got_images = read_idx(write_idx(tmp_path / "images", images, compress))
    got_labels = read_idx(write_idx(tmp_path / "labels", labels, compress))
    assert got_images.shape == (2, 3, 4) and np.array_equal(got_images, images)
    assert got_labels.shape == (2,) and np.array_equal(got_labels, labels)


def test_a_truncated_idx_file_is_refused_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "cut-images-idx3-ubyte", np.zeros((4, 5, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"cut-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_a_cut_off_gzip_is_refused_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "cut.gz", np.zeros((4, 5, 5), dtype=np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"cut\.gz"):
        read_idx(path)


def test_a_file_without_the_idx_magic_number_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    with pytest.raises(ValueError, match=r"photo\.png.*magic number"):
        read_idx(path)


def write_cifar10(folder: Path, per_batch: int = 2) -> Path:
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.full((per_batch, 3072), i, dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [i] * per_batch}, f)  # bytes keys, as shipped
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{k}".encode() for k in range(10)]}, f)
    return folder


def test_load_cifar_reads_a_cifar10_folder(tmp_path):
    image_set = load_cifar(write_cifar10(tmp_path / "cifar-10-batches-py"))
    assert image_set.name == "cifar10" and image_set.classes[:2] == ["class0", "class1"]
    assert image_set.train_images.shape == (10, 3, 32, 32) and image_set.train_images.dtype == torch.uint8
    assert image_set.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert image_set.test_images.shape == (2, 3, 32, 32) and image_set.test_labels.tolist() == [5, 5]
    assert int(image_set.train_images[9].max()) == 4  # batch 5's pixels, in order


def test_load_cifar_reads_a_cifar100_folder_with_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    pixels = np.arange(3072, dtype=np.uint8)[None].repeat(3, 0)  # channel-major: R plane first
    for name, fine in (("train", [3, 1, 2]), ("test", [0, 0, 99])):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "fine_labels": fine, "coarse_labels": [0, 0, 0]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{k}" for k in range(100)], "coarse_label_names": ["c"]}, f)
    image_set = load_cifar(folder)
    assert image_set.name == "cifar100" and len(image_set.classes) == 100
    assert image_set.train_labels.tolist() == [3, 1, 2] and image_set.test_labels.tolist() == [0, 0, 99]
    assert image_set.train_images[0, 1, 0, 0].item() == 1024 % 256  # green plane starts at byte 1024


def test_a_cifar10_config_finds_the_extracted_folder_under_its_path(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_vision_data(VisionDataConfig(dataset="cifar10", path=str(tmp_path), valid_fraction=0.2))
    assert data.summary()["split_sizes"] == {"train": 8, "valid": 2, "test": 2}


def test_a_missing_cifar_folder_says_where_to_download_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz.*cifar-10-batches-py"):
        load_cifar(tmp_path)


def test_load_image_folder_reads_a_tree_of_pngs(tmp_path):
    from PIL import Image

    for part, count in (("train", 2), ("val", 1)):
        for name, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / part / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 8), color).save(tmp_path / part / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    image_set = load_image_folder(tmp_path, image_size=4)
    assert image_set.classes == ["cat", "dog"]
    assert image_set.train_images.shape == (4, 3, 4, 4) and image_set.train_labels.tolist() == [0, 0, 1, 1]
    assert image_set.test_labels.tolist() == [0, 1]
    assert image_set.train_images[0, :, 0, 0].tolist() == [255, 0, 0]  # RGB, channel first
    assert image_set.test_images[1, :, 2, 2].tolist() == [0, 0, 255]


def test_a_missing_fashion_mnist_folder_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


# --- config and splits --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, key",
    [
        ({"dataset": "mnist"}, "data.dataset"),
        ({"valid_fraction": 1.0}, "data.valid_fraction"),
        ({"train_limit": 0}, "data.train_limit"),
        ({"mean": [0.5, 0.5, 0.5]}, "data.mean"),  # Fashion-MNIST has one channel
        ({"dataset": "cifar10"}, "data.path"),
        ({"dataset": "image_folder", "path": "/x"}, "data.image_size"),
        ({"augment": {"crop_padding": -1}}, "data.augment.crop_padding"),
    ],
)
def test_a_bad_config_value_is_refused_naming_its_key(options, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        VisionDataConfig(**options)


def test_splits_are_disjoint_cover_the_train_set_and_test_is_the_official_test_set():
    splits = split_rows(100, 30, valid_fraction=0.2, seed=3)
    train, valid = set(splits["train"].tolist()), set(splits["valid"].tolist())
    assert len(valid) == 20 and not train & valid and train | valid == set(range(100))
    assert splits["test"].tolist() == list(range(100, 130))


def test_splits_repeat_for_a_seed_and_change_with_it():
    first, again, other = (split_rows(100, 0, 0.2, seed) for seed in (3, 3, 4))
    assert torch.equal(first["valid"], again["valid"]) and torch.equal(first["train"], again["train"])
    assert not torch.equal(first["valid"], other["valid"])


def test_train_limit_subsamples_train_and_leaves_valid_and_test_alone():
    full, limited = split_rows(100, 30, 0.2, 3), split_rows(100, 30, 0.2, 3, train_limit=25)
    assert len(limited["train"]) == 25 and set(limited["train"].tolist()) <= set(full["train"].tolist())
    assert limited["train"].tolist() != list(range(25))  # a random subsample, not the first rows
    assert torch.equal(limited["valid"], full["valid"]) and torch.equal(limited["test"], full["test"])


def test_load_vision_data_stacks_train_then_test_rows_with_their_labels(tmp_path):
    folder = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=5)
    data = load_vision_data(VisionDataConfig(path=str(folder), valid_fraction=0.25, train_limit=10))
    assert len(data) == 25 and data.summary()["split_sizes"] == {"train": 10, "valid": 5, "test": 5}
    assert data.summary()["image_shape"] == [1, 28, 28] and data.classes[9] == "Ankle boot"
    rows = data.splits["test"]
    assert torch.equal(data.labels[rows], rows % 10) and torch.equal(data.images[rows, 0, 0, 0].long(), rows)


# --- batches ------------------------------------------------------------------------------


def test_a_batch_maps_a_known_pixel_to_its_normalized_value(tmp_path):
    folder = write_fashion_mnist(tmp_path / "fm")
    data = load_vision_data(VisionDataConfig(path=str(folder), mean=[0.3], std=[0.4]))
    batch = data.batch(torch.tensor([17, 3]))
    expected = (torch.tensor([17.0, 3.0]) / 255 - 0.3) / 0.4
    assert batch.images.dtype == torch.float32 and batch.images.shape == (2, 1, 28, 28)
    assert torch.allclose(batch.images[:, 0, 5, 5], expected)
    assert batch.labels.tolist() == [7, 3] and batch.rows.tolist() == [17, 3]


def test_batches_are_resized_to_image_size():
    batch = tiny_data(size=6, image_size=10).batch(torch.arange(4))
    assert batch.images.shape == (4, 3, 10, 10)


def test_augmentation_happens_only_for_training_batches():
    data = tiny_data(crop_padding=2, horizontal_flip=True)
    rows = torch.arange(12)
    plain = data.batch(rows)
    assert plain.deterministic and torch.equal(plain.images, data.batch(rows).images)
    torch.manual_seed(0)
    augmented = data.batch(rows, train=True)
    assert not augmented.deterministic and not torch.equal(augmented.images, plain.images)
    assert augmented.images.shape == plain.images.shape


def test_augmentation_repeats_under_the_same_torch_seed():
    data = tiny_data(crop_padding=2, horizontal_flip=True)
    torch.manual_seed(7)
    first = data.batch(torch.arange(12), train=True).images
    torch.manual_seed(7)
    assert torch.equal(first, data.batch(torch.arange(12), train=True).images)


def test_a_flip_mirrors_some_images_and_leaves_the_others():
    data = tiny_data(n=64, size=5, horizontal_flip=True)
    plain = data.batch(torch.arange(64)).images
    flipped = data.batch(torch.arange(64), train=True).images
    mirrored = [torch.equal(image, original.flip(-1)) for image, original in zip(flipped, plain)]
    kept = [torch.equal(image, original) for image, original in zip(flipped, plain)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_a_crop_cuts_each_image_from_its_zero_padded_original_at_a_random_offset():
    data = tiny_data(n=64, size=5, crop_padding=1)
    plain = data.batch(torch.arange(64)).images
    cropped = data.batch(torch.arange(64), train=True).images
    zero = (0 - 0.5) / 0.25  # a padded (black) pixel, normalized
    offsets = []
    for image, original in zip(cropped, plain):
        padded = torch.nn.functional.pad(original, (1, 1, 1, 1), value=zero)  # [C, 7, 7]
        found = [(t, l) for t in range(3) for l in range(3) if torch.equal(image, padded[:, t : t + 5, l : l + 5])]
        assert found, "a crop is not a window of the padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 3  # offsets vary across the batch


def test_training_without_augmentation_keeps_batches_deterministic():
    data = tiny_data(crop_padding=0, horizontal_flip=False)
    assert data.batch(torch.arange(4), train=True).deterministic


def test_select_rows_keeps_images_labels_and_rows_aligned():
    data = tiny_data()
    batch = data.batch(torch.tensor([9, 2, 7, 4]))
    sub = batch.select_rows(torch.tensor([3, 1]))
    assert sub.rows.tolist() == [4, 2] and sub.labels.tolist() == [4 % 3, 2 % 3]
    assert torch.equal(sub.images, data.batch(torch.tensor([4, 2])).images) and len(sub) == 2


def test_batches_cover_a_split_in_the_seeded_order():
    data = tiny_data(n=10)
    shuffled = [b.rows for b in data.batches("train", 4, shuffle=True, seed=1)]
    expected = torch.arange(10)[torch.randperm(10, generator=torch.Generator().manual_seed(1))]
    assert [len(r) for r in shuffled] == [4, 4, 2] and data.num_batches("train", 4) == 3
    assert torch.equal(torch.cat(shuffled), expected)
    assert [len(b) for b in data.batches("train", 4, drop_last=True)] == [4, 4]


def test_the_task_is_classification_over_the_classes():
    tasks = pytest.importorskip("recdistill.training.tasks")
    task = tiny_data().task
    assert isinstance(task, tasks.ClassificationTask) and task.classes == ["a", "b", "c"]


# --- the real data set --------------------------------------------------------------------


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_the_real_fashion_mnist_has_60000_train_and_10000_test_images_of_10_classes():
    image_set = load_fashion_mnist()
    assert image_set.train_images.shape == (60000, 1, 28, 28) and image_set.test_images.shape == (10000, 1, 28, 28)
    assert len(image_set.classes) == 10
    for labels in (image_set.train_labels, image_set.test_labels):
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels).tolist() == [len(labels) // 10] * 10  # balanced, as published


def test_a_mixup_transfer_set_mixes_two_distinct_training_images_unlabelled_after_the_datas_rows(tmp_path):
    data = load_vision_data(VisionDataConfig(path=str(write_fashion_mnist(tmp_path, 40, 5)), valid_fraction=0.25,
                                             augment={"crop_padding": 0}))  # fmt: skip
    mixes = data.transfer_set(300, "mixup", seed=3)
    train = set(data.splits["train"].tolist())
    assert set(mixes.first.tolist()) <= train and set(mixes.second.tolist()) <= train
    assert bool((mixes.first != mixes.second).all())
    batch = mixes.batch(torch.arange(300))
    assert batch.labels.tolist() == [-100] * 300 and batch.rows.tolist() == list(range(len(data), len(data) + 300))
    share = mixes.share.view(-1, 1, 1, 1)
    expected = share * data.batch(mixes.first).images + (1 - share) * data.batch(mixes.second).images
    assert torch.allclose(batch.images, expected, atol=1e-6) and batch.deterministic  # no augmentation: cacheable
    again = data.transfer_set(300, "mixup", seed=3)
    assert torch.equal(again.first, mixes.first) and torch.equal(again.share, mixes.share)
    assert not torch.equal(data.transfer_set(300, "mixup", seed=4).share, mixes.share)
    with pytest.raises(ValueError, match="images take 'mixup', got 'popularity'"):
        data.transfer_set(10, "popularity")


def test_an_augmented_mixup_batch_draws_fresh_crops_and_is_not_cached(tmp_path):
    data = load_vision_data(VisionDataConfig(path=str(write_fashion_mnist(tmp_path, 40, 5)), valid_fraction=0.25,
                                             augment={"crop_padding": 2}))  # fmt: skip
    batch = data.transfer_set(50, "mixup").batch(torch.arange(50))
    assert not batch.deterministic and batch.images.shape == (50, 1, 28, 28)
