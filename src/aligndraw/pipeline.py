"""Inference pipeline: captions in, images out (in the style of diffusers pipelines).

    pipe = AlignDrawPipeline.from_pretrained("mnist-captions")   # bundled name or directory
    out = pipe(["the digit 3 is at the top of the digit 1 ."], num_images_per_caption=4,
               generator=torch.Generator().manual_seed(0), output_type="pil")

The pipeline only validates input, tokenises, batches and converts outputs; the recurrence
lives in ``AlignDraw.sample``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from aligndraw.baselines import Model
from aligndraw.checkpoint import load_model_dir, model_card, save_model_dir
from aligndraw.config import RunConfig
from aligndraw.model import DrawSample
from aligndraw.text import UNK, Vocabulary, encode_batch, tokenize

OutputType = Literal["pil", "np", "pt"]
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt")
MAX_IMAGES_PER_CAPTION = 256


@dataclass
class AlignDrawPipelineOutput:
    """Generated images and how they were drawn; B = captions × images per caption.

    images: list of B PIL images, or (B, C, H, W) array/tensor for "np"/"pt".
    canvases: (B, T+1, C, H, W) canvas after each step, in [0, 1].
    alignments: (B, T, L) attention over each caption's words at each step.
    write_windows: (B, T, 4) write-attention box (x0, y0, x1, y1) in pixels per step.
    captions: B captions, one per image. words: B token lists (the alignment's L axis).
    """

    images: Any
    canvases: Any
    alignments: Any
    write_windows: Any
    captions: list[str]
    words: list[list[str]]


class AlignDrawPipeline:
    """A trained alignDRAW model plus its vocabulary, ready to draw captions."""

    def __init__(self, model: Model, vocab: Vocabulary, config: RunConfig | None = None) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.config = config or RunConfig(model=model.config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "mnist-captions",
                        device: str | torch.device = "cpu") -> AlignDrawPipeline:
        """Load a bundled model by name, a model directory, or a run directory (best/last)."""
        model, vocab, config = load_model_dir(name_or_path, map_location=device)
        return cls(model, vocab, config)

    def save_pretrained(self, path: str | os.PathLike, card: str | None = None) -> None:
        """Write config.json, model.safetensors, vocab.json and README.md (atomically)."""
        save_model_dir(path, self.model, self.vocab, self.config, card or model_card(self.config))

    def to(self, device: str | torch.device) -> AlignDrawPipeline:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def held_out(self) -> tuple:
        """(place, digit) compositions kept out of this model's training scenes (MNIST; COCO: ())."""
        return tuple(getattr(self.config.data, "held_out", ()))

    def is_held_out(self, caption: str) -> bool | None:
        """Is this a captioned-MNIST caption whose composition was held out of training?

        None when the caption is not in the captioned-MNIST grammar (nothing can be said).
        """
        from aligndraw.data.mnist_captions import held_out_matrix, layout_held_out, parse_caption

        try:
            layout = parse_caption(caption).layout
        except ValueError:
            return None
        return bool(layout_held_out(layout[None], held_out_matrix(self.held_out))[0])

    def check_inputs(self, prompt: str | list[str], num_images_per_caption: int,
                     output_type: str, allow_unknown: bool = False) -> list[str]:
        """Validate before any compute; raises ``ValueError`` naming what is wrong.

        Words outside the vocabulary are an error naming them. A vocabulary with ``<unk>``
        (COCO) can draw them as ``<unk>`` instead, as the paper's model would, but only when
        asked (``allow_unknown``): silently dropping a word changes what is drawn.
        """
        captions = [prompt] if isinstance(prompt, str) else list(prompt)
        if not captions:
            raise ValueError("no captions given; pass a caption string or a list of them")
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be strings")
        if not 1 <= num_images_per_caption <= MAX_IMAGES_PER_CAPTION:
            raise ValueError(f"num_images_per_caption must be between 1 and "
                             f"{MAX_IMAGES_PER_CAPTION}, got {num_images_per_caption}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not allowed; choose one of "
                             f"{', '.join(OUTPUT_TYPES)}")
        if self.vocab.unk_id is not None and not allow_unknown:
            for caption in captions:
                unknown = self.vocab.unknown_words(caption)
                if unknown:
                    shown = ", ".join(repr(w) for w in unknown)
                    raise ValueError(
                        f"unknown word{'s' if len(unknown) > 1 else ''} {shown} in caption "
                        f"{caption!r}: not among the {len(self.vocab.content_words)} words this "
                        "model was trained on (see `aligndraw generate --list-words` or "
                        "pipe.vocab.words); pass allow_unknown=True (CLI: --allow-unknown) to "
                        f"draw {'them' if len(unknown) > 1 else 'it'} as {UNK}")
        encode_batch(self.vocab, captions, self.config.model.max_caption_len)  # raises on bad words
        return captions

    def unknown_words(self, prompt: str | list[str]) -> list[str]:
        """Words of the caption(s) outside the vocabulary (drawn as ``<unk>`` if allowed)."""
        captions = [prompt] if isinstance(prompt, str) else list(prompt)
        return list(dict.fromkeys(w for c in captions for w in self.vocab.unknown_words(c)))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_images_per_caption: int = 1,
                 generator: torch.Generator | None = None, output_type: OutputType = "pil",
                 batch_size: int = 256, allow_unknown: bool = False,
                 temperature: float = 1.0) -> AlignDrawPipelineOutput:
        """Draw ``num_images_per_caption`` images for every caption.

        Args:
            prompt: one caption or a list of captions.
            num_images_per_caption: samples per caption.
            generator: source of all randomness; the same seed gives the same images.
            output_type: "pil" (list of images), "np" or "pt" ((B, C, H, W) in [0, 1]).
            batch_size: images drawn per forward pass (memory bound, not a result change).
            allow_unknown: draw words outside the vocabulary as ``<unk>`` (vocabularies that
                have it, e.g. COCO) instead of raising ``ValueError``.
            temperature: scales the prior's standard deviation, z = μ + τ·σ·ε (1: the paper's
                sampling; lower: cleaner, less varied images; 0: the prior mean).
        """
        captions = self.check_inputs(prompt, num_images_per_caption, output_type, allow_unknown)
        repeated = [c for c in captions for _ in range(num_images_per_caption)]
        tokens, lengths = encode_batch(self.vocab, repeated, self.config.model.max_caption_len)
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        noise = self._noise(len(repeated), generator)
        parts = [self.model.sample(tokens[i:i + batch_size], lengths[i:i + batch_size],
                                   noise=noise[i:i + batch_size], temperature=temperature)
                 for i in range(0, len(repeated), batch_size)]
        sample = DrawSample(*(torch.cat([getattr(p, f) for p in parts])
                              for f in ("images", "canvases", "alignments", "write_windows")))
        return self._output(sample, repeated, output_type)

    def _noise(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        # Drawn up front for all images so that results do not depend on batch_size.
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.model.noise_shape(n), generator=generator, device=device)
        return noise.to(self.device)

    def _output(self, sample: DrawSample, captions: list[str],
                output_type: OutputType) -> AlignDrawPipelineOutput:
        fields = {"canvases": sample.canvases, "alignments": sample.alignments,
                  "write_windows": sample.write_windows}
        if output_type == "pt":
            images: Any = sample.images.cpu()
            fields = {k: v.cpu() for k, v in fields.items()}
        else:
            images = sample.images.float().cpu().numpy()
            fields = {k: v.float().cpu().numpy() for k, v in fields.items()}
            if output_type == "pil":
                images = [to_pil(img) for img in images]
        words = [tokenize(c) for c in captions]
        return AlignDrawPipelineOutput(images=images, captions=captions, words=words, **fields)


def to_pil(image: np.ndarray) -> Image.Image:
    """(C, H, W) float in [0, 1] → PIL image (L for one channel, RGB for three)."""
    arr = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], mode="L")
    return Image.fromarray(arr.transpose(1, 2, 0), mode="RGB")
