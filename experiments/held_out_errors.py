"""What goes wrong on held-out two-digit compositions (the bundled model's model card).

    python experiments/held_out_errors.py [--model mnist-captions] [--captions 4000] [--seed 0]

For every held-out two-digit caption among the first N test captions, one sample at
temperature 1 is read by the bundled image reader. Prints the share drawn exactly right, the
share drawn with the two digits swapped, and how often the digit of the held-out
(place, digit) pair is read right at its place compared with the caption's other digit.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from aligndraw.data import make_dataset
from aligndraw.data.mnist_captions import CAPTION_KINDS, PLACES, parse_caption
from aligndraw.pipeline import AlignDrawPipeline
from aligndraw.reader import load_reader, read_layouts

TWO_DIGIT_KINDS = {k for k, name in enumerate(CAPTION_KINDS) if name.endswith("-of")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist-captions")
    p.add_argument("--captions", type=int, default=4000, help="first N test captions")
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


if __name__ == "__main__":
    main()
