"""DataLoaders: the multi-crop training stream, and decoded, centre-cropped images for evaluation and indexing.

The training loader is built for exact resume and multi-rank training:

* Shard order is shuffled per epoch from ``(seed, epoch)`` and split first by rank, then by DataLoader worker.
* Each worker shuffles its raw (still encoded) samples in a buffer seeded from ``(seed, epoch, reader index)``
  and assembles whole batches itself, so the DataLoader (``batch_size=None``) yields batch ``i`` from worker
  ``i % num_workers``.
* Every batch occupies exactly ``batch_size`` consecutive raw samples of its worker's stream. A sample that
  fails to decode is dropped (its key is reported in ``TrainBatch.skipped``) and its slot is refilled with a
  freshly augmented copy of another good sample of the *same* batch. Because the number of raw samples a batch
  consumes therefore never depends on the image bytes, resuming at batch ``n`` can skip the earlier batches'
  samples without decoding them and still reproduce the uninterrupted run bit for bit.
* Each sample's augmentation draws from its own ``torch.Generator`` seeded from a stable hash of
  ``(seed, epoch, key)``, so the views do not depend on which worker decoded the sample.
* The views are rendered in the workers, or (``render_on_device``) the workers only decode the images and draw the
  views' parameters from the same generators, and the training process renders the batch on its device
  (``MultiCropAugmentation.to_model_input``); both give the same parameters, hence the same resume and seeding.
* Two options change how JPEGs are decoded, never which parameters are drawn: ``decode_reduced`` (read the header,
  draw the views from its upright size, decode at the largest DCT reduction that upsamples no view, move the boxes
  there) and ``decode_on_device`` (with ``render_on_device``: read the header, draw the views, ship the bytes; the
  training process decodes the batch's JPEGs on its device). Both depend only on a sample's bytes and generator.
* A shard found damaged while streaming (cut short, unreadable) is read no further: the samples before the damage
  are used, and the shard is named in ``TrainBatch.skipped_shards`` once per epoch by each worker that meets it.

The evaluation loader (:func:`iterate_crops`) decodes listed items (dino_scale.data.items) in workers and keeps
their order.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import logging
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dino_scale.data.augment import (
    ViewParams,
    choose_dct_reduction,
    eval_crop,
    image_source,
    normalize,
    reduced_view_params,
)
from dino_scale.data.copies import strong_copy
from dino_scale.data.decode import EncodedJpeg, dct_reduced_size, decode_image, decodes_on_device, read_jpeg_header
from dino_scale.data.device_augment import decode_upright
from dino_scale.data.folders import is_folder_url
from dino_scale.data.items import ImageItem
from dino_scale.data.shards import iter_raw_samples, sample_image_bytes
from dino_scale.devices import available_cores
from dino_scale.errors import InputError
from dino_scale.progress import Progress

logger = logging.getLogger(__name__)

# If this many samples in a row fail to decode while no good one is available for a batch, the data (or the
# decoder) is broken, and looping forever over it would hang the job instead of failing it.
_MAX_CONSECUTIVE_FAILURES = 10_000


class Augmentation(Protocol):
    """What the training loader needs from ``dino_scale.data.augment.MultiCropAugmentation``."""

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]: ...

    def sample_params(self, height: int, width: int, generator: torch.Generator) -> list[ViewParams]:
        """Only called with ``render_on_device``, ``decode_reduced`` or ``decode_on_device``: what ``__call__`` draws
        from ``generator`` before rendering."""
        ...

    def apply(self, image: Image.Image | torch.Tensor, params: list[ViewParams]) -> list[torch.Tensor]:
        """Only called with ``decode_reduced``: what ``__call__`` renders from the parameters it drew."""
        ...


def decode_pixels(data: bytes) -> Image.Image | torch.Tensor:
    """A training sample's pixels for its views: a JPEG that torchvision decodes as PIL does (``decodes_on_device``:
    YCbCr / RGB or grey, ending with its EOI marker) as a uint8 ``[3, H, W]`` tensor from torchvision's libjpeg-turbo
    on the CPU (bit-identical to PIL's pixels, EXIF orientation applied), any other image, and a JPEG torchvision
    refuses, as PIL's RGB image. Why: on one core, a 500x375 JPEG takes 0.57 ms this way against 0.69 ms for PIL's
    decode and the copy of its pixels into a tensor, ~10% of the per-sample path at DINO's crop sizes. Raises as
    ``decode_image`` does."""
    header = read_jpeg_header(data)
    if header is None or not decodes_on_device(data, header):
        return decode_image(data)
    (pixels,) = decode_upright([EncodedJpeg.from_bytes(data, header)], torch.device("cpu"))
    return decode_image(data) if pixels is None else pixels  # PIL decides on a file torchvision refuses


def renders_on_device(augment_on: str, device: torch.device | str) -> bool:
    """Whether the training process renders the views on ``device`` (recipe key ``data.augment_on``, validated by
    the recipe): "device" yes, "workers" no, "auto" on CUDA only (on CPU the per-sample rendering in workers is the
    faster one)."""
    return augment_on == "device" or (augment_on == "auto" and torch.device(device).type == "cuda")


def stable_seed(*parts: object) -> int:
    """Return a 63-bit seed that depends only on ``parts`` (never on the interpreter's hash randomisation).

    Used for every seed in this module so that two processes (ranks, workers, restarts) derive identical
    random streams from identical inputs.
    """
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(stable_seed(*parts))
    return gen


def identity_collate(batch: Any) -> Any:
    # Module-level (picklable) collate_fn: batches are assembled inside the datasets or by the caller.
    return batch


# ----------------------------------------------------------------------------------------------------------
# Training loader
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    """One training batch of multi-crop views.

    ``views[k]`` is view ``k`` of every sample stacked to ``[B, 3, H, W]`` (in the augmentation's dtype). From a
    loader with ``render_on_device``, ``views`` is empty and the batch holds instead ``images[i]``, sample i's decoded
    image (uint8 ``[3, H_i, W_i]``, contiguous), and ``params[i]``, its views' parameters, for
    ``MultiCropAugmentation.to_model_input`` to render on the training device. With ``decode_on_device`` too,
    ``encoded`` is a list in which ``encoded[i]`` holds sample i's JPEG, undecoded, where ``images[i]`` is None (the
    other formats, and the JPEGs that must be decoded by PIL, are in ``images``); otherwise ``encoded`` is None.
    ``skipped`` lists the keys of corrupt samples dropped while assembling this batch; their slots hold extra,
    independently augmented copies of other samples of the batch, so a key may appear twice in ``keys``.
    ``skipped_shards`` lists the shards this batch's worker found damaged (and read no further) since its previous
    batch; each worker names a shard once per epoch, so the training loop can count them without double counting
    the passes a worker makes over its share.
    """

    views: list[torch.Tensor]
    keys: list[str]
    skipped: list[str] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)
    images: list[torch.Tensor | None] | None = None
    params: list[list[ViewParams]] | None = None
    encoded: list[EncodedJpeg | None] | None = None

    def pin_memory(self) -> TrainBatch:
        """Page-locked copy (called by ``DataLoader(pin_memory=True)``) for faster host-to-GPU transfer."""

        def pinned(items: list[Any] | None) -> list[Any] | None:
            return None if items is None else [None if item is None else item.pin_memory() for item in items]

        return TrainBatch(
            [v.pin_memory() for v in self.views],
            self.keys,
            self.skipped,
            self.skipped_shards,
            images=pinned(self.images),
            params=self.params,
            encoded=pinned(self.encoded),
        )


class _DamagedShards:
    """The damaged shards one worker has met this epoch: each is logged and reported (in a batch) once, however many
    passes the worker makes over its share."""

    def __init__(self, reader: str) -> None:
        self.reader = reader
        self.seen: dict[str, str] = {}  # shard -> reason
        self.pending: list[str] = []

    def __call__(self, url: str, reason: str) -> None:
        if url not in self.seen:
            self.seen[url] = reason
            self.pending.append(url)
            logger.warning("%s: skipping the rest of damaged shard %s: %s", self.reader, url, reason)

    def take(self) -> list[str]:
        """The shards met since the last call."""
        taken, self.pending = self.pending, []
        return taken


class _Unreadable(Exception):
    """A sample's bytes could not be read or decoded (the cause is chained): the sample is skipped and counted."""


@dataclass
class _Loaded:
    """One sample read for a batch: its decoded ``image`` (None when shipped ``encoded``), and the parameters of its
    views when they were drawn before decoding (from the JPEG header), boxes in ``image``'s pixels."""

    image: Image.Image | torch.Tensor | None
    params: list[ViewParams] | None = None
    encoded: EncodedJpeg | None = None


def _pop_random(buffer: list[Any], rng: random.Random) -> Any:
    j = rng.randrange(len(buffer))
    buffer[j], buffer[-1] = buffer[-1], buffer[j]
    return buffer.pop()


class _TrainStream(IterableDataset):
    """Per-worker stream of :class:`TrainBatch`; see :func:`make_train_loader` for the contract."""

    def __init__(
        self,
        urls: list[str],
        augmentation: Augmentation,
        batch_size: int,
        steps_per_epoch: int,
        epoch: int,
        seed: int,
        start_batch: int,
        num_workers: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        render_on_device: bool = False,
        decode_reduced: bool = False,
        decode_on_device: bool = False,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.epoch = epoch
        self.seed = seed
        self.start_batch = start_batch
        self.n_local = max(num_workers, 1)
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(shuffle_buffer, 1)
        self.render_on_device = render_on_device
        self.decode_reduced = decode_reduced
        self.decode_on_device = decode_on_device

    def _raw_stream(self, worker: int, damaged: _DamagedShards) -> Iterator[tuple[dict[str, Any], int]]:
        """Endless shuffled stream of (raw sample, pass number) for one logical worker; the damaged shards it meets
        go to ``damaged``."""
        n_global = self.world_size * self.n_local
        gid = self.rank * self.n_local + worker
        order = sorted(self.urls)  # sorted first, so every rank derives the same order from the same set
        random.Random(stable_seed("shard-order", self.seed, self.epoch)).shuffle(order)
        fallback = len(order) < n_global
        # With too few shards every worker reads them all and keeps every n_global-th sample instead.
        share0 = order if fallback else order[gid::n_global]
        # Seeded by the reader's global index, not (rank, worker): 1 process x 2 workers then reads exactly what
        # 2 processes x 1 worker read, which is what makes runs comparable (and resumable) across process counts.
        rng = random.Random(stable_seed("shuffle-buffer", self.seed, self.epoch, gid, n_global))
        for pass_idx in itertools.count():
            share = list(share0)
            if pass_idx > 0:
                # In fallback mode all workers must agree on the order for the modulo split to stay disjoint.
                owner = "all" if fallback else gid
                random.Random(stable_seed("pass-order", self.seed, self.epoch, pass_idx, owner)).shuffle(share)
            buffer: list[tuple[dict[str, Any], int]] = []
            kept = 0
            for idx, sample in enumerate(iter_raw_samples(share, damaged)):
                if fallback and idx % n_global != gid:
                    continue
                kept += 1
                buffer.append((sample, pass_idx))
                if len(buffer) >= self.shuffle_buffer:
                    yield _pop_random(buffer, rng)
            # Drain before the next pass: no sample of pass p+1 may come out while pass p has unseen ones.
            while buffer:
                yield _pop_random(buffer, rng)
            if kept == 0:
                bad = "; ".join(f"{url}: {reason}" for url, reason in damaged.seen.items())
                raise RuntimeError(
                    f"data worker {gid} of {n_global} (rank {self.rank}) got no samples from shards {share0}"
                    + (f" (damaged: {bad})" if bad else "")
                )

    def _generator_for(self, key: str, pass_idx: int, fill: int | None = None) -> torch.Generator:
        """The generator a sample's views are drawn from: per key, per pass, and per refill slot."""
        if fill is not None:
            return _generator("augment-fill", self.seed, self.epoch, key, pass_idx, fill)
        if pass_idx == 0:
            return _generator("augment", self.seed, self.epoch, key)
        # A repeated pass within the epoch must not replay the first pass's views.
        return _generator("augment", self.seed, self.epoch, key, pass_idx)

    def _load(self, sample: dict[str, Any], pass_idx: int, fill: int | None = None) -> _Loaded:
        """Read (and, but for a JPEG shipped to the device, decode) one sample; raises ``_Unreadable`` when its bytes
        cannot be. A JPEG read with ``decode_reduced`` or ``decode_on_device`` has its views drawn here, from the
        header's upright size and the sample's generator: the draws the decoded image would give."""
        key = sample["__key__"]
        try:
            data = sample_image_bytes(sample)
            header = read_jpeg_header(data) if self.decode_reduced or self.decode_on_device else None
            if header is None:  # another format, or neither option: decoded as without them
                return _Loaded(decode_pixels(data))
        except Exception as exn:  # a corrupt sample must never stop training
            raise _Unreadable(key) from exn
        full = (header.height, header.width)
        # Augmentation errors are bugs, not bad data: they propagate.
        params = self.augmentation.sample_params(*full, self._generator_for(key, pass_idx, fill))
        if self.decode_on_device and decodes_on_device(data, header):
            return _Loaded(None, params, EncodedJpeg.from_bytes(data, header))
        reduction = choose_dct_reduction(params, *full) if self.decode_reduced else 0
        try:
            image = decode_image(data, dct_reduction=reduction)
        except Exception as exn:
            raise _Unreadable(key) from exn
        size = (dct_reduced_size(header.height, reduction), dct_reduced_size(header.width, reduction))
        if (image.height, image.width) != size:
            # The pixels disagree with the header (an EXIF orientation PIL could not apply, a draft it declined):
            # the views are drawn from the decoded image, as without the options.
            logger.debug("sample %s: header %s, decoded %s; drawing from the decoded size", key, size, image.size)
            return _Loaded(image)
        return _Loaded(image, reduced_view_params(params, full, size) if reduction else params)

    def _augment(self, loaded: _Loaded, key: str, pass_idx: int, fill: int | None = None) -> Any:
        """The sample's rendered views, or with ``render_on_device`` (its image as a contiguous uint8 CHW tensor or
        None, the parameters of its views, its encoded JPEG or None), drawn from the sample's generator (in
        ``_load`` when the parameters came from the header)."""
        image, params = loaded.image, loaded.params
        if not self.render_on_device:
            assert image is not None  # only the device path ships JPEGs undecoded
            if params is None:  # drawn from the decoded image, as without the decode options
                return self.augmentation(image, self._generator_for(key, pass_idx, fill))
            return self.augmentation.apply(image, params)
        # The CHW pixels the per-sample path renders from, made contiguous: sent to the main process.
        pixels = None if image is None else image_source(image)[0].contiguous()
        if params is None:  # drawn from the decoded image, as without the decode options
            assert pixels is not None  # shipped JPEGs have their parameters
            params = self.augmentation.sample_params(*pixels.shape[-2:], self._generator_for(key, pass_idx, fill))
        return pixels, params, loaded.encoded

    def _batch(self, stream: Iterator[tuple[dict[str, Any], int]]) -> TrainBatch:
        good: list[tuple[dict[str, Any], int]] = []
        per_sample: list[Any] = []  # rendered views, or (image, params, encoded) with render_on_device
        skipped: list[str] = []

        def try_add(sample: dict[str, Any], pass_idx: int) -> None:
            key = sample["__key__"]
            try:
                loaded = self._load(sample, pass_idx)
            except _Unreadable as exn:
                skipped.append(key)
                logger.debug("dropping unreadable sample %s (%s): %r", key, sample.get("__url__"), exn.__cause__)
                return
            per_sample.append(self._augment(loaded, key, pass_idx))
            good.append((sample, pass_idx))

        for sample, pass_idx in itertools.islice(stream, self.batch_size):
            try_add(sample, pass_idx)
        # Only if a whole batch is corrupt do we read beyond its slots (then resume is no longer bit-exact).
        while not good:
            if len(skipped) >= _MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{len(skipped)} consecutive samples failed to decode, e.g. {skipped[:5]}")
            try_add(*next(stream))
        n_good = len(good)
        for fill in range(self.batch_size - n_good):
            # Refill the slots of dropped samples with new views of this batch's good ones (re-decoded: rare).
            sample, pass_idx = good[fill % n_good]
            key = sample["__key__"]
            per_sample.append(self._augment(self._load(sample, pass_idx, fill=fill), key, pass_idx, fill=fill))
            good.append((sample, pass_idx))
        keys = [s["__key__"] for s, _ in good]
        if self.render_on_device:
            images, params, encoded = (list(part) for part in zip(*per_sample, strict=True))
            shipped = encoded if any(e is not None for e in encoded) else None
            return TrainBatch(views=[], keys=keys, skipped=skipped, images=images, params=params, encoded=shipped)
        views = [torch.stack([s[k] for s in per_sample]) for k in range(len(per_sample[0]))]
        return TrainBatch(views=views, keys=keys, skipped=skipped)

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        # The DataLoader always starts its round robin at worker 0, but after resuming at batch n the next
        # batch belongs to logical worker n % W; rotating the roles keeps batch n + j at loader position j.
        worker = (loader_worker + self.start_batch) % self.n_local
        quota = len(range(worker, self.steps_per_epoch, self.n_local))
        done = len(range(worker, self.start_batch, self.n_local))
        if quota - done <= 0:
            return
        damaged = _DamagedShards(f"data worker {self.rank * self.n_local + worker} (rank {self.rank})")
        stream = self._raw_stream(worker, damaged)
        # Resume: every batch occupies exactly batch_size raw samples, so skip them without decoding.
        collections.deque(itertools.islice(stream, done * self.batch_size), maxlen=0)
        # Shards found damaged while skipping were reported with the earlier batches, by the run that trained them.
        damaged.take()
        for _ in range(quota - done):
            batch = self._batch(stream)
            batch.skipped_shards = damaged.take()
            yield batch


class _Loader:
    """Re-iterable wrapper: each ``iter()`` starts fresh DataLoader workers that replay the same batches."""

    def __init__(
        self, dataset: IterableDataset, num_workers: int, pin_memory: bool, length: int | None, seed: int
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.length = length
        self.seed = seed

    def __iter__(self) -> Iterator[Any]:
        # A private generator: otherwise creating the iterator draws a worker base seed from the global torch
        # RNG, and a resumed run would see a different training random stream (drop path, ...) than before.
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=identity_collate,
            pin_memory=self.pin_memory,
            generator=generator,
        )
        return iter(loader)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this loader has no known length")
        return self.length


def make_train_loader(
    urls: Sequence[str],
    augmentation: Augmentation,
    batch_size: int,
    steps_per_epoch: int,
    epoch: int,
    seed: int,
    start_batch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
    render_on_device: bool = False,
    decode_reduced: bool = False,
    decode_on_device: bool = False,
) -> Iterable[TrainBatch]:
    """Training batches for one epoch on one rank: exactly ``steps_per_epoch - start_batch`` of them.

    Every batch holds exactly ``batch_size`` samples. Shards (sorted, then shuffled from ``(seed, epoch)``)
    are split by rank, then by worker (global worker id = ``rank * num_workers + worker``). With fewer
    shards than ``world_size * max(num_workers, 1)`` a warning is issued and every worker reads every shard,
    keeping sample ``i`` when ``i % n_workers_total == id``. A worker whose share runs out before its quota
    starts another, re-shuffled pass over it, so within an epoch no sample repeats as long as each worker's
    share holds its quota. Worker ``w`` produces batches ``w, w + W, ...`` (W = max(num_workers, 1));
    ``start_batch = n`` skips batches ``< n`` without decoding their samples, and the rest are bit-identical
    to those of an uninterrupted run. The same (urls, seed, epoch, rank, world_size, num_workers, batch_size,
    shuffle_buffer) always gives the same batches. Corrupt samples are dropped and reported in
    ``TrainBatch.skipped``; their slots are refilled with extra views of the batch's other samples. A shard found
    damaged while streaming is read no further (the samples before the damage are used) and named in
    ``TrainBatch.skipped_shards`` once per epoch by each worker that meets it; a missing shard raises.
    ``render_on_device``: the batches carry the decoded images and their views' parameters instead of the views
    (see :class:`TrainBatch`), the same parameters as the rendered path's; ``augmentation.to_model_input`` renders them.
    ``decode_reduced`` (recipe key ``data.decode_reduced``): each JPEG's views are drawn from its header's upright size
    (the draws of a full decode), then it is decoded at the largest DCT reduction 1/2^k that leaves every view's
    crop at least its output size (``augment.choose_dct_reduction``; k = 0 decodes and renders exactly as without
    the option), and the views' boxes are moved into the reduced image (``augment.reduced_view_params``). Other
    formats decode as without it. ``decode_on_device`` (``data.decode_on="device"``; needs ``render_on_device``): the
    workers read only the JPEGs' headers, draw the views from them, and ship the bytes (``TrainBatch.encoded``);
    ``to_model_input`` decodes them on the training device. JPEGs shipped this way decode at full size
    (``decode_reduced`` applies to those the workers decode); other formats, and CMYK or unterminated JPEGs, are
    decoded in the workers.

    The returned object supports ``len()`` and can be iterated again (each time from ``start_batch``).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= start_batch <= steps_per_epoch:
        raise InputError(f"need 0 <= start_batch <= steps_per_epoch, got {start_batch} and {steps_per_epoch}")
    if not 0 <= rank < world_size:
        raise InputError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    if decode_on_device and not render_on_device:
        raise InputError("decode_on_device needs render_on_device: the workers render from decoded pixels")
    urls = list(urls)
    if not urls:
        raise InputError("make_train_loader needs at least one shard")
    n_global = world_size * max(num_workers, 1)
    if len(urls) < n_global and not all(is_folder_url(url) for url in urls):
        # (Groups of an image folder are read file by file: every reader keeping every n-th file costs no extra I/O.)
        warnings.warn(
            f"only {len(urls)} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} data worker(s) = "
            f"{n_global} readers: every reader will read all shards and keep every {n_global}-th sample "
            f"(correct, no duplicates, but {n_global}x the I/O). Write at least {n_global} shards, ideally a "
            "multiple of that, for efficient loading.",
            UserWarning,
            stacklevel=2,
        )
    dataset = _TrainStream(
        urls,
        augmentation,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        epoch=epoch,
        seed=seed,
        start_batch=start_batch,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        render_on_device=render_on_device,
        decode_reduced=decode_reduced,
        decode_on_device=decode_on_device,
    )
    loader_seed = stable_seed("dataloader", seed, epoch, rank)
    return _Loader(dataset, num_workers, pin_memory, steps_per_epoch - start_batch, loader_seed)


# ----------------------------------------------------------------------------------------------------------
# Evaluation loader: listed items, decoded and centre-cropped in workers, in listing order
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Decoded:
    """What a worker returns per item: the uint8 crop (None if unreadable) and the item's file facts."""

    index: int
    crop: torch.Tensor | None
    info: dict[str, Any]


class _ImageDataset(Dataset):
    def __init__(self, items: Sequence[ImageItem], image_size: int, hash_files: bool) -> None:
        self.items = items
        self.crop = eval_crop(image_size)
        self.image_size = image_size
        self.hash_files = hash_files

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Decoded:
        item = self.items[index]
        info: dict[str, Any] = {}
        try:
            data = item.read()
            info["bytes"] = len(data)
            if self.hash_files:
                info["sha256"] = hashlib.sha256(data).hexdigest()
            # Big JPEGs decode at a reduced DCT scale (1/2..1/8: most of a photo's decode time). The draft keeps at
            # least twice the resize target, so the antialiased resize still does a real reduction, and images below
            # that decode in full.
            image = decode_image(data, draft_size=2 * int(self.image_size * 256 / 224))
            with Image.open(io.BytesIO(data)) as header:  # the stored size, not the draft-reduced one
                info["width"], info["height"] = header.size
            if item.copy_seed is not None:
                copy, edits = strong_copy(image, random.Random(item.copy_seed))
                image, info["edits"] = copy, [edit.name for edit in edits]
            return Decoded(index, self.crop(image), info)
        except Exception as error:  # any decode failure: the item is skipped and reported, never a crash
            info["error"] = f"{type(error).__name__}: {error}"
            return Decoded(index, None, info)


def default_workers() -> int:
    """Decode workers of the evaluation loader: one core is left to the model."""
    return min(8, max(1, available_cores() - 1))


@dataclass
class CropBatch:
    """One batch from the workers: uint8 crops [n, 3, S, S] of the readable items, their item indices and file
    facts, and the unreadable items with the reason."""

    indices: list[int]
    crops: torch.Tensor | None
    info: list[dict[str, Any]]
    skipped: list[tuple[int, str]]

    def labelled(self, items: Sequence[ImageItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float crops, labels) of this batch's readable items, as frozen-feature extraction takes them."""
        assert self.crops is not None
        return normalize(self.crops), torch.tensor([items[i].label for i in self.indices], dtype=torch.long)


def iterate_crops(
    items: Sequence[ImageItem],
    image_size: int,
    batch_size: int = 64,
    workers: int | None = None,
    hash_files: bool = False,
    progress: bool = True,
) -> Iterator[CropBatch]:
    """Decode, resize and centre-crop (:func:`eval_crop`) ``items`` in ``workers`` DataLoader processes; batches
    come in item order. A progress bar with images/s is shown on a terminal, a log line every 30 s otherwise."""
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        _ImageDataset(items, image_size, hash_files),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=identity_collate,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),  # the workers' base seed must not come from the global RNG
    )
    meter = Progress(len(items), "img", enabled=progress, interval=30.0)
    skipped_total = 0
    try:
        for batch in loader:
            good = [d for d in batch if d.crop is not None]
            skipped = [(d.index, d.info["error"]) for d in batch if d.crop is None]
            crops = torch.stack([d.crop for d in good]) if good else None
            skipped_total += len(skipped)
            meter.update(len(batch), {"skipped": skipped_total} if skipped_total else None)
            yield CropBatch([d.index for d in good], crops, [d.info for d in good], skipped)
    finally:
        meter.close()


def labelled_batches(
    items: Sequence[ImageItem],
    image_size: int,
    batch_size: int,
    workers: int | None,
    progress: bool = False,
    skipped: list[tuple[int, str]] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised images, labels) of the readable labelled items, for dino_scale.models.features. Unreadable items
    are left out, logged, and appended to ``skipped`` as (item index, reason) when it is given."""
    for batch in iterate_crops(items, image_size, batch_size, workers, progress=progress):
        for index, reason in batch.skipped:
            logger.warning("skipping unreadable image %s: %s", items[index].key, reason)
        if skipped is not None:
            skipped.extend(batch.skipped)
        if batch.crops is not None:
            yield batch.labelled(items)
