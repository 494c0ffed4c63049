"""What goes wrong on held-out compositions (the bundled model's model card).

    python experiments/held_out_errors.py [--model mnist-captions] [--captions 4000]
        [--corner-samples 50] [--seed 0]

Two-digit scenes: for every held-out two-digit caption among the first N test captions, one
sample at temperature 1 is read by the bundled image reader. Prints the share drawn exactly
right, the share drawn with the two digits swapped, and how often the digit of the held-out
(place, digit) pair is read right at its place compared with the caption's other digit.

One-digit scenes: for each corner and each digit, ``--corner-samples`` samples of "the digit
D is at the CORNER of the image ." are read at that corner. Prints, per corner, how often
seen digits are drawn right and what is drawn for the held-out one: the model's answer to a
word it never saw at that place.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from aligndraw.data import make_dataset
from aligndraw.data.mnist_captions import CAPTION_KINDS, PLACES, caption_texts, parse_caption
from aligndraw.pipeline import AlignDrawPipeline
from aligndraw.reader import load_reader, read_layouts

TWO_DIGIT_KINDS = {k for k, name in enumerate(CAPTION_KINDS) if name.endswith("-of")}


def corner_report(pipe: AlignDrawPipeline, reader, samples: int, seed: int) -> None:
    """Per corner: seen digits drawn right (%), and what the held-out digit comes out as."""
    held = {place: int(digit) for place, digit in pipe.held_out}
    for place in PLACES[:4]:  # the one-digit kinds
        where = PLACES.index(place)
        layouts = np.full((10, len(PLACES)), -1)
        layouts[:, where] = np.arange(10)  # digit d alone at this corner
        captions = caption_texts(np.full(10, CAPTION_KINDS.index(place)), layouts)
        images = pipe(captions, num_images_per_caption=samples, output_type="pt",
                      generator=torch.Generator().manual_seed(seed)).images
        got = read_layouts(reader, images).numpy()[:, where].reshape(10, samples)  # (digit, sample)
        right = got == np.arange(10)[:, None]
        d = held.get(place)
        seen = [k for k in range(10) if k != d]
        line = f"{place:>12}: seen digits right {100 * right[seen].mean():5.1f} %"
        if d is not None:
            values, counts = np.unique(got[d], return_counts=True)
            order = np.argsort(-counts)[:3]
            drawn = ", ".join(f"{'empty' if values[i] < 0 else values[i]} {100 * counts[i] / samples:.0f} %"
                              for i in order)
            line += f"; held-out {d} right {100 * right[d].mean():5.1f} %, drawn as: {drawn}"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist-captions")
    p.add_argument("--captions", type=int, default=4000, help="first N test captions")
    p.add_argument("--corner-samples", type=int, default=50, help="samples per one-digit caption")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    pipe = AlignDrawPipeline.from_pretrained(args.model)
    scenes = make_dataset(pipe.config.data).test()
    parsed = [parse_caption(c) for c in scenes.captions[:args.captions]]
    rows = [i for i, c in enumerate(parsed)
            if scenes.held_out[i] and c.kind in TWO_DIGIT_KINDS]
    images = pipe([scenes.captions[i] for i in rows], output_type="pt",
                  generator=torch.Generator().manual_seed(args.seed)).images
    read = read_layouts(load_reader("reader"), images).numpy()  # (n, 8), -1 = empty
    wanted = np.stack([parsed[i].layout for i in rows])  # (n, 8)
    held_pairs = {(place, int(digit)) for place, digit in pipe.held_out}
    swapped, held_right, other_right = [], [], []
    for got, want in zip(read, wanted, strict=True):
        places = np.flatnonzero(want >= 0)
        swap = want.copy()
        swap[places] = want[places[::-1]]
        swapped.append((got == swap).all())
        for place in places:
            bucket = held_right if (PLACES[place], int(want[place])) in held_pairs else other_right
            bucket.append(got[place] == want[place])
    print(f"held-out two-digit captions: {len(rows)} (of the first {args.captions} test captions)")
    print(f"drawn exactly right: {100 * (read == wanted).all(1).mean():.1f} %; "
          f"digits swapped: {100 * np.mean(swapped):.1f} %")
    print(f"digit of the held-out pair read right at its place: {100 * np.mean(held_right):.1f} % "
          f"(n = {len(held_right)}); the caption's other digit: {100 * np.mean(other_right):.1f} % "
          f"(n = {len(other_right)})")
    print(f"one-digit captions, {args.corner_samples} samples each:")
    corner_report(pipe, load_reader("reader"), args.corner_samples, args.seed)


if __name__ == "__main__":
    main()
