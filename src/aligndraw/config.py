"""Frozen, typed configuration for the model and its training, plus named presets.

Defaults follow the paper's captioned-MNIST configuration (PAPER.md, "Hyper-parameters").
Every config saves to and loads from plain JSON dictionaries; ``RunConfig`` bundles the three
parts (model, data, training) that a trained model directory records in ``config.json``.
The data part is a ``CaptionedMnistConfig`` or a ``CocoConfig``, told apart by its ``dataset``
key ("mnist-captions" or "coco32"; configs saved before COCO existed have none: MNIST).
Overrides use dotted keys, e.g. ``model.enc_hidden=64`` or ``train.batch_size=32``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from aligndraw.data.coco import CocoConfig
from aligndraw.data.mnist_captions import CaptionedMnistConfig

ModelKind = Literal["aligndraw", "noalign", "sentvec", "fcvae", "convvae"]
MODEL_KINDS: tuple[str, ...] = typing.get_args(ModelKind)
OptimizerKind = Literal["rmsprop", "adam"]
PrecisionKind = Literal["fp32", "bf16"]
DataConfig = CaptionedMnistConfig | CocoConfig
DATA_CONFIGS: dict[str, type] = {"mnist-captions": CaptionedMnistConfig, "coco32": CocoConfig}


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _check_positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """alignDRAW architecture (PAPER.md symbols in comments)."""

    # Baselines (PAPER.md, "Baselines"; aligndraw.baselines): "noalign" s_t = mean of h_lang;
    # "sentvec" s_t = a frozen, separately trained sentence vector; "fcvae" / "convvae" one-shot
    # conditional VAEs (fully connected / conv-deconv) on the mean of h_lang.
    model: ModelKind = "aligndraw"
    vocab_size: int = 23  # 22 captioned-MNIST words + padding
    channels: int = 1  # C
    height: int = 60  # H
    width: int = 60  # W
    steps: int = 32  # T drawing steps
    read_n: int = 8  # N, read grid
    write_n: int = 8  # M, write grid
    embed_dim: int = 512  # the authors feed one-hot words: an embedding of 4·D_lang
    lang_hidden: int = 128  # D_lang per direction; h_lang has 2·D_lang
    align_dim: int = 512  # size of U h_lang + W h_dec
    enc_hidden: int = 300  # inference LSTM
    dec_hidden: int = 300  # generative LSTM
    z_dim: int = 150  # Z
    canvas_init: float = -10.0  # c_0 starts black (σ(-10) ≈ 0); 0 for COCO
    init_std: float = 0.01  # weights ~ N(0, 0.01²), biases 0 (authors' code)
    filter_eps: float = 1e-4  # filterbank row normalisation (authors' code)
    max_caption_len: int = 32  # longest caption the pipeline accepts
    sentence_dim: int = 256  # sentvec: size of the frozen sentence vector
    vae_hidden: int = 300  # fcvae: units per hidden layer (3.4M parameters; alignDRAW: 2.9M)
    conv_channels: int = 16  # convvae: first conv layer's channels, doubled per layer (3.1M)

    def __post_init__(self) -> None:
        _check_choice("model", self.model, typing.get_args(ModelKind))
        _check_positive(self, ("vocab_size", "channels", "height", "width", "steps", "embed_dim",
                               "lang_hidden", "align_dim", "enc_hidden", "dec_hidden", "z_dim",
                               "init_std", "filter_eps", "max_caption_len", "sentence_dim",
                               "vae_hidden", "conv_channels"))
        for name in ("read_n", "write_n"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2 (a grid of filters), got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. Defaults: the authors' RMSProp recipe (PAPER.md)."""

    batch_size: int = 100  # global batch; split across data-parallel ranks
    lr: float = 1e-3
    optimizer: OptimizerKind = "rmsprop"  # RMSProp converged faster than Adam (authors)
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1e-6  # inside the square root, as in the authors' code
    clip_norm: float = 10.0  # per parameter tensor, not global
    epochs: int = 150
    lr_decay: float = 0.1  # lr ← lr·0.1 when the validation bound stops improving
    lr_patience: int = 2  # epochs without improvement before decaying
    lr_hold_epochs: int = 10  # no decay before this epoch (the bundled model first decayed at 36)
    min_lr: float = 1e-5
    precision: PrecisionKind = "fp32"  # bf16 autocast is an option for speed
    compile: bool = False  # torch.compile the training forward (the first steps pay compile time)
    checkpoint_every: int = 500  # optimizer steps between checkpoints
    log_every: int = 20  # steps between metrics.jsonl lines
    val_batches: int | None = None  # None: the whole validation set
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    sentence_steps: int = 1500  # sentvec: caption-autoencoder steps before the model trains

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, typing.get_args(OptimizerKind))
        _check_choice("precision", self.precision, typing.get_args(PrecisionKind))
        _check_positive(self, ("batch_size", "lr", "clip_norm", "epochs", "lr_decay",
                               "checkpoint_every", "log_every", "min_lr", "sentence_steps"))


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved as ``config.json`` beside the weights."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=CaptionedMnistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "mnist-captions"

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "model": dataclasses.asdict(self.model),
            "data": self.data.to_dict(),
            "train": dataclasses.asdict(self.train),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(
            model=_from_fields(ModelConfig, d.get("model", {})),
            data=data_config_from_dict(d.get("data", {})),
            train=_from_fields(TrainConfig, d.get("train", {})),
            preset=d.get("preset", "custom"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def data_config_from_dict(d: dict[str, Any]) -> DataConfig:
    """The data config a dict describes, by its ``dataset`` key (absent: captioned MNIST)."""
    name = d.get("dataset", "mnist-captions")
    if name not in DATA_CONFIGS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATA_CONFIGS)}")
    return DATA_CONFIGS[name].from_dict(d)


def _from_fields(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**d)


# Each preset: model and train fields, and optionally the data config ({"dataset": ...}).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's captioned-MNIST configuration.
    "mnist-captions": {"model": {}, "train": {}},
    # A small, fast configuration for demos and smoke runs on a laptop (minutes, not hours).
    "mnist-captions-small": {
        "model": {"steps": 16, "embed_dim": 64, "lang_hidden": 64, "align_dim": 128,
                  "enc_hidden": 128, "dec_hidden": 128, "z_dim": 32},
        "train": {"batch_size": 64, "checkpoint_every": 200},
    },
    # The paper's COCO 32×32 configuration on the arrays of `aligndraw data coco`. The
    # vocabulary size is the paper's 25,323 words + <pad> + <unk>; training replaces it with
    # the size of the prepared vocab.json.
    "coco32": {
        "model": {"channels": 3, "height": 32, "width": 32, "read_n": 9, "write_n": 9,
                  "enc_hidden": 550, "dec_hidden": 550, "z_dim": 275, "canvas_init": 0.0,
                  "vocab_size": 25325},
        "data": {"dataset": "coco32"},
        "train": {"epochs": 18},
    },
}


def preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a ``RunConfig`` from a preset name and ``section.field=value`` overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    spec = PRESETS[name]
    config = RunConfig(
        model=ModelConfig(**spec["model"]),
        data=data_config_from_dict(spec.get("data", {})),
        train=TrainConfig(**spec["train"]),
        preset=name,
    )
    return apply_overrides(config, overrides)


def apply_overrides(config: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Apply ``section.field=value`` strings (value parsed as JSON, else kept as a string)."""
    sections = {"model": config.model, "data": config.data, "train": config.train}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in sections:
            raise ValueError(f"override {item!r} must look like model.FIELD=VALUE, data.FIELD=VALUE "
                             "or train.FIELD=VALUE")
        target = sections[section]
        allowed = {f.name for f in fields(target)}
        if name not in allowed:
            raise ValueError(f"unknown {section} field {name!r} in override {item!r}; "
                             f"allowed: {', '.join(sorted(allowed))}")
        sections[section] = replace(target, **{name: _parse_value(raw)})
    return RunConfig(model=sections["model"], data=sections["data"], train=sections["train"],
                     preset=config.preset)


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
