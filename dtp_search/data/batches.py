"""Training and evaluation batches: ``(x, y)`` on the training device, from a split in
memory (:class:`TensorBatches`) or streamed from its source (:class:`StreamBatches`).

Both share everything random and everything numeric (:class:`Batches`): the shuffle
permutation, then per batch the crop/flip draws of :func:`random_crop_flip`, all from
one generator on the main process, and the normalisation ``(u8 / 255 − mean) / std``.
They differ only in where a batch's uint8 images come from — indexing the split tensor,
or worker processes decoding them — so for the same split, indices, batch size, seed,
augmentation and device they yield exactly the same batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dtp_search.data.splits import Split, stratified_subset
from dtp_search.data.streaming import CHUNK, StreamedSplit, stacked_chunks
from dtp_search.errors import DatasetError


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator, channels_last: bool = False
) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of a uint8 batch, in one gather.

    ``torchvision.transforms.v2`` applied to a batch tensor draws *one* crop for the
    whole batch; augmentation needs one per sample, so the crop offsets and flips are
    drawn per sample and folded into the flat source index of every output element,
    gathered with one ``torch.take`` (about twice as fast on CPU as the equivalent
    four-tensor advanced indexing). With ``channels_last`` the gather writes NHWC order
    directly (the result is the same NCHW-shaped batch with channels-last strides),
    saving a copy before the convolutions.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    ph, pw = h + 2 * padding, w + 2 * padding
    oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    flip = torch.rand(b, 1, generator=generator, device=dev) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    # Flat index into the contiguous (b, c, ph, pw) padded batch.
    sample = (torch.arange(b, device=dev) * (c * ph * pw)).view(b, 1, 1, 1)
    plane = torch.arange(c, device=dev) * (ph * pw)
    if channels_last:  # index laid out (b, h, w, c), returned as an NCHW-shaped view
        idx = (
            sample + (rows * pw)[:, :, None, None] + cols[:, None, :, None] + plane.view(1, 1, 1, c)
        )
        return padded.reshape(-1).take(idx).permute(0, 3, 1, 2)
    idx = sample + plane.view(1, c, 1, 1) + (rows * pw)[:, None, :, None] + cols[:, None, None, :]
    return padded.reshape(-1).take(idx)


class Batches:
    """Iterates ``(x, y)`` batches over ``indices`` of a split; subclasses say where a
    batch's uint8 images come from (:meth:`_images`).

    ``x`` is float32, normalised ``(u8 / 255 − mean) / std``; with ``augment`` each
    sample is randomly cropped (after zero padding) and flipped first.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        indices: torch.Tensor | np.ndarray | None,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.labels = labels.to(self.device)
        if indices is None:
            indices = torch.arange(len(labels))
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.device)
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.crop_padding = shuffle, augment, crop_padding
        self.drop_last = drop_last
        self.channels_last = channels_last
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def subsample(self, limit: int, seed: int = 0) -> Batches:
        """These batches over a class-stratified subset of at most ``limit`` of the indices
        (``self`` when there are no more than ``limit``)."""
        if limit >= self.num_samples:
            return self
        keep = stratified_subset(self.labels[self.indices].cpu().numpy(), limit, seed)
        out = copy.copy(self)
        out.indices = self.indices[torch.as_tensor(keep, dtype=torch.long, device=self.device)]
        out.generator = torch.Generator(device=self.device)
        out.generator.manual_seed(seed)
        return out

    def _order(self) -> list[torch.Tensor]:
        """This pass's batches of indices (the shuffle is the generator's first draw)."""
        order = self.indices
        if self.shuffle:
            perm = torch.randperm(len(order), generator=self.generator, device=self.device)
            order = order[perm]
        return [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]

    def _images(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images of each batch of indices, on ``self.device``, in order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._order()
        for idx, x in zip(batches, self._images(batches), strict=True):
            if self.augment:
                x = random_crop_flip(
                    x, self.crop_padding, self.generator, channels_last=self.channels_last
                )
            x = torch.addcmul(-self._shift, x.float(), self._scale)
            if self.channels_last:  # NHWC: the fast layout for convolutions
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


class TensorBatches(Batches):
    """Batches over ``indices`` of a split that lives on ``device`` (see :class:`Batches`)."""

    def __init__(self, split: Split, indices: torch.Tensor | np.ndarray | None, **kwargs) -> None:
        super().__init__(split.labels, indices, **kwargs)
        self.images = split.images.to(self.device)

    def _images(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for idx in batches:
            yield self.images[idx]


class StreamBatches(Batches):
    """Batches over ``indices`` of a :class:`~dtp_search.data.streaming.StreamedSplit`: worker
    processes decode each batch (in chunks of at most
    :data:`~dtp_search.data.streaming.CHUNK` images, so what is in flight stays small whatever
    the batch size); shuffling, augmentation and normalisation run here, exactly as in
    :class:`TensorBatches`. ``num_workers``: the split's unless given."""

    def __init__(
        self,
        split: StreamedSplit,
        indices: torch.Tensor | np.ndarray | None,
        *,
        num_workers: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(split.labels, indices, **kwargs)
        self.split = split
        self.num_workers = split.num_workers if num_workers is None else int(num_workers)

    def _images(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        chunk = max(1, min(self.batch_size, CHUNK))
        chunks, sizes = [], []
        for idx in batches:
            pos = idx.tolist()
            parts = [pos[i : i + chunk] for i in range(0, len(pos), chunk)]
            chunks += parts
            sizes.append(len(parts))
        pin = self.device.type == "cuda"
        stream = stacked_chunks(self.split.decoder, chunks, self.num_workers, pin_memory=pin)
        for n in sizes:
            parts = [next(stream) for _ in range(n)]
            for part in parts:
                self._check_shape(part)
            x = parts[0] if n == 1 else torch.cat(parts)
            yield x.to(self.device, non_blocking=pin)

    def _check_shape(self, part: torch.Tensor) -> None:
        # The load checked every image against the split's shape; a file changed since
        # (after the search started) would reach the network as a shape error of its own.
        if tuple(part.shape[1:]) != tuple(self.split.shape):
            show = lambda s: "×".join(map(str, s))  # noqa: E731
            raise DatasetError(
                f"a streamed image is now {show(part.shape[1:])} (C×H×W), the split was "
                f"loaded as {show(self.split.shape)}: its files changed while it was read; "
                "allowed: data that does not change during a run"
            )
