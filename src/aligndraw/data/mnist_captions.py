"""Captioned MNIST: 60x60 scenes of one or two MNIST digits with a caption that places them.

The dataset of Mansimov et al. 2016 (https://arxiv.org/abs/1511.02793, appendix; their
``create-captions.py``). A black 60x60 canvas gets 28x28 MNIST digits pasted with their top-left
corner (row, col) drawn uniformly from these inclusive ranges, one per *place*:

=============  ===========  ===========
place          rows         cols
=============  ===========  ===========
top-left       0-2          0-4
top-right      0-2          28-32
bottom-left    30-32        0-4
bottom-right   30-32        28-32
left, right    16-18        0-4, 28-32    (two digits side by side)
top, bottom    0-2, 30-32   16-18         (two digits stacked)
=============  ===========  ===========

Overlapping pixels take the max; intensities are uint8/255 in [0, 1]. The 8 caption kinds
(numerals for digits, tokens separated by spaces, final " ."), drawn uniformly:

- "the digit A is on the left of the digit B ." / "the digit B is on the right of the digit A ."
  (both: A at ``left``, B at ``right``)
- "the digit A is at the top of the digit B ." / "the digit B is at the bottom of the digit A ."
  (both: A at ``top``, B at ``bottom``)
- "the digit A is at the top left of the image ." (and top right, bottom left, bottom right)

A scene's ``layout`` is 8 ints, the digit at each place of :data:`PLACES` or -1: the label an
image reader learns and the caption's meaning (:func:`parse_caption`).

Held-out compositions. The paper bans some digit identities per caption kind from training to
test generalisation. We ban (place, digit) pairs, by place in the *image*, not by caption
wording: "A left of B" and "B right of A" depict the same picture, so banning a pair for one
wording only would still show the model the composition. One digit per place, a different one
for each place, drawn as ``np.random.default_rng(2016).permutation(10)[:8]`` and frozen in
:data:`DEFAULT_HELD_OUT`::

    top-left 8, top-right 4, bottom-left 3, bottom-right 7, left 2, right 9, top 1, bottom 5

A scene is held-out iff any of its (place, digit) pairs is banned. Training and validation
scenes never are; half the test scenes (by default) are, flagged, so that seen and held-out
compositions can be reported separately.

Splits: training scenes are regenerated every epoch (seeded by (seed, epoch)) from the first
50,000 MNIST training digits; validation scenes from the last 10,000; test scenes from the
MNIST test digits. Symbols: n scenes, B batch, L words, H = W = 60.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch

from aligndraw.data.batching import Batch, BatchPlan, batch_order
from aligndraw.data.mnist import load_mnist
from aligndraw.text import Vocabulary, encode_batch, mnist_vocabulary, tokenize

PLACES = ("top-left", "top-right", "bottom-left", "bottom-right", "left", "right", "top", "bottom")
CAPTION_KINDS = ("left-of", "right-of", "top-of", "bottom-of",
                 "top-left", "top-right", "bottom-left", "bottom-right")
# Inclusive (row_min, row_max, col_min, col_max) of a digit's top-left corner, per place.
JITTER = {
    "top-left": (0, 2, 0, 4), "top-right": (0, 2, 28, 32),
    "bottom-left": (30, 32, 0, 4), "bottom-right": (30, 32, 28, 32),
    "left": (16, 18, 0, 4), "right": (16, 18, 28, 32),
    "top": (0, 2, 16, 18), "bottom": (30, 32, 16, 18),
}
DEFAULT_HELD_OUT: tuple[tuple[str, int], ...] = (
    ("top-left", 8), ("top-right", 4), ("bottom-left", 3), ("bottom-right", 7),
    ("left", 2), ("right", 9), ("top", 1), ("bottom", 5),
)
IMAGE_SIZE, DIGIT_SIZE = 60, 28
# Per caption kind: (place of digit slot 0, place of slot 1 or -1) and the caption template.
_KIND_PLACES = np.array([[4, 5], [4, 5], [6, 7], [6, 7], [0, -1], [1, -1], [2, -1], [3, -1]])
_TEMPLATES = (
    "the digit {0} is on the left of the digit {1} .",
    "the digit {1} is on the right of the digit {0} .",
    "the digit {0} is at the top of the digit {1} .",
    "the digit {1} is at the bottom of the digit {0} .",
    *(f"the digit {{0}} is at the {p.replace('-', ' ')} of the image ." for p in PLACES[:4]),
)
_BOX = np.array([JITTER[p] for p in PLACES])  # (8, 4)
_STREAMS = {"train": 0, "validation": 1, "test": 2}  # independent seeded random streams
_MAX_REJECTION_ROUNDS = 1000
Mode = Literal["seen", "held_out", "any"]
DATASET = "mnist-captions"  # the ``dataset`` key of this data config
# Captions of the trainer's per-epoch sample grid: every kind, including held-out compositions.
PREVIEW_CAPTIONS = (
    "the digit 3 is on the left of the digit 5 .", "the digit 2 is on the left of the digit 6 .",
    "the digit 0 is at the top of the digit 4 .", "the digit 1 is at the top of the digit 7 .",
    "the digit 7 is at the top left of the image .", "the digit 8 is at the top left of the image .",
    "the digit 6 is at the bottom right of the image .",
    "the digit 4 is at the top right of the image .",
)


def default_held_out() -> tuple[tuple[str, int], ...]:
    """The default banned (place, digit) pairs; see the module docstring."""
    return DEFAULT_HELD_OUT


def held_out_matrix(held_out: Sequence[Sequence]) -> np.ndarray:
    """(8, 10) bool: ``[p, d]`` is True iff digit d at ``PLACES[p]`` is held out."""
    banned = np.zeros((len(PLACES), 10), dtype=bool)
    for place, digit in held_out:
        if place not in PLACES or int(digit) not in range(10):
            raise ValueError(f"held-out pair {[place, digit]} must be [place, digit] with "
                             f"place in {PLACES} and digit in 0..9")
        banned[PLACES.index(place), int(digit)] = True
    return banned


def layout_held_out(layouts: np.ndarray, banned: np.ndarray) -> np.ndarray:
    """(n,) bool: does any (place, digit) of ``layouts`` (n, 8) hit ``banned`` (8, 10)?"""
    hit = banned[np.arange(len(PLACES)), np.clip(layouts, 0, 9)] & (layouts >= 0)  # (n, 8)
    return hit.any(axis=1)


@dataclass(frozen=True)
class CaptionedMnistConfig:
    """Captioned-MNIST data settings (paper defaults); saved in the model config."""

    image_size: int = 60  # fixed by the paper's layout; recorded so the model config carries it
    train_scenes_per_epoch: int = 10000  # paper: 10,000 scenes, regenerated every epoch
    val_digits: int = 10000  # the last MNIST training digits, used only for validation scenes
    val_scenes: int = 1000
    test_scenes: int = 4000
    test_held_out_fraction: float = 0.5  # share of test scenes with a held-out composition
    seed: int = 1234
    held_out: tuple[tuple[str, int], ...] = DEFAULT_HELD_OUT
    dataset: str = DATASET  # names the data config in config.json (COCO's says "coco32")

    def __post_init__(self) -> None:
        pairs = tuple((str(p), int(d)) for p, d in self.held_out)
        object.__setattr__(self, "held_out", pairs)
        if self.dataset != DATASET:
            raise ValueError(f"CaptionedMnistConfig.dataset must be {DATASET!r}, got {self.dataset!r}")
        if self.image_size != IMAGE_SIZE:
            raise ValueError(f"image_size must be {IMAGE_SIZE} (the paper's scene layout), "
                             f"got {self.image_size}")
        for name in ("train_scenes_per_epoch", "val_digits", "val_scenes", "test_scenes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.test_held_out_fraction <= 1.0:
            raise ValueError(f"test_held_out_fraction must be in [0, 1], "
                             f"got {self.test_held_out_fraction}")
        if not pairs and self.test_held_out_fraction > 0:
            raise ValueError("held_out is empty, so test_held_out_fraction must be 0")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"held_out has duplicate pairs: {list(pairs)}")
        full = [PLACES[p] for p in np.flatnonzero(held_out_matrix(pairs).all(axis=1))]
        if full:
            raise ValueError(f"held_out bans every digit at {full}: nothing left to train on")

    def to_dict(self) -> dict:
        """JSON-ready dict; ``held_out`` as a list of [place, digit] pairs."""
        data = dataclasses.asdict(self)
        data["held_out"] = [[p, d] for p, d in self.held_out]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> CaptionedMnistConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown CaptionedMnistConfig keys {unknown}; "
                             f"allowed: {sorted(allowed)}")
        return cls(**data)


class ParsedCaption(NamedTuple):
    kind: int  # index into CAPTION_KINDS
    layout: np.ndarray  # (8,) digit per place, -1 where empty


def _template_pattern(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot in ("0", "1"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), rf"(?P<d{slot}>\d)")
    return re.compile(pattern)


_PATTERNS = tuple(_template_pattern(t) for t in _TEMPLATES)


def parse_caption(caption: str) -> ParsedCaption:
    """The kind and layout a captioned-MNIST caption describes (spelled digits allowed)."""
    aliases = mnist_vocabulary().aliases
    text = " ".join(aliases.get(t, t) for t in tokenize(caption))
    for kind, pattern in enumerate(_PATTERNS):
        match = pattern.fullmatch(text)
        if match:
            layout = np.full(len(PLACES), -1, dtype=np.int64)
            for slot, place in enumerate(_KIND_PLACES[kind]):
                if place >= 0:
                    layout[place] = int(match[f"d{slot}"])
            return ParsedCaption(kind, layout)
    raise ValueError(f"not a captioned-MNIST caption: {caption!r}; expected e.g. "
                     f"{_TEMPLATES[0].format(3, 5)!r}")


@dataclass
class Scenes:
    """n captioned scenes. Per-place arrays follow :data:`PLACES`; -1 marks an empty place.

    Attributes:
        images: (n, 1, 60, 60) float32 in [0, 1].
        captions: n caption strings.
        kinds: (n,) int64, index into :data:`CAPTION_KINDS`.
        layouts: (n, 8) int64, the digit at each place.
        held_out: (n,) bool, the scene has a held-out (place, digit) pair.
        sources: (n, 8) int64, index of the pasted digit in its split's digit pool.
        positions: (n, 8, 2) int64, (row, col) of the pasted digit's top-left corner.
    """

    images: np.ndarray
    captions: list[str]
    kinds: np.ndarray
    layouts: np.ndarray
    held_out: np.ndarray
    sources: np.ndarray
    positions: np.ndarray
    compositions: ClassVar[bool] = True  # layouts and held-out flags mean something here

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image_index(self) -> np.ndarray:
        """(n,) the image of each caption in :meth:`image_pool`: every scene is its own."""
        return np.arange(len(self))

    def image_pool(self) -> np.ndarray:
        """(n, 1, 60, 60) float32: the distinct images of the split (one per scene)."""
        return self.images

    def caption_images(self, index: np.ndarray) -> np.ndarray:
        """(k, 1, 60, 60) float32: the image of each caption in ``index``."""
        return self.images[index]

    def batches(self, vocab: Vocabulary, batch_size: int, *, shuffle: bool,
                generator: torch.Generator | np.random.Generator | None = None,
                drop_last: bool = False) -> BatchPlan:
        """The :class:`Batch` es of one pass, padded to each batch's longest caption.

        Args:
            shuffle: visit scenes in a random order drawn from ``generator`` (required then).
            drop_last: skip a final batch smaller than ``batch_size``.
        """
        order = batch_order(len(self), batch_size, shuffle=shuffle, generator=generator,
                            drop_last=drop_last)
        tokens, lengths = encode_batch(vocab, self.captions)  # (n, L), (n,)
        captions = list(self.captions)

        def make(idx: np.ndarray) -> Batch:
            t = torch.from_numpy(idx)
            width = int(lengths[t].max())
            return Batch(
                images=torch.from_numpy(self.images[idx]),  # (B, 1, H, W)
                tokens=tokens[t, :width],  # (B, L)
                lengths=lengths[t],
                layouts=torch.from_numpy(self.layouts[idx]),
                held_out=torch.from_numpy(self.held_out[idx]),
                captions=[captions[i] for i in idx.tolist()],
            )

        return BatchPlan(order, make)

    def subset(self, index: np.ndarray | slice) -> Scenes:
        """The scenes at ``index`` (an index array or a slice)."""
        picked = np.arange(len(self))[index]
        return Scenes(self.images[picked], [self.captions[i] for i in picked],
                      *(a[picked] for a in (self.kinds, self.layouts, self.held_out,
                                            self.sources, self.positions)))


def _sample_digits(labels: np.ndarray, places: np.ndarray, rng: np.random.Generator,
                   banned: np.ndarray, mode: Mode) -> np.ndarray:
    """Rejection-sample pool indices (n, 2) for the slots in ``places`` (n, 2), -1 if none.

    Indices are uniform over the pool subject to ``mode`` and to the two digits of a scene
    being different MNIST images (their identities may be equal).
    """
    n = len(places)
    two = places[:, 1] >= 0
    picks = np.full((n, 2), -1, dtype=np.int64)
    todo = np.arange(n)
    for _ in range(_MAX_REJECTION_ROUNDS):
        cand = rng.integers(0, len(labels), size=(len(todo), 2))  # (m, 2)
        digits = labels[cand]
        p, t = places[todo], two[todo]
        held = banned[p[:, 0], digits[:, 0]] | (t & banned[np.maximum(p[:, 1], 0), digits[:, 1]])
        ok = ~t | (cand[:, 0] != cand[:, 1])
        ok &= {"seen": ~held, "held_out": held, "any": np.ones_like(held)}[mode]
        picks[todo[ok], 0] = cand[ok, 0]
        picks[todo[ok], 1] = np.where(t[ok], cand[ok, 1], -1)
        todo = todo[~ok]
        if len(todo) == 0:
            return picks
    raise ValueError(f"could not sample {mode!r} scenes: the digit pool has no digits "
                     "that satisfy the held-out constraints")


def _sample_plan(labels: np.ndarray, n: int, rng: np.random.Generator, banned: np.ndarray,
                 mode: Mode) -> dict[str, np.ndarray]:
    """Kinds, per-place layouts/sources/positions of n scenes (no pixels yet)."""
    if mode not in ("seen", "held_out", "any"):
        raise ValueError(f"mode must be 'seen', 'held_out' or 'any', got {mode!r}")
    kinds = rng.integers(0, len(CAPTION_KINDS), size=n)
    places = _KIND_PLACES[kinds]  # (n, 2)
    picks = _sample_digits(labels, places, rng, banned, mode)  # (n, 2)
    box = _BOX[np.maximum(places, 0)]  # (n, 2, 4)
    rows = rng.integers(box[..., 0], box[..., 1] + 1)  # (n, 2)
    cols = rng.integers(box[..., 2], box[..., 3] + 1)  # (n, 2)
    layouts = np.full((n, len(PLACES)), -1, dtype=np.int64)
    sources = layouts.copy()
    positions = np.full((n, len(PLACES), 2), -1, dtype=np.int64)
    for slot in range(2):
        i = np.flatnonzero(places[:, slot] >= 0)
        p = places[i, slot]
        layouts[i, p] = labels[picks[i, slot]]
        sources[i, p] = picks[i, slot]
        positions[i, p] = np.stack([rows[i, slot], cols[i, slot]], axis=1)
    held = layout_held_out(layouts, banned)
    return dict(kinds=kinds, layouts=layouts, held_out=held, sources=sources, positions=positions)


def _render(digits: np.ndarray, sources: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Paste pool ``digits`` (P, 28, 28) uint8 per place, max-combined: (n, 1, 60, 60) float32."""
    n = len(sources)
    canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    offsets = np.arange(DIGIT_SIZE)
    for place in range(len(PLACES)):
        i = np.flatnonzero(sources[:, place] >= 0)  # at most one digit per scene and place
        rows = positions[i, place, 0, None, None] + offsets[None, :, None]  # (m, 28, 1)
        cols = positions[i, place, 1, None, None] + offsets[None, None, :]  # (m, 1, 28)
        b = i[:, None, None]
        canvas[b, rows, cols] = np.maximum(canvas[b, rows, cols], digits[sources[i, place]])
    return (canvas.astype(np.float32) / np.float32(255.0))[:, None]  # (n, 1, 60, 60)


def caption_texts(kinds: np.ndarray, layouts: np.ndarray) -> list[str]:
    """The caption of each scene: kinds (n,) into :data:`CAPTION_KINDS`, layouts (n, 8)."""
    slots = np.take_along_axis(layouts, np.maximum(_KIND_PLACES[kinds], 0), axis=1)  # (n, 2)
    pairs = zip(kinds.tolist(), slots.tolist(), strict=True)
    return [_TEMPLATES[k].format(a, b) for k, (a, b) in pairs]


def _realise(plan: dict[str, np.ndarray], digits: np.ndarray) -> Scenes:
    images = _render(digits, plan["sources"], plan["positions"])
    return Scenes(images=images, captions=caption_texts(plan["kinds"], plan["layouts"]), **plan)


def make_scenes(
    digits: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
    held_out: Sequence[Sequence] = DEFAULT_HELD_OUT, mode: Mode = "seen",
) -> Scenes:
    """Generate n random captioned scenes from a digit pool.

    Args:
        digits: (P, 28, 28) uint8 MNIST images; labels: (P,) their digits.
        n: number of scenes. rng: the only source of randomness.
        held_out: banned (place, digit) pairs.
        mode: "seen" (no banned pair), "held_out" (at least one) or "any".
    """
    plan = _sample_plan(np.asarray(labels), n, rng, held_out_matrix(held_out), mode)
    return _realise(plan, digits)


def _take(plan: dict[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in plan.items()}


class CaptionedMnist:
    """The three captioned-MNIST splits, generated on the fly from MNIST and seeded.

    Args:
        config: data settings (defaults: the paper's).
        source: directory with the MNIST files (see :func:`aligndraw.data.mnist.ensure_mnist`).
        train, test: (images, labels) arrays to use instead of real MNIST (tests, toy runs).
    """

    def __init__(self, config: CaptionedMnistConfig | None = None, *, source=None,
                 train: tuple[np.ndarray, np.ndarray] | None = None,
                 test: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.config = config or CaptionedMnistConfig()
        train_x, train_y = train if train is not None else load_mnist("train", source)
        self._test = test if test is not None else load_mnist("test", source)
        k = self.config.val_digits
        if not 0 < k < len(train_x):
            raise ValueError(f"val_digits={k} must leave training digits out of {len(train_x)}")
        self._train, self._val = (train_x[:-k], train_y[:-k]), (train_x[-k:], train_y[-k:])
        self._banned = held_out_matrix(self.config.held_out)
        self.vocab = mnist_vocabulary()
        self._cache: dict[str, Scenes] = {}

    def batches(self, split: Scenes, batch_size: int, *, shuffle: bool,
                generator: torch.Generator | np.random.Generator | None = None,
                drop_last: bool = False) -> BatchPlan:
        """Batches of ``split`` (see :meth:`Scenes.batches`), in this dataset's vocabulary."""
        return split.batches(self.vocab, batch_size, shuffle=shuffle, generator=generator,
                             drop_last=drop_last)

    def preview_captions(self) -> list[str]:
        """Fixed captions for sample grids: every caption kind, held-out compositions too."""
        return list(PREVIEW_CAPTIONS)

    @property
    def training_digits(self) -> tuple[np.ndarray, np.ndarray]:
        """The digit pool of training scenes: images (n, 28, 28) uint8 and labels (n,)."""
        return self._train

    def _rng(self, split: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, _STREAMS[split], *extra])

    def train_epoch(self, epoch: int, *, rank: int = 0, world_size: int = 1) -> Scenes:
        """The training scenes of ``epoch`` (seen compositions only), or this rank's shard.

        The epoch is the same for any world size; rank r gets scenes r, r + world_size, ...,
        and every rank the same number (n // world_size; the < world_size leftover scenes
        are dropped) so that data-parallel ranks run the same number of steps.
        """
        if epoch < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need epoch >= 0 and 0 <= rank < world_size, got epoch={epoch}, "
                             f"rank={rank}, world_size={world_size}")
        n = self.config.train_scenes_per_epoch
        if n < world_size:
            raise ValueError(f"train_scenes_per_epoch={n} is less than world_size={world_size}")
        plan = _sample_plan(self._train[1], n, self._rng("train", epoch), self._banned, "seen")
        shard = _take(plan, slice(rank, n - n % world_size, world_size))
        return _realise(shard, self._train[0])

    def validation(self) -> Scenes:
        """Fixed validation scenes from the validation digit slice, seen compositions only."""
        if "validation" not in self._cache:
            x, y = self._val
            plan = _sample_plan(y, self.config.val_scenes, self._rng("validation"),
                                self._banned, "seen")
            self._cache["validation"] = _realise(plan, x)
        return self._cache["validation"]

    def test(self) -> Scenes:
        """Fixed test scenes from MNIST test digits, ``test_held_out_fraction`` held-out."""
        if "test" not in self._cache:
            x, y = self._test
            n, rng = self.config.test_scenes, self._rng("test")
            n_held = round(n * self.config.test_held_out_fraction)
            parts = [_sample_plan(y, n_held, rng, self._banned, "held_out"),
                     _sample_plan(y, n - n_held, rng, self._banned, "seen")]
            plan = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            self._cache["test"] = _realise(_take(plan, rng.permutation(n)), x)
        return self._cache["test"]


def iterate_batches(scenes: Scenes, vocab: Vocabulary, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | np.random.Generator | None = None,
                    drop_last: bool = False) -> Iterator[Batch]:
    """Yield :class:`Batch` es of ``scenes``; tokens are padded to each batch's longest caption.

    Args:
        shuffle: visit scenes in a random order drawn from ``generator`` (required then).
        drop_last: skip a final batch smaller than ``batch_size``.
    """
    yield from scenes.batches(vocab, batch_size, shuffle=shuffle, generator=generator,
                              drop_last=drop_last)
