"""Image reader: a small CNN that says which digit sits at each of the 8 places of a scene.

It is an evaluation tool, not part of alignDRAW. ``evaluation.caption_fidelity`` reads generated
images with it and checks them against their captions; ``evaluation.retrieval`` takes its
penultimate features as the image-feature space of the nearest-neighbour shortlists (the paper
used a CIFAR-10 classifier on COCO; PAPER.md, "Evaluation in the paper").

    logits = reader(x)          # (B, 8, 11): per place, digit 0-9 or 10 = empty
    layouts = read_layouts(reader, x)   # (B, 8), -1 where empty, as ``Scenes.layouts``

Training data. The generative model never sees a held-out (place, digit) pair; a reader trained
only on those scenes would be a weak judge of exactly the compositions we test. So by default
(``compositions="any"``) the reader trains on scenes of *any* composition, held-out pairs
included, drawn fresh every step from the MNIST *training* digits (the first 50,000; the
validation and test digits are never used). This does not leak anything into the generative
model, which is trained separately; ``compositions="seen"`` uses the generative model's own
training scenes (``CaptionedMnist.train_epoch``) instead.

Symbols: B batch, F feature size, P = 8 places, K = 11 classes per place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from aligndraw import __version__
from aligndraw.checkpoint import clean_state_dict, write_dir_atomically
from aligndraw.data.mnist_captions import PLACES, CaptionedMnist, CaptionedMnistConfig, Scenes, make_scenes

log = logging.getLogger(__name__)
EMPTY = 10  # class index of an empty place
NUM_CLASSES = 11
READER_KIND = "aligndraw-image-reader"  # config.json "kind", so it is never mistaken for a model
BUNDLED_READER = "reader"
Compositions = Literal["any", "seen"]


@dataclass(frozen=True)
class ReaderConfig:
    """Architecture: conv blocks (3×3 conv, batch norm, ReLU, 2×2 max-pool), then two linears."""

    channels: tuple[int, ...] = (8, 16, 32, 64)  # 60 → 30 → 15 → 7 → 3 pixels; ~110k weights
    features: int = 128  # F, the penultimate layer (retrieval features)
    dropout: float = 0.2
    image_size: int = 60

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or min(self.channels) < 1 or self.features < 1:
            raise ValueError(f"channels and features must be positive, got {self.channels}, "
                             f"{self.features}")
        if self.image_size >> len(self.channels) < 1:
            raise ValueError(f"{len(self.channels)} pooling blocks shrink a {self.image_size}-pixel "
                             "image to nothing")


@dataclass(frozen=True)
class ReaderTrainConfig:
    """How the reader is trained (AdamW, cosine decay, fresh scenes every step)."""

    steps: int = 10000  # ~15 min on one CPU thread
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    compositions: Compositions = "any"  # see the module docstring
    seed: int = 0
    log_every: int = 200

    def __post_init__(self) -> None:
        allowed = typing.get_args(Compositions)
        if self.compositions not in allowed:
            raise ValueError(f"compositions={self.compositions!r}; choose one of {allowed}")
        for name in ("steps", "batch_size", "lr", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ImageReader(nn.Module):
    """(B, 1, 60, 60) scenes in [0, 1] → (B, 8, 11) logits: the digit at each place, or empty."""

    def __init__(self, config: ReaderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ReaderConfig()
        blocks, c_in = [], 1
        for c_out in cfg.channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.conv = nn.Sequential(*blocks)
        side = cfg.image_size >> len(cfg.channels)
        self.fc = nn.Linear(c_in * side * side, cfg.features)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.features, len(PLACES) * NUM_CLASSES)

    def features(self, images: Tensor) -> Tensor:
        """(B, 1, H, W) → (B, F) penultimate features (after ReLU)."""
        return F.relu(self.fc(self.conv(images).flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        logits = self.head(self.dropout(self.features(images)))  # (B, P·K)
        return logits.view(-1, len(PLACES), NUM_CLASSES)  # (B, P, K)


def layout_targets(layouts: np.ndarray | Tensor) -> Tensor:
    """(B, 8) layouts with -1 for empty → (B, 8) class indices with 10 for empty."""
    layouts = torch.as_tensor(layouts)
    return torch.where(layouts < 0, torch.full_like(layouts, EMPTY), layouts)


@torch.no_grad()
def _in_batches(reader: ImageReader, fn, images: Tensor | np.ndarray, batch_size: int) -> Tensor:
    """``fn(images[i:i+batch_size])`` on the reader's device in eval mode, concatenated on the CPU."""
    was_training = reader.training
    reader.eval()
    device = next(reader.parameters()).device
    images = torch.as_tensor(images)
    try:
        return torch.cat([fn(images[i:i + batch_size].to(device, torch.float32)).cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        reader.train(was_training)


def read_layouts(reader: ImageReader, images: Tensor | np.ndarray, batch_size: int = 500) -> Tensor:
    """The layout the reader sees in each image: (B, 8) long, -1 where a place is empty."""
    pred = _in_batches(reader, lambda x: reader(x).argmax(-1), images, batch_size)  # (B, 8)
    return torch.where(pred == EMPTY, torch.full_like(pred, -1), pred)


def read_features(reader: ImageReader, images: Tensor | np.ndarray, batch_size: int = 500) -> Tensor:
    """(B, F) penultimate features of ``images`` (eval mode), on the CPU."""
    return _in_batches(reader, reader.features, images, batch_size)


def layout_accuracy(predicted: Tensor, layouts: Tensor | np.ndarray, held_out: Tensor | np.ndarray,
                    ) -> dict[str, dict[str, float]]:
    """Exact-match (all 8 places right) and per-place accuracy in %, for all / seen / held-out.

    predicted, layouts: (n, 8) with -1 for empty. held_out: (n,) bool.
    """
    layouts, held = torch.as_tensor(layouts), torch.as_tensor(held_out, dtype=torch.bool)
    right = predicted == layouts  # (n, 8)
    out = {}
    for group, mask in (("all", torch.ones_like(held)), ("seen", ~held), ("held_out", held)):
        n = int(mask.sum())
        out[group] = {"count": n,
                      "exact": 100.0 * right[mask].all(1).double().mean().item() if n else math.nan,
                      "places": 100.0 * right[mask].double().mean().item() if n else math.nan}
    return out


def evaluate_reader(reader: ImageReader, scenes: Scenes,
                    batch_size: int = 500) -> dict[str, dict[str, float]]:
    """The reader's accuracy on real scenes (see :func:`layout_accuracy`)."""
    return layout_accuracy(read_layouts(reader, scenes.images, batch_size), scenes.layouts,
                           scenes.held_out)


# ------------------------------------------------------------------------------ training
class _SceneStream:
    """Fresh training scenes, one chunk of ``train_scenes_per_epoch`` at a time, seeded."""

    def __init__(self, data: CaptionedMnist, mode: Compositions, seed: int) -> None:
        self.data, self.mode, self.seed = data, mode, seed

    def chunk(self, index: int) -> Scenes:
        if self.mode == "seen":
            return self.data.train_epoch(index)
        # The generative model's training digit pool (validation and test digits stay unseen).
        # CaptionedMnist has no public accessor for it yet, hence the private attribute.
        digits, labels = self.data.training_digits
        cfg = self.data.config
        rng = np.random.default_rng([self.seed, 7, index])
        return make_scenes(digits, labels, cfg.train_scenes_per_epoch, rng, cfg.held_out, mode="any")


def train_reader(out_dir: str | os.PathLike | None, config: ReaderConfig | None = None,
                 train: ReaderTrainConfig | None = None, *, data: CaptionedMnist | None = None,
                 mnist_source: str | os.PathLike | None = None, threads: int | None = None,
                 device: str | torch.device = "cpu",
                 command: str | None = None) -> tuple[ImageReader, dict[str, Any]]:
    """Train a reader on fresh captioned-MNIST training scenes, test it and save it to ``out_dir``.

    Args:
        out_dir: where to save (``config.json`` + ``model.safetensors`` + README.md); None: don't.
        data: the scene source (default: real MNIST from ``mnist_source``, default settings).
        threads: torch intra-op threads (1 is polite on a shared machine).
        command: the command line, recorded in the saved card.

    Returns:
        The reader (eval mode) and its test metrics ({group: {count, exact, places}}).
    """
    config, train = config or ReaderConfig(), train or ReaderTrainConfig()
    if threads is not None:
        torch.set_num_threads(threads)
    data = data or CaptionedMnist(source=mnist_source)
    torch.manual_seed(train.seed)
    reader = ImageReader(config).to(device)
    opt = torch.optim.AdamW(reader.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps,
                                                pct_start=0.1)
    batches = _batches(_SceneStream(data, train.compositions, train.seed), train.batch_size,
                       np.random.default_rng([train.seed, 11]))
    start = time.time()
    reader.train()
    for step in range(1, train.steps + 1):
        scenes = next(batches)
        images = torch.from_numpy(scenes.images).to(device)  # (B, 1, H, W)
        targets = layout_targets(scenes.layouts).to(device)  # (B, P)
        loss = F.cross_entropy(reader(images).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % train.log_every == 0 or step == train.steps:
            log.info("reader step %d/%d loss %.4f (%.0f s)", step, train.steps, loss.item(),
                     time.time() - start)
    reader.eval()
    metrics = evaluate_reader(reader, data.test())
    log.info("reader exact-match on test scenes: %s", {g: round(m["exact"], 2) for g, m in metrics.items()})
    if out_dir is not None:
        save_reader(out_dir, reader, data.config, train, metrics, command)
    return reader, metrics


def _batches(stream: _SceneStream, batch_size: int, rng: np.random.Generator):
    """Endless shuffled batches (as ``Scenes``), moving to a fresh chunk when one runs out."""
    index = 0
    while True:
        scenes = stream.chunk(index)
        order = rng.permutation(len(scenes))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield scenes.subset(order[start:start + batch_size])
        index += 1


# ------------------------------------------------------------------------------ persistence
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


def save_reader(path: str | os.PathLike, reader: ImageReader,
                data: CaptionedMnistConfig | None = None, train: ReaderTrainConfig | None = None,
                metrics: dict[str, Any] | None = None, command: str | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` + a README card, atomically."""
    payload = {"kind": READER_KIND, "aligndraw_version": __version__,
               "reader": dataclasses.asdict(reader.config),
               "data": data.to_dict() if data is not None else None,
               "train": dataclasses.asdict(train) if train is not None else None,
               "test_accuracy": metrics, "command": command}

    def fill(d: Path) -> None:
        (d / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        save_file(clean_state_dict(reader.state_dict()), str(d / WEIGHTS_NAME),
                  metadata={"format": "pt", "aligndraw_version": __version__})
        (d / CARD_NAME).write_text(_card(payload))

    return write_dir_atomically(path, fill)


def _card(payload: dict[str, Any]) -> str:
    lines = ["# aligndraw image reader", "",
             "A small CNN that reads a 60×60 captioned-MNIST scene: the digit (or nothing) at each "
             "of the 8 places. Used by `aligndraw evaluate` for caption fidelity and as the "
             "feature space of retrieval shortlists. Not part of the generative model.", "",
             f"- architecture: {payload['reader']}", f"- training: {payload['train']}",
             "- training scenes: drawn fresh every step from the MNIST training digits; with "
             "compositions 'any' they include the held-out (place, digit) pairs that the generative "
             "model never sees, so that the reader judges those fairly; test digits are never used."]
    if payload.get("command"):
        lines += ["", "Command:", "", "```", payload["command"], "```"]
    if payload.get("test_accuracy"):
        lines += ["", "Accuracy on real test scenes (%, exact = all 8 places right):", "",
                  "| compositions | scenes | exact | places |", "|---|---:|---:|---:|"]
        lines += [f"| {g} | {m['count']} | {m['exact']:.2f} | {m['places']:.2f} |"
                  for g, m in payload["test_accuracy"].items()]
    return "\n".join(lines) + "\n"


def resolve_reader_dir(name_or_dir: str | os.PathLike = BUNDLED_READER) -> Path:
    """A reader directory, or the bundled reader's (``"reader"``)."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if str(name_or_dir) == BUNDLED_READER:
        return Path(str(resources.files("aligndraw") / "pretrained" / BUNDLED_READER))
    raise ValueError(f"reader {str(name_or_dir)!r} is neither a directory nor the bundled "
                     f"{BUNDLED_READER!r}; train one with `aligndraw reader train --out DIR`")


def load_reader(name_or_dir: str | os.PathLike = BUNDLED_READER,
                map_location: str | torch.device = "cpu") -> ImageReader:
    """Load a reader saved by :func:`save_reader` (eval mode); failures are ``ValueError``."""
    directory = resolve_reader_dir(name_or_dir)
    try:
        payload = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory} has no readable {CONFIG_NAME}: {err}") from err
    if payload.get("kind") != READER_KIND:
        raise ValueError(f"{directory / CONFIG_NAME} is not an image reader's config "
                         f"(kind {payload.get('kind')!r}, expected {READER_KIND!r})")
    try:
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"could not read reader weights {directory / WEIGHTS_NAME}: {err}") from err
    reader = ImageReader(ReaderConfig(**payload["reader"]))
    try:
        reader.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights in {directory} do not fit its config: "
                         f"{str(err).splitlines()[0]}") from err
    return reader.to(map_location).eval()
