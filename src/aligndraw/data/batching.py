"""Batches shared by every dataset: the :class:`Batch` record, a lazy :class:`BatchPlan`, and
the two orders captions are batched in.

- :func:`batch_order`: consecutive chunks of a (possibly shuffled) order, padded to each
  batch's longest caption (captioned MNIST, and evaluation everywhere).
- :func:`length_grouped_order`: captions of *equal* length per batch, as the authors' code
  does on COCO so that no step computes on padding. Each length group is shuffled and cut
  into full batches; the few left over of every group are pooled, sorted by length and cut
  again (nearly equal lengths, a little padding), so that every caption is visited every
  epoch; then the batches are shuffled across groups.

A :class:`BatchPlan` holds only index arrays and builds a batch when it is visited, so an
epoch of COCO (4,000+ batches) never sits in memory as tensors. Symbols: n captions,
B batch size, L words in the batch's longest caption.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

RandomSource = torch.Generator | np.random.Generator | None


@dataclass
class Batch:
    """A training batch. images (B, C, H, W) float32 in [0, 1]; tokens (B, L) long, 0-padded;
    lengths (B,) long; layouts (B, 8) long (captioned MNIST only, else None); held_out (B,)
    bool (all False where a dataset has no held-out compositions); captions: B strings."""

    images: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    layouts: torch.Tensor | None
    held_out: torch.Tensor
    captions: list[str]

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Batch(**moved)


class BatchPlan(Sequence):
    """The batches of one pass over a split, built lazily from index arrays.

    ``len(plan)`` is the number of batches; ``plan[i]`` builds batch i; ``plan[k:]`` is the
    plan of the remaining batches (how the trainer resumes mid-epoch).
    """

    def __init__(self, indices: Sequence[np.ndarray], make: Callable[[np.ndarray], Batch]) -> None:
        self.indices = list(indices)  # one index array per batch, into the split's captions
        self._make = make

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # int -> Batch, slice -> BatchPlan
        if isinstance(i, slice):
            return BatchPlan(self.indices[i], self._make)
        return self._make(self.indices[i])

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.indices:
            yield self._make(idx)


def permutation(n: int, generator: RandomSource) -> np.ndarray:
    """A random order of ``range(n)`` from a torch or numpy generator (required)."""
    if isinstance(generator, torch.Generator):
        return torch.randperm(n, generator=generator).numpy()
    if isinstance(generator, np.random.Generator):
        return generator.permutation(n)
    raise ValueError("shuffle=True needs a torch.Generator or np.random.Generator")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def batch_order(n: int, batch_size: int, *, shuffle: bool, generator: RandomSource = None,
                drop_last: bool = False) -> list[np.ndarray]:
    """Consecutive chunks of ``range(n)`` (shuffled first if asked); the last may be short
    unless ``drop_last``."""
    _check_batch_size(batch_size)
    order = permutation(n, generator) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[start:start + batch_size] for start in range(0, stop, batch_size)]


def length_grouped_order(lengths: np.ndarray, batch_size: int, *, shuffle: bool,
                         generator: RandomSource = None, drop_last: bool = False) -> list[np.ndarray]:
    """Batches of captions of equal length (plus one pass over the leftovers; module doc).

    Args:
        lengths: (n,) caption lengths.
        shuffle: shuffle within each length group and the order of the batches.
        drop_last: drop the one short batch that may remain at the end of the leftovers, so
            that every batch has ``batch_size`` captions and the count is ``n // batch_size``
            (equal on every data-parallel rank whose shard has the same size).

    Returns:
        index arrays, one per batch.
    """
    _check_batch_size(batch_size)
    lengths = np.asarray(lengths)
    n = len(lengths)
    order = permutation(n, generator) if shuffle else np.arange(n)
    order = order[np.argsort(lengths[order], kind="stable")]  # by length, shuffled within
    batches, leftovers = [], []
    bounds = np.flatnonzero(np.diff(lengths[order])) + 1
    for group in np.split(order, bounds):
        full = len(group) - len(group) % batch_size
        batches += [group[i:i + batch_size] for i in range(0, full, batch_size)]
        leftovers.append(group[full:])
    rest = np.concatenate(leftovers) if leftovers else np.zeros(0, dtype=np.int64)  # by length
    stop = len(rest) - len(rest) % batch_size if drop_last else len(rest)
    batches += [rest[i:i + batch_size] for i in range(0, stop, batch_size)]
    if shuffle and batches:
        batches = [batches[i] for i in permutation(len(batches), generator)]
    return batches
