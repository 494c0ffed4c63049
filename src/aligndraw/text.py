"""Caption tokenizer and vocabulary.

alignDRAW reads a caption as a sequence of word ids y = (y_1, ..., y_L) that the bidirectional
caption encoder embeds (Mansimov et al. 2016, https://arxiv.org/abs/1511.02793, sec. 3.1). This
module turns text into those ids and back:

- :func:`tokenize` lower-cases and splits punctuation off words ("top." -> "top", ".").
- :class:`Vocabulary` maps tokens to ids. Id 0 is always the padding token ``<pad>``, so a
  padded batch can be masked with ``tokens != 0``. An optional ``<unk>`` token (COCO) absorbs
  unknown words; without it an unknown word is a ``ValueError`` that names the word.
- :func:`mnist_vocabulary` is the 22-word captioned-MNIST vocabulary; spelled digit names from
  the paper's figures ("seven") are aliases of the numerals the captions use ("7").
- :func:`encode_batch` pads a list of captions into a ``(B, L)`` id tensor plus lengths.

Symbols: B captions in a batch, L words in the longest caption of the batch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PAD = "<pad>"
UNK = "<unk>"

# A token is a run of letters/digits (keeping inner apostrophes: "don't"), or any single
# other non-space character, so punctuation becomes its own token.
_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")

MNIST_WORDS = (
    "the", "digit", "is", "on", "left", "of", "right", "at", "top", "bottom", "image", ".",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)
SPELLED_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def tokenize(caption: str) -> list[str]:
    """Lower-case ``caption`` and split it into word and punctuation tokens.

    Example: ``"The digit 7 is at the top."`` -> ``["the", "digit", "7", "is", "at", "the",
    "top", "."]``.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
    return _TOKEN_RE.findall(caption.lower())


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id table. ``words[0]`` is ``<pad>``; ``<unk>``, if present, absorbs unknowns.

    Args:
        words: the tokens, in id order.
        aliases: extra spellings mapped onto a word of ``words`` (``{"seven": "7"}``).
    """

    words: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict, hash=False)
    _ids: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        words = tuple(self.words)
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "aliases", dict(self.aliases))
        if not words or words[0] != PAD:
            raise ValueError(f"words[0] must be the padding token {PAD!r}, got {words[:1]}")
        duplicates = sorted(w for w, n in Counter(words).items() if n > 1)  # linear: COCO has 25k
        if duplicates:
            raise ValueError(f"duplicate words in vocabulary: {duplicates}")
        bad = {a: w for a, w in self.aliases.items() if w not in words or a in words}
        if bad:
            raise ValueError(
                f"aliases must map a new spelling onto a vocabulary word; bad entries: {bad}"
            )
        object.__setattr__(self, "_ids", {w: i for i, w in enumerate(words)})

    def __len__(self) -> int:
        """Number of ids, padding (and ``<unk>``) included: the embedding table size."""
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int | None:
        return self._ids.get(UNK)

    @property
    def content_words(self) -> tuple[str, ...]:
        """The words a caption may use (no ``<pad>``/``<unk>``)."""
        return tuple(w for w in self.words if w not in (PAD, UNK))

    def unknown_words(self, caption: str) -> list[str]:
        """The caption's tokens that are not vocabulary words (aliases resolved), in order,
        without repeats. With ``<unk>`` they would be encoded as ``<unk>``; without, refused."""
        tokens = [self.aliases.get(t, t) for t in tokenize(caption)]
        return list(dict.fromkeys(t for t in tokens if t not in self._ids or t in (PAD, UNK)))

    def index(self, word: str) -> int:
        """Id of ``word`` (aliases resolved); ``ValueError`` if unknown and there is no unk."""
        return self.encode_tokens([word])[0]

    def encode_tokens(self, tokens: Sequence[str], caption: str | None = None) -> list[int]:
        """Ids of already tokenized words; ``caption`` is only used in the error message."""
        tokens = [self.aliases.get(t, t) for t in tokens]
        unknown = [t for t in tokens if t not in self._ids or t in (PAD, UNK)]
        if unknown and self.unk_id is None:
            shown = ", ".join(repr(t) for t in dict.fromkeys(unknown))
            where = f" in caption {caption!r}" if caption is not None else ""
            raise ValueError(
                f"unknown word{'s' if len(set(unknown)) > 1 else ''} {shown}{where}; "
                f"the model knows {len(self.content_words)} words: see "
                "`aligndraw generate --list-words` or pipe.vocab.words"
            )
        unk = self.unk_id
        return [unk if t in unknown else self._ids[t] for t in tokens]

    def encode(self, caption: str) -> list[int]:
        """Token ids of ``caption`` (no padding). ``[]`` for a caption without words."""
        return self.encode_tokens(tokenize(caption), caption)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Caption text of ``ids``, padding dropped (tokens joined by single spaces)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if not 0 <= int(i) < len(self.words)]
        if bad:
            raise ValueError(f"ids {bad} out of range for a vocabulary of {len(self)} ids")
        return " ".join(self.words[int(i)] for i in ids if int(i) != self.pad_id)

    def to_dict(self) -> dict:
        return {"words": list(self.words), "aliases": dict(self.aliases)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Vocabulary:
        return cls(words=tuple(data["words"]), aliases=dict(data.get("aliases", {})))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``vocab.json`` atomically (temp file in the same dir, then ``os.replace``)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Vocabulary:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def mnist_vocabulary() -> Vocabulary:
    """The captioned-MNIST vocabulary: ``<pad>`` + 22 words, with "zero".."nine" aliases."""
    aliases = {name: str(d) for d, name in enumerate(SPELLED_DIGITS)}
    return Vocabulary(words=(PAD, *MNIST_WORDS), aliases=aliases)


def encode_batch(
    vocab: Vocabulary, captions: Sequence[str], max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and right-pad ``captions`` with ``vocab.pad_id``.

    Args:
        vocab: the vocabulary.
        captions: B caption strings.
        max_len: longest allowed caption in tokens (``None``: no limit).

    Returns:
        ``tokens`` (B, L) long, padded with 0, L = longest caption in the batch, and
        ``lengths`` (B,) long, the number of real tokens of each caption.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, got a single str; wrap it in [...]")
    if len(captions) == 0:
        raise ValueError("captions is empty: pass at least one caption")
    encoded = [vocab.encode(c) for c in captions]
    for caption, ids in zip(captions, encoded, strict=True):
        if not ids:
            raise ValueError(f"captions must contain at least one word, got {caption!r}")
        if max_len is not None and len(ids) > max_len:
            raise ValueError(
                f"caption has {len(ids)} tokens, more than the limit of {max_len}: {caption!r}"
            )
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)  # (B,)
    tokens = np.full((len(encoded), lengths.max()), vocab.pad_id, dtype=np.int64)  # (B, L)
    for b, ids in enumerate(encoded):
        tokens[b, : len(ids)] = ids
    return torch.from_numpy(tokens), torch.from_numpy(lengths)
