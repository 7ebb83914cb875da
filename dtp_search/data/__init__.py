"""Datasets as whole uint8 tensors — or, when they do not fit in memory, streamed.

:mod:`~dtp_search.data.dataset` loads the dataset the settings describe
(:func:`load_dataset`) from one of its sources: :mod:`~dtp_search.data.builtin` (digits,
torchvision's CIFAR-10), :mod:`~dtp_search.data.mnist` (IDX files, torchvision's MNIST),
:mod:`~dtp_search.data.imagefolder` (trees and their decoded-tensor cache) or
:mod:`dtp_search.data.user_data`; :mod:`~dtp_search.data.decode` decodes image files,
:mod:`~dtp_search.data.scan` plans what is streamed and scans it, and
:mod:`~dtp_search.data.checks` refuses splits that do not match.
"""

from dtp_search.data.batches import Batches, StreamBatches, TensorBatches, random_crop_flip
from dtp_search.data.dataset import KINDS, ImageDataset, load_dataset
from dtp_search.data.imagefolder import imagefolder_source, load_imagefolder
from dtp_search.data.mnist import IDX_IMAGES, IDX_LABELS, MNIST_FILES, read_idx
from dtp_search.data.splits import PixelSums, Split, channel_stats, stratified_subset, tensor_digest
from dtp_search.data.streaming import Source, StreamedSplit
from dtp_search.errors import DatasetError

__all__ = [
    "IDX_IMAGES",
    "IDX_LABELS",
    "KINDS",
    "MNIST_FILES",
    "Batches",
    "DatasetError",
    "ImageDataset",
    "PixelSums",
    "Source",
    "Split",
    "StreamBatches",
    "StreamedSplit",
    "TensorBatches",
    "channel_stats",
    "imagefolder_source",
    "load_dataset",
    "load_imagefolder",
    "random_crop_flip",
    "read_idx",
    "stratified_subset",
    "tensor_digest",
]
