"""Datasets: sources, class subsets, decode-once archive caching, clear errors, reproducible batches."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from PIL import Image

import netslim.data.archive as archive
from netslim.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    IMAGENET_MEAN,
    ImageSet,
    batches,
    cache_location,
    calibration_subset,
    load_dataset,
    split_holdout,
)
from netslim.errors import NetslimError

torch.set_num_threads(1)

TOY_CLASSES = ["cat", "dog", "horse"]
TOY_COUNTS = {"train": 4, "test": 2}


def _png(color: tuple[int, int, int], size: int = 8, gray: bool = False) -> bytes:
    img = Image.new("RGB", (size, size), color)
    img.putpixel((1, 2), (255, 255, 255))  # mark orientation, so a transpose would show
    buf = io.BytesIO()
    (img.convert("L") if gray else img).save(buf, format="PNG")
    return buf.getvalue()


def _toy_files(eval_dir: str = "test", top: str = "toy") -> dict[str, bytes]:
    files = {}
    for split, n in TOY_COUNTS.items():
        folder = split if split == "train" else eval_dir
        for c, cls in enumerate(TOY_CLASSES):
            for i in range(n):
                color = (40 * c + i, 10 * i, 200 - 50 * c)
                files[f"{top}/{folder}/{cls}/{i:03d}.png"] = _png(color, gray=(cls == "horse" and i == 0))
    files[f"{top}/classes.txt"] = b"cat\ndog\nhorse\n"
    return files


def _write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


# ---------------------------------------------------------------- digits
def test_digits_splits() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 16, 16) and test.images.shape == (360, 1, 16, 16)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.classes == [str(i) for i in range(10)] and not train.hflip
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    total = train.class_counts() + test.class_counts()
    assert ((test.class_counts() - 0.2 * total).abs() <= 1).all()  # stratified 80/20
    assert train.mean == test.mean and 0.2 < train.mean[0] < 0.4 and 0.3 < train.std[0] < 0.5
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    # 2x2 nearest-neighbour upsampling of the 8x8 originals
    assert torch.equal(test.images[:, :, ::2, ::2], test.images[:, :, 1::2, 1::2])


def test_class_subset_relabels_in_given_order() -> None:
    full = load_dataset("digits", "test")
    sub = load_dataset("digits", "test", classes=["7", "3"])
    assert sub.classes == ["7", "3"] and set(sub.labels.tolist()) == {0, 1}
    assert (sub.labels == 0).sum() == (full.labels == 7).sum()
    assert torch.equal(sub.images[sub.labels == 1], full.images[full.labels == 3])
    assert sub.mean == full.mean
    by_index = load_dataset("digits", "test", classes=[7, 3])
    assert torch.equal(by_index.labels, sub.labels)


def test_class_errors() -> None:
    with pytest.raises(NetslimError, match="unknown class 'ten'"):
        load_dataset("digits", "train", classes=["1", "ten"])
    with pytest.raises(NetslimError, match="more than once"):
        load_dataset("digits", "train", classes=["1", "1"])
    with pytest.raises(NetslimError, match="split"):
        load_dataset("digits", "val")


# ---------------------------------------------------------------- archives
def test_archive_decoded_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_tar(tmp_path / "toy.tar.gz", _toy_files())
    cache = tmp_path / "cache"
    train = load_dataset(str(src), "train", cache_dir=cache)
    assert train.classes == TOY_CLASSES and train.images.shape == (12, 3, 8, 8)
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert train.mean == IMAGENET_MEAN  # not CIFAR classes
    assert train.images[5, :, 0, 0].tolist() == [41, 10, 150]  # dog 001: exact PNG pixels, CHW order
    assert train.images[5, :, 2, 1].tolist() == [255, 255, 255]
    horse0 = train.images[8]  # grayscale file became three equal channels
    assert torch.equal(horse0[0], horse0[1]) and torch.equal(horse0[1], horse0[2])
    assert list(cache_location(src, cache).glob("train_images.npy"))

    def no_decode(items):
        raise AssertionError("decoded again")

    monkeypatch.setattr(archive, "decode_images", no_decode)
    again = load_dataset(str(src), "train", cache_dir=cache)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    with pytest.raises(AssertionError, match="decoded again"):  # test split not cached yet
        load_dataset(str(src), "test", cache_dir=cache)
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed archive is decoded anew
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(str(src), "train", cache_dir=cache)


def test_zip_with_val_and_subset(tmp_path: Path) -> None:
    src = _write_zip(tmp_path / "toy.zip", _toy_files(eval_dir="val", top=""))
    test = load_dataset(str(src), "test", classes=["horse", "cat"], cache_dir=tmp_path / "c")
    assert test.classes == ["horse", "cat"] and test.labels.tolist() == [1, 1, 0, 0]
    assert test.images.shape == (4, 3, 8, 8)


def test_image_folder_directory(tmp_path: Path) -> None:
    for name, data in _toy_files().items():
        (tmp_path / "dir" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dir" / name).write_bytes(data)
    from_dir = load_dataset(str(tmp_path / "dir"), "test", cache_dir=tmp_path / "c")
    from_tar = load_dataset(str(_write_tar(tmp_path / "t.tgz", _toy_files())), "test", cache_dir=tmp_path / "c")
    assert torch.equal(from_dir.images, from_tar.images) and torch.equal(from_dir.labels, from_tar.labels)


def test_archive_errors(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    with pytest.raises(NetslimError, match="not found"):
        load_dataset(str(tmp_path / "missing.tar.gz"), "train", cache_dir=cache)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(NetslimError, match="corrupt"):
        load_dataset(str(junk), "train", cache_dir=cache)
    good = _write_tar(tmp_path / "good.tar.gz", _toy_files()).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(NetslimError, match="corrupt"):
        load_dataset(str(tmp_path / "cut.tar.gz"), "train", cache_dir=cache)
    files = _toy_files()
    files["toy/train/dog/bad.png"] = b"not an image"
    with pytest.raises(NetslimError, match="bad.png"):
        load_dataset(str(_write_tar(tmp_path / "badimg.tar.gz", files)), "train", cache_dir=cache)
    files = _toy_files()
    files["toy/train/dog/big.png"] = _png((1, 2, 3), size=10)
    with pytest.raises(NetslimError, match="one size"):
        load_dataset(str(_write_tar(tmp_path / "sizes.tar.gz", files)), "train", cache_dir=cache)
    files = {k: v for k, v in _toy_files().items() if "/test/" not in k}
    with pytest.raises(NetslimError, match="no test split"):
        load_dataset(str(_write_tar(tmp_path / "notest.tar.gz", files)), "test", cache_dir=cache)
    files = {k: v for k, v in _toy_files().items() if "/test/dog/" not in k}
    with pytest.raises(NetslimError, match="no test images of class 'dog'"):
        load_dataset(str(_write_tar(tmp_path / "nodog.tar.gz", files)), "test", ["cat", "dog"], cache_dir=cache)
    with pytest.raises(NetslimError, match="cifar10"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}", "train")


def test_real_cifar10_test_split() -> None:
    """The shared CIFAR-10 JPEG archive: 10,000 test images, 1,000 per class (decoded once into the cache)."""
    ds = load_dataset(str(shared_path("data/cifar10-jpeg.tar.gz")), "test")
    assert ds.images.shape == (10_000, 3, 32, 32)
    assert ds.class_counts().tolist() == [1000] * 10
    assert ds.classes == CIFAR10_CLASSES and ds.mean == CIFAR10_MEAN and ds.hflip


# ---------------------------------------------------------------- subsets
def _toy_set(n_per_class: tuple[int, ...] = (30, 20, 10)) -> ImageSet:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    images = torch.randint(0, 256, (len(labels), 3, 8, 8), dtype=torch.uint8)
    return ImageSet(images, labels, ["a", "b", "c"][: len(n_per_class)], (0.5,) * 3, (0.25,) * 3)


def test_calibration_subset_is_stratified_and_reproducible() -> None:
    ds = _toy_set()
    sub = calibration_subset(ds, 12, seed=3)
    assert len(sub) == 12 and sub.class_counts().tolist() == [6, 4, 2]
    assert torch.equal(sub.images, calibration_subset(ds, 12, seed=3).images)
    assert not torch.equal(sub.images, calibration_subset(ds, 12, seed=4).images)
    assert calibration_subset(ds, 1000) is ds
    with pytest.raises(NetslimError):
        calibration_subset(ds, 0)


def test_split_holdout() -> None:
    ds = _toy_set()
    train, val = split_holdout(ds, 0.1, seed=1)
    assert len(train) == 54 and val.class_counts().tolist() == [3, 2, 1]
    rows = {bytes(x.numpy()) for x in train.images}
    assert not rows & {bytes(x.numpy()) for x in val.images}
    with pytest.raises(NetslimError):
        split_holdout(ds, 1.0)


# ---------------------------------------------------------------- batches
def test_batches_normalise_without_augmentation() -> None:
    ds = _toy_set()
    it = batches(ds, 16)
    assert len(it) == 4 and len(batches(ds, 16, drop_last=True)) == 3
    xs, ys = zip(*it, strict=True)
    assert [len(y) for y in ys] == [16, 16, 16, 12]
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and torch.equal(torch.cat(ys), ds.labels)
    assert torch.allclose((x * 0.25 + 0.5) * 255, ds.images.float(), atol=1e-3)


def test_batches_reproducible_per_epoch() -> None:
    ds = _toy_set()

    def epoch(b) -> list[torch.Tensor]:
        return [t for pair in b for t in pair]

    a, b = batches(ds, 16, shuffle=True, augment=True, seed=5), batches(ds, 16, shuffle=True, augment=True, seed=5)
    a0, a1 = epoch(a), epoch(a)
    assert all(torch.equal(p, q) for p, q in zip(a0, epoch(b), strict=True))
    assert all(torch.equal(p, q) for p, q in zip(a1, epoch(b), strict=True))
    assert not torch.equal(a0[1], a1[1])  # each epoch shuffles differently
    c = batches(ds, 16, shuffle=True, augment=True, seed=5)
    c.set_epoch(1)
    assert all(torch.equal(p, q) for p, q in zip(a1, epoch(c), strict=True))
    assert sorted(torch.cat(a0[1::2]).tolist()) == sorted(ds.labels.tolist())


def test_augmentation_is_padded_crop_and_flip() -> None:
    ds = _toy_set((8, 8))
    out = [(x, y) for x, y in batches(ds, 16, augment=True, seed=0)]
    x = out[0][0]
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32
    raw = torch.round((x * 0.25 + 0.5) * 255).to(torch.uint8)
    padded = torch.nn.functional.pad(ds.images, (4, 4, 4, 4))
    flipped = 0
    for i in range(16):
        candidates = [(padded[i, :, r:r + 8, c:c + 8], f) for r in range(9) for c in range(9) for f in (0, 1)]
        matches = [f for crop, f in candidates if torch.equal(crop.flip(2) if f else crop, raw[i])]
        assert matches, f"sample {i} is not a padded crop of its image"
        flipped += matches[0]
    assert 0 < flipped < 16
    digits = load_dataset("digits", "test")
    assert not batches(digits, 8, augment=True).flip  # mirrored digits change meaning
