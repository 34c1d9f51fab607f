"""Real data sets, held whole on one device as uint8 [N, C, H, W] with a per-class index.

``load_dataset(name, root, device, image_size) -> (train, test)``; see :mod:`fastdd.data.registry`.
Readers: digits (scikit-learn's 8x8 set, offline default), idx (MNIST, Fashion-MNIST), cifar
(CIFAR-10/100 python batches), svhn (.mat), imagefolder (Tiny ImageNet, ImageNet subsets); image
folders larger than memory are read through a memory-mapped cache (:mod:`fastdd.data.cache`).
Images already in memory: ``from_tensors`` / ``from_dataset`` (:mod:`fastdd.data.memory`) make the same
(train, test) pair, which ``fastdd.distill(config, data=...)`` takes in place of files.
"""

from fastdd.data.base import ClassBatches, DatasetError, RealDataset
from fastdd.data.cache import build_cache, open_cache
from fastdd.data.cifar import load_cifar10, load_cifar100
from fastdd.data.digits import load_digits
from fastdd.data.idx import load_fashion_mnist, load_mnist
from fastdd.data.imagefolder import load_imagefolder
from fastdd.data.memory import from_dataset, from_tensors
from fastdd.data.registry import DATASETS, DEFAULT_ROOTS, NORMALIZATION, load_dataset
from fastdd.data.svhn import load_svhn

__all__ = [
    "DATASETS",
    "DEFAULT_ROOTS",
    "NORMALIZATION",
    "ClassBatches",
    "DatasetError",
    "RealDataset",
    "build_cache",
    "from_dataset",
    "from_tensors",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_mnist",
    "load_svhn",
    "open_cache",
]
