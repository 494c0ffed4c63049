"""Model directories on disk: ``config.json`` + ``model.safetensors`` + ``vocab.json`` + card.

A model directory is written into a temporary sibling first and renamed into place, so a crash
never leaves a half-written directory under the final name. Weights are safetensors (no
pickle); the optional ``trainer_state.pt`` of a training checkpoint is loaded elsewhere with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aligndraw import __version__
from aligndraw.baselines import Model, build_model
from aligndraw.config import RunConfig
from aligndraw.text import Vocabulary

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "vocab.json"
CARD_NAME = "README.md"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and make tensors contiguous CPU copies, ready to save."""
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value.detach().to("cpu").contiguous()
    return out


def write_dir_atomically(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create ``path`` by filling a temporary sibling directory and renaming it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    for item in tmp.iterdir():  # temporary-file helpers create 0600 files; use the usual mode
        item.chmod(0o666 & ~umask)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def fill_model_dir(directory: Path, model: torch.nn.Module, vocab: Vocabulary, config: RunConfig,
                   card: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write the four files of a model directory into an existing (temporary) directory."""
    payload = {"aligndraw_version": __version__, **config.to_dict(), **(extra or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    save_file(clean_state_dict(model.state_dict()), str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "aligndraw_version": __version__})
    vocab.to_json(directory / VOCAB_NAME)
    (directory / CARD_NAME).write_text(card or model_card(config))


def save_model_dir(path: str | os.PathLike, model: torch.nn.Module, vocab: Vocabulary,
                   config: RunConfig, card: str | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Save a loadable model directory atomically. Returns its path."""
    return write_dir_atomically(path, lambda d: fill_model_dir(d, model, vocab, config, card, extra))


def bundled_models() -> list[str]:
    """Names of the pretrained models shipped inside the package."""
    root = resources.files("aligndraw") / "pretrained"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()
                  and (p / VOCAB_NAME).is_file())  # the image reader has no vocabulary


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A bundled model name, a model directory, or a training run directory → model directory.

    In a run directory the best checkpoint (``best/``) is preferred over the last (``last/``).
    """
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in bundled_models():
        return Path(str(resources.files("aligndraw") / "pretrained" / str(name_or_path)))
    if not path.exists():
        bundled = ", ".join(bundled_models()) or "none yet"
        raise ValueError(f"model {str(name_or_path)!r} is neither a directory nor a bundled model "
                         f"(bundled: {bundled}); train one with `aligndraw train --out DIR`")
    for candidate in (path, path / "best", path / "last"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ValueError(f"{path} holds no {CONFIG_NAME}: expected a model directory "
                     f"({CONFIG_NAME}, {WEIGHTS_NAME}, {VOCAB_NAME}) or a run directory with best/ "
                     "or last/")


def load_model_dir(name_or_path: str | os.PathLike,
                   map_location: str | torch.device = "cpu") -> tuple[Model, Vocabulary, RunConfig]:
    """Load model, vocabulary and run config; every failure is a ``ValueError`` saying what."""
    directory = resolve_model_dir(name_or_path)
    for name in (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is missing {name}; a model directory needs "
                             f"{CONFIG_NAME}, {WEIGHTS_NAME} and {VOCAB_NAME}")
    try:
        config = RunConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise ValueError(f"{directory / CONFIG_NAME} is not a valid aligndraw config: {err}") from err
    vocab = Vocabulary.from_json(directory / VOCAB_NAME)
    model = build_model(config.model)
    try:
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"could not read weights {directory / WEIGHTS_NAME}: {err} "
                         "(the file is corrupt or not safetensors)") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights in {directory / WEIGHTS_NAME} do not fit the model in "
                         f"{CONFIG_NAME}: {str(err).splitlines()[0]}") from err
    if len(vocab) != config.model.vocab_size:
        raise ValueError(f"{VOCAB_NAME} has {len(vocab)} words but the model expects "
                         f"{config.model.vocab_size}")
    return model.to(map_location).eval(), vocab, config


def _data_line(config: RunConfig) -> str:
    data = config.data
    if getattr(data, "dataset", "mnist-captions") == "coco32":
        return (f"- data: Microsoft COCO 2014 at {data.image_size}×{data.image_size} (`aligndraw data "
                f"coco`), words seen at least {data.min_word_count} times in training")
    return f"- held-out compositions (never in training scenes): {list(data.held_out)}"


_KIND_TEXT = {
    "aligndraw": "alignDRAW",
    "noalign": "noalignDRAW (baseline: s_t = mean of the caption states, no alignment)",
    "sentvec": "sentence-vector DRAW (baseline: s_t = a frozen caption-autoencoder vector)",
    "fcvae": "fully-connected conditional VAE (baseline)",
    "convvae": "conv-deconv conditional VAE (baseline)",
}


def _architecture_lines(m: Any) -> list[str]:
    image = f"- image {m.channels}×{m.height}×{m.width}; z {m.z_dim}; vocabulary {m.vocab_size}"
    if m.model == "fcvae":
        return [image, f"- two fully connected layers of {m.vae_hidden} in encoder and decoder; "
                       f"caption BiLSTM {m.lang_hidden}×2"]
    if m.model == "convvae":
        return [image, f"- three stride-2 convolutions from {m.conv_channels} channels and their "
                       f"transposes; caption BiLSTM {m.lang_hidden}×2"]
    caption = (f"frozen sentence vector {m.sentence_dim}" if m.model == "sentvec"
               else f"caption BiLSTM {m.lang_hidden}×2")
    return [f"{image}, T = {m.steps} steps, read {m.read_n}×{m.read_n}, write {m.write_n}×{m.write_n}",
            f"- LSTMs: inference {m.enc_hidden}, generative {m.dec_hidden}; {caption}"
            + (f"; alignment {m.align_dim}" if m.model == "aligndraw" else "")]


def model_card(config: RunConfig, metrics: dict[str, Any] | None = None,
               command: str | None = None) -> str:
    """A short markdown model card describing the configuration (and metrics, if known)."""
    m = config.model
    lines = ["# aligndraw model", "",
             f"{_KIND_TEXT[m.model]} (`{m.model}`) trained with aligndraw {__version__}, "
             f"preset `{config.preset}`.", "", *_architecture_lines(m), _data_line(config)]
    if command:
        lines += ["", "Training command:", "", "```", command, "```"]
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    lines += ["", "Load with `AlignDrawPipeline.from_pretrained(DIR)`.", ""]
    return "\n".join(lines)
