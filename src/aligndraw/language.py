"""Bidirectional LSTM caption encoder: word ids → per-word states h_lang (PAPER.md).

    h_lang_j = [h→_j ; h←_j]   (size 2·D_lang)

Each caption is reversed on its own (packed sequences), so padding never changes the states of
real words — unlike the authors' code, which reversed the whole batch.

Symbols: B batch, L words (padded), E embedding size, D = D_lang per direction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class CaptionEncoder(nn.Module):
    """Embedding + bidirectional LSTM with learned initial states."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.h0 = nn.Parameter(torch.zeros(2, 1, hidden))  # (directions, 1, D), learned
        self.c0 = nn.Parameter(torch.zeros(2, 1, hidden))

    @property
    def out_dim(self) -> int:
        return 2 * self.lstm.hidden_size

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Encode captions.

        Args:
            tokens: (B, L) word ids, 0-padded. lengths: (B,) number of real words, ≥ 1.

        Returns:
            h_lang: (B, L, 2D); rows past each caption's length are zero.
        """
        b, max_len = tokens.shape
        embedded = self.embedding(tokens)  # (B, L, E)
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        state = (self.h0.expand(-1, b, -1).contiguous(), self.c0.expand(-1, b, -1).contiguous())
        out, _ = self.lstm(packed, state)
        h_lang, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)  # (B, L, 2D)
        return h_lang


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, L) boolean mask, True on real words."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
