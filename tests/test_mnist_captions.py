"""Captioned-MNIST scenes (aligndraw.data.mnist_captions) on the real MNIST digits.

Every scene must look like what its caption says: ink only where the caption's places allow,
the caption parsing back to the layout, held-out compositions only in flagged test scenes.
"""

import json
import re

import numpy as np
import pytest
import torch

from aligndraw.data.mnist import load_mnist
from aligndraw.data.mnist_captions import (
    CAPTION_KINDS,
    DEFAULT_HELD_OUT,
    JITTER,
    PLACES,
    CaptionedMnist,
    CaptionedMnistConfig,
    Scenes,
    default_held_out,
    held_out_matrix,
    iterate_batches,
    layout_held_out,
    make_scenes,
    parse_caption,
)
from aligndraw.text import mnist_vocabulary

# PAPER.md, written out again here (not imported) so that a wrong constant in the module fails.
PAPER_JITTER = {
    "top-left": (0, 2, 0, 4), "top-right": (0, 2, 28, 32),
    "bottom-left": (30, 32, 0, 4), "bottom-right": (30, 32, 28, 32),
    "left": (16, 18, 0, 4), "right": (16, 18, 28, 32),
    "top": (0, 2, 16, 18), "bottom": (30, 32, 16, 18),
}
SMALL = CaptionedMnistConfig(train_scenes_per_epoch=2000, val_scenes=500, test_scenes=1000)
BANNED = set(DEFAULT_HELD_OUT)


@pytest.fixture(scope="module")
def data(mnist_dir):
    return CaptionedMnist(SMALL)


@pytest.fixture(scope="module")
def splits(data):
    return {"train": data.train_epoch(0), "validation": data.validation(), "test": data.test()}


def _place_boxes(core: bool) -> np.ndarray:
    """(8, 60, 60) bool: where a digit at each place may put ink (core: where it always does)."""
    boxes = np.zeros((len(PLACES), 60, 60), dtype=bool)
    for p, place in enumerate(PLACES):
        r0, r1, c0, c1 = PAPER_JITTER[place]
        if core:  # MNIST ink lies in the central 20x20 of the 28x28 digit
            boxes[p, r1 + 4 : r0 + 24, c1 + 4 : c0 + 24] = True
        else:
            boxes[p, r0 : r1 + 28, c0 : c1 + 28] = True
    return boxes


_RELATIONS = {  # caption phrase -> (place of the first-named digit, place of the second)
    "on the left of the digit": ("left", "right"),
    "on the right of the digit": ("right", "left"),
    "at the top of the digit": ("top", "bottom"),
    "at the bottom of the digit": ("bottom", "top"),
}


def _read_caption(caption: str) -> dict[str, int]:
    """Independent reading of a caption, {place: digit}, straight from the paper's wording."""
    two = re.fullmatch(r"the digit (\d) is (.+) (\d) \.", caption)
    if two:
        first, second = _RELATIONS[two[2]]
        return {first: int(two[1]), second: int(two[3])}
    one = re.fullmatch(r"the digit (\d) is at the (top|bottom) (left|right) of the image \.",
                       caption)
    return {f"{one[2]}-{one[3]}": int(one[1])}


def _pairs(layout):
    return {(PLACES[p], int(d)) for p, d in enumerate(layout) if d >= 0}


pytestmark = pytest.mark.realdata


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_ink_lies_only_where_the_caption_puts_digits(splits, split):
    scenes = splits[split]
    ink = scenes.images[:, 0] > 0.1  # (n, 60, 60)
    occupied = scenes.layouts >= 0  # (n, 8)
    allowed = np.einsum("np,phw->nhw", occupied, _place_boxes(core=False)) > 0
    assert not (ink & ~allowed).any()
    core_ink = np.einsum("nhw,phw->np", ink.astype(np.int64), _place_boxes(core=True))
    assert (core_ink[occupied] >= 5).all()  # each named digit is really drawn in its place
    assert scenes.images.dtype == np.float32 and scenes.images.shape[1:] == (1, 60, 60)
    assert 0.0 <= scenes.images.min() and scenes.images.max() <= 1.0


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_captions_parse_back_to_layouts(splits, split):
    scenes = splits[split]
    for caption, kind, layout in zip(scenes.captions, scenes.kinds, scenes.layouts, strict=True):
        assert _read_caption(caption) == {PLACES[p]: d for p, d in enumerate(layout) if d >= 0}
        parsed = parse_caption(caption)
        assert parsed.kind == kind
        np.testing.assert_array_equal(parsed.layout, layout)
    assert (scenes.layouts >= 0).sum(axis=1).tolist() == [1 + (k < 4) for k in scenes.kinds]


def test_images_match_a_naive_paste_of_the_named_mnist_digits(data, splits):
    pools = {"train": data._train, "validation": data._val, "test": data._test}
    for split, scenes in splits.items():
        digits, labels = pools[split]
        occupied = scenes.layouts >= 0
        np.testing.assert_array_equal(labels[scenes.sources[occupied]], scenes.layouts[occupied])
        for i in range(0, len(scenes), 7):
            canvas = np.zeros((60, 60), dtype=np.uint8)
            for p in np.flatnonzero(occupied[i]):
                r, c = scenes.positions[i, p]
                window = canvas[r : r + 28, c : c + 28]
                np.maximum(window, digits[scenes.sources[i, p]], out=window)
            np.testing.assert_array_equal(scenes.images[i, 0], canvas / np.float32(255))


def test_jitter_covers_each_inclusive_range(splits):
    scenes = splits["train"]
    assert JITTER == PAPER_JITTER
    for p, place in enumerate(PLACES):
        r0, r1, c0, c1 = PAPER_JITTER[place]
        pos = scenes.positions[scenes.layouts[:, p] >= 0, p]  # (m, 2)
        assert set(pos[:, 0].tolist()) == set(range(r0, r1 + 1)), place
        assert set(pos[:, 1].tolist()) == set(range(c0, c1 + 1)), place


def test_kinds_are_uniform_and_two_digit_scenes_use_two_images(splits):
    scenes = splits["train"]
    counts = np.bincount(scenes.kinds, minlength=len(CAPTION_KINDS))
    assert counts.min() > 0.7 * len(scenes) / 8 and counts.max() < 1.3 * len(scenes) / 8
    two = scenes.kinds < 4
    first, second = np.sort(np.where(scenes.sources >= 0, scenes.sources, -1), axis=1)[:, -2:].T
    assert (first[two] != second[two]).all()
    pairs = scenes.layouts[two][:, [4, 5, 6, 7]]
    assert ((pairs[:, 0] == pairs[:, 1]) | (pairs[:, 2] == pairs[:, 3])).any()  # same digit ok


def test_default_held_out_is_the_documented_seeded_draw():
    digits = np.random.default_rng(2016).permutation(10)[:8].tolist()
    assert default_held_out() == tuple(zip(PLACES, digits, strict=True))
    assert [d for _, d in DEFAULT_HELD_OUT] == [8, 4, 3, 7, 2, 9, 1, 5]
    assert len({d for _, d in DEFAULT_HELD_OUT}) == len(PLACES)


def test_training_and_validation_never_show_held_out_pairs(data, splits):
    for scenes in (splits["train"], data.train_epoch(1), splits["validation"]):
        assert not scenes.held_out.any()
        assert all(not (_pairs(layout) & BANNED) for layout in scenes.layouts)


def test_test_split_flags_held_out_scenes_and_has_the_right_fraction(splits):
    scenes = splits["test"]
    truth = np.array([bool(_pairs(layout) & BANNED) for layout in scenes.layouts])
    np.testing.assert_array_equal(scenes.held_out, truth)
    assert scenes.held_out.sum() == round(SMALL.test_scenes * SMALL.test_held_out_fraction)
    hit = set().union(*(_pairs(lay) & BANNED for lay in scenes.layouts[scenes.held_out]))
    assert hit == BANNED  # every held-out composition is tested
    assert 0 < scenes.held_out[:100].sum() < 100  # seen and held-out scenes are interleaved


def test_splits_are_deterministic_by_seed_and_epochs_differ(data, splits):
    again = CaptionedMnist(SMALL)
    for split, scenes in [("validation", again.validation()), ("test", again.test()),
                          ("train", again.train_epoch(0))]:
        np.testing.assert_array_equal(scenes.images, splits[split].images)
        assert scenes.captions == splits[split].captions
    assert data.train_epoch(1).captions != splits["train"].captions
    other = CaptionedMnist(CaptionedMnistConfig(**{**SMALL.to_dict(), "seed": 7}))
    assert other.validation().captions != splits["validation"].captions


def test_ddp_shards_are_disjoint_and_cover_the_epoch(data, splits):
    full = splits["train"]
    shards = [data.train_epoch(0, rank=r, world_size=4) for r in range(4)]
    assert [len(s) for s in shards] == [len(full) // 4] * 4
    for r, shard in enumerate(shards):
        np.testing.assert_array_equal(shard.images, full.images[r::4])
        assert shard.captions == full.captions[r::4]
    owners = np.concatenate([np.arange(len(full))[r::4] for r in range(4)])
    assert sorted(owners.tolist()) == list(range(len(full)))  # disjoint and covering
    odd = CaptionedMnist(CaptionedMnistConfig(**{**SMALL.to_dict(), "train_scenes_per_epoch": 7}))
    assert [len(odd.train_epoch(0, rank=r, world_size=3)) for r in range(3)] == [2, 2, 2]
    with pytest.raises(ValueError, match="rank"):
        data.train_epoch(0, rank=4, world_size=4)


def test_batches_cover_the_scenes_and_pad_with_zero(splits):
    scenes, vocab = splits["validation"], mnist_vocabulary()
    short = scenes.subset(np.arange(100))
    short.captions[::3] = ["the digit 7 ." for _ in short.captions[::3]]  # mixed lengths
    batches = list(iterate_batches(short, vocab, 32, shuffle=True,
                                   generator=torch.Generator().manual_seed(0)))
    assert [len(b.captions) for b in batches] == [32, 32, 32, 4]
    assert sorted(c for b in batches for c in b.captions) == sorted(short.captions)
    for b in batches:
        assert b.images.shape == (len(b.captions), 1, 60, 60) and b.images.dtype == torch.float32
        assert b.tokens.dtype == torch.long and b.tokens.shape[1] == int(b.lengths.max())
        assert b.layouts.shape == (len(b.captions), 8) and b.held_out.dtype == torch.bool
        for row, n, caption in zip(b.tokens, b.lengths, b.captions, strict=True):
            assert (row[n:] == 0).all() and vocab.decode(row) == caption
    assert set(batches[0].lengths.tolist()) == {4, 12}
    kept = list(iterate_batches(short, vocab, 32, shuffle=False, drop_last=True))
    assert len(kept) == 3 and kept[0].captions == short.captions[:32]
    with pytest.raises(ValueError, match="Generator"):
        next(iterate_batches(short, vocab, 32, shuffle=True))


def test_make_scenes_modes(mnist_dir):
    digits, labels = load_mnist("test")
    rng = np.random.default_rng(0)
    held = make_scenes(digits, labels, 300, rng, DEFAULT_HELD_OUT, mode="held_out")
    seen = make_scenes(digits, labels, 300, rng, DEFAULT_HELD_OUT, mode="seen")
    mixed = make_scenes(digits, labels, 300, rng, DEFAULT_HELD_OUT, mode="any")
    assert held.held_out.all() and not seen.held_out.any() and 0 < mixed.held_out.sum() < 300
    assert isinstance(held, Scenes) and len(held) == 300
    with pytest.raises(ValueError, match="mode"):
        make_scenes(digits, labels, 3, rng, DEFAULT_HELD_OUT, mode="novel")
    no_eights = labels != 8  # a pool without the banned top-left digit and nothing else
    with pytest.raises(ValueError, match="could not sample"):
        make_scenes(digits[no_eights], labels[no_eights], 50, rng, [("top-left", 8)], "held_out")


def test_parse_caption_accepts_spelled_digits_and_rejects_other_text():
    parsed = parse_caption("The digit seven is at the bottom right of the image.")
    assert CAPTION_KINDS[parsed.kind] == "bottom-right"
    assert parsed.layout.tolist() == [-1, -1, -1, 7, -1, -1, -1, -1]
    right_of = parse_caption("the digit 5 is on the right of the digit 3 .")
    assert right_of.layout[PLACES.index("left")] == 3 and right_of.layout[4:6].tolist() == [3, 5]
    with pytest.raises(ValueError, match="not a captioned-MNIST caption"):
        parse_caption("the digit 5 is in the middle .")


def test_layout_held_out_uses_places_not_wording():
    banned = held_out_matrix([("left", 2)])
    a = parse_caption("the digit 2 is on the left of the digit 6 .").layout
    b = parse_caption("the digit 6 is on the right of the digit 2 .").layout
    c = parse_caption("the digit 6 is on the left of the digit 2 .").layout
    assert layout_held_out(np.stack([a, b, c]), banned).tolist() == [True, True, False]


def test_config_round_trips_through_json_and_validates():
    config = CaptionedMnistConfig(seed=3, held_out=[["top", 4], ["left", 0]])
    assert config.held_out == (("top", 4), ("left", 0))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["held_out"] == [["top", 4], ["left", 0]]
    assert CaptionedMnistConfig.from_dict(data) == config
    bad = [
        ({"image_size": 64}, "image_size"),
        ({"test_held_out_fraction": 1.5}, "test_held_out_fraction"),
        ({"val_scenes": 0}, "val_scenes"),
        ({"held_out": [["middle", 3]]}, "place in"),
        ({"held_out": [["top", 1], ["top", 1]]}, "duplicate"),
        ({"held_out": [["top", d] for d in range(10)]}, "every digit"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            CaptionedMnistConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown CaptionedMnistConfig keys"):
        CaptionedMnistConfig.from_dict({"sed": 1})
