"""Bidirectional LSTM caption encoder: word ids → per-word states h_lang (PAPER.md).

    h_lang_j = [h→_j ; h←_j]   (size 2·D_lang)

Each caption is reversed on its own, so padding never changes the states of real words —
unlike the authors' code, which reversed the whole batch. The recurrence is written out
(both directions advance together, one batched product per word) rather than run through
packed sequences, which torch.compile cannot trace. The weights keep ``nn.LSTM``'s names and
layout (``BiLstmWeights``), so checkpoints load either way.

Input gates by lookup: the input part of the gates, W_ih·E[y] + b, depends on the word alone,
so for a small vocabulary (captioned MNIST: 23 words) it is computed once per word of the
vocabulary — a (V, 4D) table — and looked up, instead of once per word of the batch.

Symbols: B batch, L words (padded), E embedding size, D = D_lang per direction, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aligndraw import gemm

SIGMOID_TANH_DTYPES = (torch.float32, torch.float64)


def takes_sigmoid_form(x: Tensor) -> bool:
    """Whether ``sigmoid_tanh`` and ``lstm_update`` take tanh as 2σ(2x) − 1 for ``x``: fp32
    or fp64 on the CPU."""
    return x.device.type == "cpu" and x.dtype in SIGMOID_TANH_DTYPES


def sigmoid_tanh(x: Tensor) -> Tensor:
    """tanh(x), any shape: as 2σ(2x) − 1 for fp32 and fp64 on the CPU, else ``torch.tanh``.

    The same function, and faster in fp32 there: PyTorch's CPU tanh took about 5× as long as
    its sigmoid on a (100, 300) fp32 tensor (``docs/performance.md``, item 31); fp64 takes the
    form too, so that the fp64 equality tests run what the library runs. Its error is a few
    roundings of fp32 values near 1 (under 2.5e-7 against fp64 in ``tests/test_language.py``),
    not relative to a small result as ``torch.tanh``'s is. In bf16 or fp16 (autocast) the
    difference 2σ − 1 would lose most of a small result's digits, and on a GPU tanh is one
    fast kernel, so those keep ``torch.tanh``.
    """
    if takes_sigmoid_form(x):
        return 2 * torch.sigmoid(2 * x) - 1
    return torch.tanh(x)


def lstm_update_tanh(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``nn.LSTMCell``'s own update formula, with ``torch.tanh``: what ``lstm_update`` runs
    where it does not take the sigmoid form. gates: (…, 4D), c: (…, D) → h, c: (…, D)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell update from pre-activations (gate order i, f, g, o as in ``nn.LSTMCell``).

    gates: (…, 4D), c: (…, D) → h, c: (…, D).

    For fp32 and fp64 on the CPU tanh(g) is 2σ(2g) − 1 (see ``sigmoid_tanh``); elsewhere
    ``lstm_update_tanh``. Eagerly σ(2g) is taken in one sigmoid with the three gates'; under
    torch.compile each gate's sigmoid is written apart, without the (4D,) vector of 1s and 2s,
    which measured faster compiled (``docs/performance.md``, item 32). The two forms are the
    same function (2·g and 1·x are exact), equal to fp32 rounding.
    """
    if gates.shape[-1] % 4:
        raise ValueError(f"an LSTM's gates need a last dimension of 4·D (i, f, g, o), "
                         f"got {tuple(gates.shape)}")
    if not takes_sigmoid_form(gates):
        return lstm_update_tanh(gates, c)
    if torch.compiler.is_compiling():
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * sigmoid_tanh(g)
        return torch.sigmoid(o) * sigmoid_tanh(c), c
    d = gates.shape[-1] // 4
    doubled = gates.new_ones(4 * d)  # (4D,): 2 on g's share, so the one sigmoid gives σ(2g)
    doubled[2 * d:3 * d] = 2
    i, f, g2, o = torch.sigmoid(gates * doubled).chunk(4, dim=-1)  # σ(2g) as g2
    c = f * c + i * (2 * g2 - 1)
    return o * sigmoid_tanh(c), c


def reverse_index(lengths: Tensor, max_len: int) -> Tensor:
    """(B, L) positions that reverse each caption's real words in place; padding stays put.

    ``tokens.gather(1, idx)`` reverses every caption on its own; the map is its own inverse.
    """
    j = torch.arange(max_len, device=lengths.device)[None, :]  # (1, L)
    return torch.where(j < lengths[:, None], lengths[:, None] - 1 - j, j)  # (B, L)


class BiLstmWeights(nn.Module):
    """The parameters of a one-layer bidirectional ``nn.LSTM``, under its names, without its
    forward (torch.compile breaks the graph at any ``nn.LSTM`` module)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        bound = hidden_size ** -0.5  # nn.LSTM's initialisation
        for suffix in ("", "_reverse"):
            for name, shape in (("weight_ih_l0", (4 * hidden_size, input_size)),
                                ("weight_hh_l0", (4 * hidden_size, hidden_size)),
                                ("bias_ih_l0", (4 * hidden_size,)), ("bias_hh_l0", (4 * hidden_size,))):
                weight = torch.empty(shape).uniform_(-bound, bound)
                self.register_parameter(name + suffix, nn.Parameter(weight))


class CaptionEncoder(nn.Module):
    """Embedding + bidirectional LSTM with learned initial states."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = BiLstmWeights(embed_dim, hidden)
        self.h0 = nn.Parameter(torch.zeros(2, 1, hidden))  # (directions, 1, D), learned
        self.c0 = nn.Parameter(torch.zeros(2, 1, hidden))

    @property
    def out_dim(self) -> int:
        return 2 * self.lstm.hidden_size

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """W_ih (2, 4D, E), W_hh (2, 4D, D), b_ih + b_hh (2, 4D); forward direction first."""
        lstm = self.lstm
        w_ih = torch.stack([lstm.weight_ih_l0, lstm.weight_ih_l0_reverse])
        w_hh = torch.stack([lstm.weight_hh_l0, lstm.weight_hh_l0_reverse])
        bias = torch.stack([lstm.bias_ih_l0 + lstm.bias_hh_l0,
                            lstm.bias_ih_l0_reverse + lstm.bias_hh_l0_reverse])
        return w_ih, w_hh, bias

    def _input_gates(self, words: Tensor, w_ih: Tensor, bias: Tensor) -> Tensor:
        """words (2, B, L) ids per direction → W_ih·E[y] + b, (2, B, L, 4D)."""
        vocab = self.embedding.num_embeddings
        if vocab <= words[0].numel():  # a table of every word is cheaper than the batch's words
            table = torch.matmul(self.embedding.weight, w_ih.transpose(1, 2)) + bias[:, None]  # (2, V, 4D)
            direction = torch.arange(2, device=words.device)[:, None, None]  # (2, 1, 1)
            return table[direction, words]  # (2, B, L, 4D)
        _, b, max_len = words.shape
        embedded = self.embedding(words).flatten(1, 2)  # (2, B·L, E)
        gates = torch.baddbmm(bias[:, None], embedded, w_ih.transpose(1, 2))  # (2, B·L, 4D)
        return gates.view(2, b, max_len, -1)  # (2, B, L, 4D)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Encode captions.

        Args:
            tokens: (B, L) word ids, 0-padded. lengths: (B,) number of real words, ≥ 1.

        Returns:
            h_lang: (B, L, 2D); rows past each caption's length are zero.
        """
        b, max_len = tokens.shape
        rev = reverse_index(lengths, max_len)  # (B, L)
        words = torch.stack([tokens, tokens.gather(1, rev)])  # (2, B, L): backward reads reversed
        w_ih, w_hh, bias = self._weights()
        x_gates = self._input_gates(words, w_ih, bias)  # (2, B, L, 4D)
        w_hh_t = w_hh.transpose(1, 2)  # (2, D, 4D)
        h, c = self.h0.expand(-1, b, -1), self.c0.expand(-1, b, -1)  # (2, B, D)
        states = []
        # one unbind, not L indexings: its backward stacks the words' gradients once, where each
        # index's backward would fill a (2, B, L, 4D) tensor of zeros and add it to the others
        x_words = x_gates.unbind(2)  # L × (2, B, 4D)
        for j in range(max_len):  # padding comes after every caption's real words in both
            h, c = lstm_update(x_words[j] + gemm.bmm(h, w_hh_t), c)  # (2, B, D)
            states.append(h)
        out = torch.stack(states, dim=2)  # (2, B, L, D)
        backward = out[1].gather(1, rev[..., None].expand(-1, -1, out.shape[-1]))  # un-reversed
        h_lang = torch.cat([out[0], backward], dim=-1)  # (B, L, 2D)
        return h_lang * padding_mask(lengths, max_len)[..., None]


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, L) boolean mask, True on real words."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
