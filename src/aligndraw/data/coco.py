"""Microsoft COCO 2014 at 32x32: the paper's main dataset, read from prepared arrays.

Mansimov et al. 2016 (https://arxiv.org/abs/1511.02793, sec. 5) train on the COCO 2014
training images (about 83k, five captions each) resized to 32x32 and draw validation and test
pairs from the 2014 validation images. ``aligndraw data coco --root DIR``
(:func:`aligndraw.data.coco_prepare.prepare_coco`) turns the standard COCO files into compact
arrays once; this module defines their layout and serves the splits.

Prepared directory (``$ALIGNDRAW_DATA/coco`` or the user cache dir by default), for each pool
P in ``train2014``, ``val2014``:

=========================  ======================  ==========================================
file                       shape, dtype            meaning
=========================  ======================  ==========================================
``P_images.npy``           (N, 3, S, S) uint8      every decodable image, S = image_size
``P_image_ids.npy``        (N,) int64              its COCO image id
``P_tokens.npy``           (M, Lmax) uint16/int32  word ids of each caption, 0-padded
``P_lengths.npy``          (M,) int32              words per caption
``P_image_index.npy``      (M,) int32              row of the caption's image in P_images
``P_captions.json``        M strings               the original caption texts
``vocab.json``             --                      ``<pad>`` (id 0), ``<unk>`` (id 1), words
``meta.json``              --                      counts, settings, skipped files
=========================  ======================  ==========================================

Captions are stored grouped by image (images in COCO id order), at most five per image.

Splits (a pure function of the prepared data and :class:`CocoConfig`, so that a model's
``config.json`` pins them): ``train`` = every train2014 caption; from val2014, images are
ranked by a seeded hash of their COCO id (:func:`split_keys`, SplitMix64) -- ``test`` is the
first ``test_images``, ``validation`` the next ``val_images``. Hashing ids rather than
permuting rows keeps the split of every image fixed even when other files failed to decode.
Validation and test captions are ordered round-robin over images (every image's first
caption, then every image's second, ...), so that the first k captions show k distinct
images (``evaluate --max-captions``).

Symbols: N images, M captions, n captions of a split, S image size, B batch, L words.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import platformdirs
import torch

from aligndraw.data.batching import Batch, BatchPlan, RandomSource, batch_order, length_grouped_order
from aligndraw.text import Vocabulary

DATASET = "coco32"
POOLS = ("train2014", "val2014")
ARRAYS = ("images", "image_ids", "tokens", "lengths", "image_index")
META_NAME, VOCAB_NAME = "meta.json", "vocab.json"
FORMAT_VERSION = 1
# Every word of the training captions is kept by default: with our tokenizer that is about
# 25k words on the full train2014 captions (the paper's vocabulary: 25,323 words); a minimum
# count of 2 would roughly halve it. Words of validation/test captions never seen in training
# become <unk>. (An estimate: meta.json records the real size and the size per minimum count.)
DEFAULT_MIN_WORD_COUNT = 1
PREVIEW_COUNT = 8


def default_coco_dir() -> Path:
    """``$ALIGNDRAW_DATA/coco`` if ``ALIGNDRAW_DATA`` is set, else ``<user cache>/coco``."""
    root = os.environ.get("ALIGNDRAW_DATA")
    base = Path(root).expanduser() if root else Path(platformdirs.user_cache_dir("aligndraw"))
    return base / "coco"


def pool_file(root: str | os.PathLike, pool: str, name: str) -> Path:
    """Path of array ``name`` (or ``captions``) of ``pool`` in a prepared directory."""
    suffix = ".json" if name == "captions" else ".npy"
    return Path(root) / f"{pool}_{name}{suffix}"


@dataclass(frozen=True)
class CocoConfig:
    """COCO 32x32 settings; saved in the model config so that evaluation finds the same splits."""

    dataset: str = DATASET
    root: str | None = None  # prepared directory; None: default_coco_dir()
    image_size: int = 32  # the paper's 32x32
    min_word_count: int | None = None  # None: as prepared (meta.json); an int must match it
    val_images: int = 1000  # 5,000 captions: the trainer validates on all of them every epoch
    test_images: int = 5000  # 25,000 captions; the rest of val2014 (~34.5k images) is unused
    seed: int = 2016  # the val2014 split hash and the order of data-parallel shards

    def __post_init__(self) -> None:
        if self.dataset != DATASET:
            raise ValueError(f"CocoConfig.dataset must be {DATASET!r}, got {self.dataset!r}")
        for name in ("image_size", "val_images", "test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_word_count is not None and self.min_word_count < 1:
            raise ValueError(f"min_word_count must be >= 1 or None, got {self.min_word_count}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> CocoConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown CocoConfig keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a fixed, seedable hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_keys(image_ids: np.ndarray, seed: int) -> np.ndarray:
    """(N,) uint64 hash of each COCO image id under ``seed``; images are ranked by it."""
    salt = _splitmix64(np.array([seed], dtype=np.uint64))
    return _splitmix64(np.asarray(image_ids, dtype=np.uint64) ^ salt)


@dataclass
class CocoSplit:
    """n COCO captions with their images; several captions share an image.

    Attributes:
        images: (N, 3, S, S) uint8, the split's images (a memory map for training).
        image_ids: (N,) COCO image ids.
        tokens: (n, Lmax) word ids in ``vocab``, 0-padded. lengths: (n,). image_index: (n,)
            row of each caption's image in ``images``. captions: n original texts.
    """

    images: np.ndarray
    image_ids: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    image_index: np.ndarray
    captions: list[str]
    vocab: Vocabulary
    compositions: ClassVar[bool] = False  # no layouts, nothing held out

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def held_out(self) -> np.ndarray:
        return np.zeros(len(self), dtype=bool)

    def image_pool(self) -> np.ndarray:
        """(N, 3, S, S) float32 in [0, 1]."""
        return np.asarray(self.images, dtype=np.float32) / np.float32(255.0)

    def caption_images(self, index: np.ndarray) -> np.ndarray:
        """(k, 3, S, S) float32 in [0, 1]: the image of each caption in ``index``."""
        rows = self.image_index[np.asarray(index)]
        return self.images[rows].astype(np.float32) / np.float32(255.0)

    def subset(self, index: np.ndarray | slice) -> CocoSplit:
        """The captions at ``index`` (the images stay: captions keep pointing at them)."""
        picked = np.arange(len(self))[index]
        return CocoSplit(self.images, self.image_ids, self.tokens[picked], self.lengths[picked],
                         self.image_index[picked], [self.captions[i] for i in picked], self.vocab)

    def batches(self, vocab: Vocabulary, batch_size: int, *, shuffle: bool,
                generator: RandomSource = None, drop_last: bool = False,
                by_length: bool | None = None) -> BatchPlan:
        """Batches of one pass; ``by_length`` (default: ``shuffle``) groups equal lengths.

        Without ``by_length`` the captions go in order, padded to each batch's longest (what
        evaluation needs: results line up with the split's captions).
        """
        if vocab != self.vocab:
            raise ValueError("this COCO split was encoded with another vocabulary "
                             f"({len(self.vocab)} ids) than the one given ({len(vocab)} ids): "
                             "prepare the data with the model's --min-count")
        if shuffle if by_length is None else by_length:
            order = length_grouped_order(self.lengths, batch_size, shuffle=shuffle,
                                         generator=generator, drop_last=drop_last)
        else:
            order = batch_order(len(self), batch_size, shuffle=shuffle, generator=generator,
                                drop_last=drop_last)
        return BatchPlan(order, self._batch)

    def _batch(self, idx: np.ndarray) -> Batch:
        lengths = self.lengths[idx]
        width = int(lengths.max())
        images = self.images[self.image_index[idx]]  # (B, 3, S, S) uint8
        return Batch(
            images=torch.from_numpy(images.astype(np.float32) / np.float32(255.0)),
            tokens=torch.from_numpy(self.tokens[idx, :width].astype(np.int64)),  # (B, L)
            lengths=torch.from_numpy(lengths.astype(np.int64)),
            layouts=None,
            held_out=torch.zeros(len(idx), dtype=torch.bool),
            captions=[self.captions[i] for i in idx.tolist()],
        )


def read_meta(root: str | os.PathLike) -> dict:
    """``meta.json`` of a prepared directory; a clear error when there is none."""
    path = Path(root) / META_NAME
    if not path.is_file():
        raise ValueError(f"no prepared COCO in {root} (no {META_NAME}): run `aligndraw data coco "
                         f"--root COCO_DIR --out {root}` first, or point --data-dir / data.root "
                         "at the prepared directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {meta.get('format')!r}, this aligndraw reads "
                         f"{FORMAT_VERSION}: prepare the data again")
    return meta


class CocoCaptions:
    """The COCO splits from a prepared directory (module docstring).

    Args:
        config: split settings (defaults: :class:`CocoConfig`).
        root: the prepared directory, overriding ``config.root``.
    """

    def __init__(self, config: CocoConfig | None = None, *,
                 root: str | os.PathLike | None = None) -> None:
        config = config or CocoConfig()
        given = root or config.root
        self.root = Path(given).expanduser() if given else default_coco_dir()
        self.meta = read_meta(self.root)
        if self.meta["image_size"] != config.image_size:
            raise ValueError(f"{self.root} holds {self.meta['image_size']}px images, the config "
                             f"asks for {config.image_size}px")
        prepared = self.meta["min_word_count"]
        if config.min_word_count not in (None, prepared):
            raise ValueError(f"{self.root} was prepared with --min-count {prepared}, the config "
                             f"asks for {config.min_word_count}: prepare again or set "
                             f"data.min_word_count={prepared}")
        self.config = dataclasses.replace(config, min_word_count=prepared,
                                          root=str(self.root.resolve()) if given else None)
        self.vocab = Vocabulary.from_json(self.root / VOCAB_NAME)
        available = self.meta["pools"]["val2014"]["images"]
        if config.val_images + config.test_images > available:
            raise ValueError(f"val_images + test_images = {config.val_images + config.test_images} "
                             f"but val2014 has {available} images in {self.root}")
        self._cache: dict[str, CocoSplit] = {}

    # ------------------------------------------------------------------ pools
    def _pool(self, pool: str) -> CocoSplit:
        """Every caption of a pool, as prepared (images memory-mapped)."""
        key = f"pool:{pool}"
        if key not in self._cache:
            arrays = {name: np.load(pool_file(self.root, pool, name), mmap_mode="r")
                      for name in ARRAYS}
            captions = json.loads(pool_file(self.root, pool, "captions").read_text())
            expected = self.meta["pools"][pool]
            got = (len(arrays["images"]), len(arrays["tokens"]), len(captions))
            if got != (expected["images"], expected["captions"], expected["captions"]):
                raise ValueError(f"{self.root}: {pool} arrays hold {got[0]} images and "
                                 f"{got[1]} captions, {META_NAME} says {expected['images']} and "
                                 f"{expected['captions']}: prepare the data again")
            self._cache[key] = CocoSplit(
                images=arrays["images"], image_ids=np.asarray(arrays["image_ids"]),
                tokens=np.asarray(arrays["tokens"]), lengths=np.asarray(arrays["lengths"]),
                image_index=np.asarray(arrays["image_index"]), captions=captions, vocab=self.vocab)
        return self._cache[key]

    def _select(self, pool: CocoSplit, rows: np.ndarray) -> CocoSplit:
        """The captions of pool images ``rows`` (in that order), round-robin over images."""
        new = np.full(len(pool.image_ids), -1, dtype=np.int64)
        new[rows] = np.arange(len(rows))
        caps = np.flatnonzero(new[pool.image_index] >= 0)
        image = new[pool.image_index[caps]]
        o = np.argsort(image, kind="stable")  # stored order within an image = COCO order
        caps, image = caps[o], image[o]
        starts = np.r_[0, np.flatnonzero(np.diff(image)) + 1]
        rank = np.arange(len(image)) - np.repeat(starts, np.diff(np.r_[starts, len(image)]))
        o = np.lexsort((image, rank))  # every image's 1st caption, then every 2nd, ...
        caps, image = caps[o], image[o]
        return CocoSplit(np.ascontiguousarray(pool.images[rows]), pool.image_ids[rows],
                         pool.tokens[caps], pool.lengths[caps], image.astype(np.int32),
                         [pool.captions[i] for i in caps.tolist()], self.vocab)

    def _val2014_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of val2014 for (test, validation), ranked by :func:`split_keys`."""
        ids = self._pool("val2014").image_ids
        ranked = np.lexsort((ids, split_keys(ids, self.config.seed)))
        t, v = self.config.test_images, self.config.val_images
        return ranked[:t], ranked[t:t + v]

    # ------------------------------------------------------------------ splits
    def train_epoch(self, epoch: int, *, rank: int = 0, world_size: int = 1) -> CocoSplit:
        """Every training caption, or this data-parallel rank's shard of them for ``epoch``.

        Shards: a permutation seeded by (seed, epoch), rank r taking r, r + world_size, ...;
        every rank gets n // world_size captions so that ranks run the same number of steps.
        """
        if epoch < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need epoch >= 0 and 0 <= rank < world_size, got epoch={epoch}, "
                             f"rank={rank}, world_size={world_size}")
        train = self._pool("train2014")
        if world_size == 1:
            return train
        n = len(train)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        return train.subset(order[rank:n - n % world_size:world_size])

    def validation(self) -> CocoSplit:
        """``val_images`` val2014 images (after the test images) and all their captions."""
        if "validation" not in self._cache:
            self._cache["validation"] = self._select(self._pool("val2014"), self._val2014_rows()[1])
        return self._cache["validation"]

    def test(self) -> CocoSplit:
        """``test_images`` val2014 images, fixed by ``seed``, and all their captions."""
        if "test" not in self._cache:
            self._cache["test"] = self._select(self._pool("val2014"), self._val2014_rows()[0])
        return self._cache["test"]

    def batches(self, split: CocoSplit, batch_size: int, *, shuffle: bool,
                generator: RandomSource = None, drop_last: bool = False) -> BatchPlan:
        """Batches of ``split``; shuffled ones group captions of equal length (no padding)."""
        return split.batches(self.vocab, batch_size, shuffle=shuffle, generator=generator,
                             drop_last=drop_last)

    def preview_captions(self) -> list[str]:
        """The first caption of the first validation images: the trainer's sample grid."""
        return self.validation().captions[:PREVIEW_COUNT]
