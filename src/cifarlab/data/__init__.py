"""CIFAR-10, the data layer: ``disk`` (find, md5-verify, read, download, extract) and ``memory``
(statistics, preprocessing, augmentation, the validation split, batches). Both are gathered
here, so ``from cifarlab.data import load_cifar10, Batches`` is the way in; ``downloads``
(fetching any file safely) serves the dataset and the pretrained weights alike."""

from cifarlab.data.disk import (
    BIN_DIR,
    CLASSES,
    MD5,
    PY_DIR,
    RACY_SECONDS,
    RECORD,
    TARBALL,
    TARBALL_MD5,
    TEST_BATCH,
    TRAIN_BATCHES,
    URL,
    data_root,
    dataset_fingerprint,
    download_cifar10,
    extract_tarball,
    find_dataset,
    load_cifar10,
    md5_file,
    verify_dataset,
)
from cifarlab.data.memory import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    Batches,
    Preprocess,
    channel_stats,
    class_counts,
    confusion_matrix,
    crop_flip_indices,
    random_crop_flip,
    split_validation,
)

__all__ = [
    "BIN_DIR", "CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "MD5", "PY_DIR", "RACY_SECONDS", "RECORD",
    "TARBALL", "TARBALL_MD5", "TEST_BATCH", "TRAIN_BATCHES", "URL", "Batch", "Batches", "Preprocess",
    "channel_stats", "class_counts", "confusion_matrix", "crop_flip_indices", "data_root",
    "dataset_fingerprint", "download_cifar10", "extract_tarball", "find_dataset", "load_cifar10",
    "md5_file", "random_crop_flip", "split_validation", "verify_dataset",
]  # fmt: skip
