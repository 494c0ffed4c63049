"""Datasets: real MNIST idx files (:mod:`.mnist`), captioned MNIST scenes
(:mod:`.mnist_captions`) and Microsoft COCO at 32x32 (:mod:`.coco`, prepared by
:mod:`.coco_prepare`).

Both caption datasets offer the trainer and the evaluation one interface,
:class:`CaptionDataset`, whose splits follow :class:`CaptionSplit`; :func:`make_dataset` builds
the one a run's data config names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from aligndraw.data.batching import Batch, BatchPlan, RandomSource

if TYPE_CHECKING:
    from aligndraw.text import Vocabulary

__all__ = ["Batch", "BatchPlan", "CaptionDataset", "CaptionSplit", "make_dataset"]


class CaptionSplit(Protocol):
    """n (image, caption) pairs. Several captions may share an image (COCO: five)."""

    captions: list[str]  # n caption texts
    held_out: np.ndarray  # (n,) bool; all False where the dataset holds nothing out
    compositions: bool  # True when layouts / held-out compositions mean something (MNIST)

    def __len__(self) -> int: ...

    @property
    def image_index(self) -> np.ndarray:  # (n,) row of each caption's image in image_pool()
        ...

    def image_pool(self) -> np.ndarray: ...  # (N, C, H, W) float32, the split's distinct images

    def caption_images(self, index: np.ndarray) -> np.ndarray: ...  # (k, C, H, W) float32

    def subset(self, index: np.ndarray | slice) -> CaptionSplit: ...

    def batches(self, vocab: Vocabulary, batch_size: int, *, shuffle: bool,
                generator: RandomSource = None, drop_last: bool = False) -> BatchPlan: ...


class CaptionDataset(Protocol):
    """What the trainer, ``evaluate`` and the CLI need from a dataset."""

    config: Any  # CaptionedMnistConfig | CocoConfig, as resolved by the dataset
    vocab: Vocabulary

    def train_epoch(self, epoch: int, *, rank: int = 0, world_size: int = 1) -> CaptionSplit: ...

    def validation(self) -> CaptionSplit: ...

    def test(self) -> CaptionSplit: ...

    def batches(self, split: CaptionSplit, batch_size: int, *, shuffle: bool,
                generator: RandomSource = None, drop_last: bool = False) -> BatchPlan: ...

    def preview_captions(self) -> list[str]: ...


def make_dataset(config: Any, *, source: str | os.PathLike | None = None) -> CaptionDataset:
    """The dataset a data config names.

    Args:
        config: a ``CaptionedMnistConfig`` or a ``CocoConfig``.
        source: MNIST: the directory with the idx files; COCO: the prepared directory
            (``aligndraw data coco --out``), overriding ``config.root``. None: the defaults.
    """
    from aligndraw.data.coco import CocoCaptions, CocoConfig
    from aligndraw.data.mnist_captions import CaptionedMnist, CaptionedMnistConfig

    if isinstance(config, CocoConfig):
        return CocoCaptions(config, root=source)
    if isinstance(config, CaptionedMnistConfig):
        return CaptionedMnist(config, source=source)
    raise TypeError(f"no dataset for a {type(config).__name__}; expected CaptionedMnistConfig "
                    "or CocoConfig")
