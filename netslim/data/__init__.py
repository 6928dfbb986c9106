"""Datasets as in-memory uint8 tensors (ImageSet), decode-once caching, and fast tensor minibatches."""

from netslim.data.archive import cache_location, default_cache_dir
from netslim.data.batches import Batches, batches
from netslim.data.sets import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSet,
    calibration_subset,
    load_dataset,
    select_classes,
    split_holdout,
)

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Batches",
           "ImageSet", "batches", "cache_location", "calibration_subset", "default_cache_dir", "load_dataset",
           "select_classes", "split_holdout"]
