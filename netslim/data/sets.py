"""Datasets as whole uint8 tensors in memory, with the normalisation that belongs to them.

Every source (sklearn digits, torchvision CIFAR, ImageFolder archives and directories) becomes one
ImageSet, so training, calibration and evaluation code never sees where images came from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from netslim.data.archive import DecodedSplit, default_cache_dir, is_archive, load_image_folder
from netslim.errors import NetslimError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLITS = ("train", "test")


@dataclass
class ImageSet:
    """images: uint8 N x C x H x W; labels: int64 (N,) in 0..len(classes)-1; mean/std per channel on [0, 1].

    hflip says whether mirroring keeps the label (false for digits), so augmentation can respect it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise NetslimError(f"images must be a uint8 N x C x H x W tensor, got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise NetslimError(f"labels must be int64 of shape ({len(self.images)},), got {self.labels.dtype} "
                               f"{tuple(self.labels.shape)}")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise NetslimError(f"mean/std need {channels} values, got {len(self.mean)}/{len(self.std)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> ImageSet:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return replace(self, images=self.images[idx], labels=self.labels[idx])


# ---------------------------------------------------------------- sources
def _digits(split: str) -> ImageSet:
    """sklearn's 1,797 8x8 digits (values 0..16) as 1x16x16 uint8, split 80/20 stratified with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    pixels = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    pixels = pixels.repeat(2, axis=1).repeat(2, axis=2)[:, None]  # nearest-neighbour 16x16
    labels = data.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                           random_state=0)
    train_pixels = pixels[train_idx].astype(np.float64) / 255.0
    mean, std = (float(train_pixels.mean()),), (float(train_pixels.std()),)
    idx = train_idx if split == "train" else test_idx
    return ImageSet(torch.from_numpy(pixels[idx]), torch.from_numpy(labels[idx]),
                    [str(i) for i in range(10)], mean, std, hflip=False)


def _cifar(kind: str, root: str | None, split: str, cache_dir: Path | None, download: bool) -> ImageSet:
    """torchvision's CIFAR-10/100 python format under `root` (default: <cache>/cifar)."""
    import torchvision.datasets as tvd

    path = Path(root).expanduser() if root else (cache_dir or default_cache_dir()) / "cifar"
    if not path.exists() and not download:
        raise NetslimError(f"{kind} root {path} does not exist (pass download=True to fetch it there)")
    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    try:
        ds = cls(str(path), train=split == "train", download=download)
    except RuntimeError as exc:
        raise NetslimError(f"no {kind} data in {path}: {exc}") from exc
    except OSError as exc:
        raise NetslimError(f"cannot download or read {kind} into {path}: {exc}") from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if kind == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return ImageSet(images, labels, list(ds.classes), mean, std)


def _folder(path: Path, split: str, cache_dir: Path | None) -> ImageSet:
    data: DecodedSplit = load_image_folder(path, split, cache_dir)
    # Normalisation follows the full class list, never the requested subset, so subsets match the parent.
    cifar = data.classes == CIFAR10_CLASSES
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if cifar else (IMAGENET_MEAN, IMAGENET_STD)
    return ImageSet(torch.from_numpy(data.images), torch.from_numpy(data.labels), data.classes, mean, std)


def _select(ds: ImageSet, classes: list[str | int], source: str, split: str) -> ImageSet:
    """Keep `classes` (names, or indices into ds.classes) and relabel them 0..k-1 in the given order."""
    names: list[str] = []
    for c in classes:
        if isinstance(c, int) and not isinstance(c, bool):
            if not 0 <= c < ds.num_classes:
                raise NetslimError(f"class index {c} is out of range: {source} has {ds.num_classes} classes")
            names.append(ds.classes[c])
        elif str(c) in ds.classes:
            names.append(str(c))
        else:
            raise NetslimError(f"unknown class {c!r} in {source}; its classes are: {', '.join(ds.classes)}")
    if not names:
        raise NetslimError("the class list is empty")
    if len(set(names)) != len(names):
        raise NetslimError(f"classes are listed more than once: {names}")
    old = torch.tensor([ds.classes.index(n) for n in names])
    mapping = torch.full((ds.num_classes,), -1, dtype=torch.int64)
    mapping[old] = torch.arange(len(names))
    new_labels = mapping[ds.labels]
    keep = torch.nonzero(new_labels >= 0).flatten()
    counts = torch.bincount(new_labels[keep], minlength=len(names))
    empty = [n for n, k in zip(names, counts.tolist(), strict=True) if k == 0]
    if empty:
        raise NetslimError(f"{source} has no {split} images of class {', '.join(map(repr, empty))}")
    return replace(ds, images=ds.images[keep], labels=new_labels[keep], classes=names)


def select_classes(ds: ImageSet, classes: list[str], source: str = "data", split: str = "train") -> ImageSet:
    """Only `classes` of `ds` (names), relabelled 0..k-1 in the order given (a model's output order)."""
    return _select(ds, list(classes), source, split)


def load_dataset(spec: str, split: str, classes: list[str] | None = None, cache_dir: Path | None = None,
                 download: bool = False) -> ImageSet:
    """One split of a dataset named by `spec`.

    spec: "digits"; "cifar10[:root]" / "cifar100[:root]" (torchvision format); a .tar.gz/.tgz/.tar/.zip
    archive or a directory in ImageFolder layout (train/<class>/..., test/ or val/<class>/..., possibly
    under one top folder). split: "train" or "test" (an archive's val/ serves as its test split).
    """
    if split not in SPLITS:
        raise NetslimError(f"split must be 'train' or 'test', got {split!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        ds = _digits(split)
    elif kind in ("cifar10", "cifar100") and not Path(spec).exists():
        ds = _cifar(kind, rest or None, split, cache, download)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise NetslimError(f"dataset {spec!r} not found: expected 'digits', 'cifar10:<root>', "
                               "'cifar100:<root>', an ImageFolder archive (.tar.gz/.tgz/.tar/.zip) or a directory")
        if not path.is_dir() and not is_archive(path):
            raise NetslimError(f"{path} is not a directory or a .tar.gz/.tgz/.tar/.zip archive")
        ds = _folder(path, split, cache)
    if len(ds) == 0:
        raise NetslimError(f"the {split} split of {spec} is empty")
    if classes is not None:
        ds = _select(ds, list(classes), spec, split)
    return ds


# ---------------------------------------------------------------- subsets
def _stratified(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random indices with each class represented in proportion to its count (largest remainders)."""
    counts = torch.bincount(labels).double()
    exact = counts * n / len(labels)
    quota = exact.floor().long()
    spare = n - int(quota.sum())
    if spare > 0:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:spare]] += 1
    perm = torch.randperm(len(labels), generator=generator)
    picked = [perm[labels[perm] == c][: int(q)] for c, q in enumerate(quota.tolist()) if q > 0]
    return torch.sort(torch.cat(picked)).values


def calibration_subset(ds: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """A fixed, class-balanced (proportional) random subset of n images, e.g. for statistics collection."""
    if n < 1:
        raise NetslimError(f"calibration subset size must be positive, got {n}")
    if n >= len(ds):
        return ds
    return ds.subset(_stratified(ds.labels, n, torch.Generator().manual_seed(seed)))


def split_holdout(ds: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, val): a stratified `fraction` of ds held out, reproducible from `seed`."""
    if not 0.0 < fraction < 1.0:
        raise NetslimError(f"holdout fraction must be between 0 and 1, got {fraction}")
    n_val = round(fraction * len(ds))
    if n_val < 1 or n_val >= len(ds):
        raise NetslimError(f"holding out {fraction:.0%} of {len(ds)} images leaves one side empty")
    val_idx = _stratified(ds.labels, n_val, torch.Generator().manual_seed(seed))
    mask = torch.ones(len(ds), dtype=torch.bool)
    mask[val_idx] = False
    return ds.subset(torch.nonzero(mask).flatten()), ds.subset(val_idx)
