"""Fixed sentence vectors for the sentence-vector DRAW baseline (``--model sentvec``).

The paper's skipthoughtDRAW conditions DRAW on a pre-trained skip-thought vector of the
caption. Skip-thought weights cannot be obtained here and captioned MNIST has no neighbouring
sentences to predict, so the substitute is a caption autoencoder trained on the training
captions alone: a GRU reads the caption into one vector v, a second GRU started from v must
spell the caption back (teacher forcing, cross-entropy). After training the encoder is frozen
and v is the caption's only representation in the model.

To fit the per-word interface of :class:`aligndraw.language.CaptionEncoder`,
``SentenceVectorEncoder`` returns v at every real word (zeros past the caption): the mean over
words — what the noalign context computes — is then exactly v.

Symbols: B batch, L words, E embedding size, D sentence-vector size, V vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from aligndraw.language import padding_mask
from aligndraw.text import Vocabulary, encode_batch

EMBED_DIM = 128


class SentenceVectorEncoder(nn.Module):
    """Embedding + GRU; the last hidden state is the sentence vector v."""

    def __init__(self, vocab_size: int, dim: int, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.gru = nn.GRU(embed_dim, dim, batch_first=True)

    @property
    def out_dim(self) -> int:
        return self.gru.hidden_size

    def vectors(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, L) word ids, (B,) lengths → (B, D) sentence vectors."""
        packed = pack_padded_sequence(self.embedding(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h_last = self.gru(packed)  # (1, B, D), at each caption's last real word
        return h_last[0]

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, L) word ids, (B,) lengths → (B, L, D): v at real words, 0 past each caption."""
        v = self.vectors(tokens, lengths)  # (B, D)
        mask = padding_mask(lengths, tokens.shape[1])  # (B, L)
        return v[:, None, :] * mask[..., None].to(v.dtype)  # (B, L, D)


class CaptionAutoencoder(nn.Module):
    """``SentenceVectorEncoder`` plus a GRU decoder that spells the caption back from v."""

    def __init__(self, vocab_size: int, dim: int, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.encoder = SentenceVectorEncoder(vocab_size, dim, embed_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.gru = nn.GRU(embed_dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab_size)

    def logits(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Teacher-forced next-word logits (B, L, V); the first input is the padding id."""
        v = self.encoder.vectors(tokens, lengths)  # (B, D)
        inputs = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)  # (B, L)
        states, _ = self.gru(self.embedding(inputs), v[None].contiguous())  # (B, L, D)
        return self.out(states)

    def loss(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Mean cross-entropy per real word."""
        mask = padding_mask(lengths, tokens.shape[1])
        return nn.functional.cross_entropy(self.logits(tokens, lengths)[mask], tokens[mask])

    @torch.no_grad()
    def reconstruct(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Greedy decoding of ``lengths`` words from v alone: (B, L) word ids, 0 past lengths."""
        v = self.encoder.vectors(tokens, lengths)
        state, word = v[None].contiguous(), torch.zeros_like(tokens[:, :1])  # (1, B, D), (B, 1)
        out = []
        for _ in range(tokens.shape[1]):
            h, state = self.gru(self.embedding(word), state)  # (B, 1, D)
            word = self.out(h).argmax(-1)  # (B, 1)
            out.append(word)
        return torch.cat(out, 1) * padding_mask(lengths, tokens.shape[1])


def reconstruction_accuracy(model: CaptionAutoencoder, vocab: Vocabulary,
                            captions: Sequence[str]) -> float:
    """Share of ``captions`` spelled back exactly from their sentence vector."""
    tokens, lengths = encode_batch(vocab, list(captions))
    return (model.reconstruct(tokens, lengths) == tokens).all(1).double().mean().item()


def train_sentence_encoder(captions: Sequence[str], vocab: Vocabulary, dim: int, *, steps: int,
                           seed: int = 0, batch_size: int = 100, lr: float = 3e-3,
                           check: dict[str, Sequence[str]] | None = None
                           ) -> tuple[SentenceVectorEncoder, dict[str, float]]:
    """Train a caption autoencoder on ``captions`` and return its frozen encoder.

    Args:
        captions: training captions (the held-out compositions are not among them).
        vocab: the model's vocabulary. dim: D, the sentence-vector size. steps: Adam steps.
        seed: initialisation and batch order (the global random state is left untouched).
        check: named caption lists whose exact-reconstruction accuracy is reported.

    Returns:
        The encoder (eval mode, ``requires_grad`` off) and {"loss": last loss,
        "accuracy_<name>": exact reconstruction share for each ``check`` list}.
    """
    if steps < 1 or not captions:
        raise ValueError(f"training a sentence encoder needs steps >= 1 and captions, got "
                         f"steps={steps} and {len(captions)} captions")
    tokens, lengths = encode_batch(vocab, list(captions))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CaptionAutoencoder(len(vocab), dim)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            idx = torch.randint(len(tokens), (batch_size,), generator=g)
            width = int(lengths[idx].max())
            loss = model.loss(tokens[idx, :width], lengths[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    metrics = {"loss": loss.item()}
    for name, texts in (check or {}).items():
        metrics[f"accuracy_{name}"] = reconstruction_accuracy(model, vocab, texts)
    encoder = model.encoder.requires_grad_(False)
    return encoder, metrics
