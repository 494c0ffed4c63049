"""Tokenizer, vocabulary and batch encoding (aligndraw.text)."""

import json

import pytest
import torch

from aligndraw.text import (
    PAD,
    UNK,
    Vocabulary,
    encode_batch,
    mnist_vocabulary,
    tokenize,
)

CAPTION = "the digit 3 is at the top of the digit 1 ."


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("The digit 7 is at the TOP left.") == [
        "the", "digit", "7", "is", "at", "the", "top", "left", ".",
    ]
    assert tokenize("a stop sign,  flying!") == ["a", "stop", "sign", ",", "flying", "!"]
    assert tokenize("don't") == ["don't"]
    assert tokenize("   ") == []


def test_tokenize_rejects_non_strings():
    with pytest.raises(TypeError, match="caption must be a str"):
        tokenize(["the", "digit"])


def test_mnist_vocabulary_has_22_words_plus_padding():
    vocab = mnist_vocabulary()
    assert len(vocab) == 23
    assert vocab.words[0] == PAD and vocab.pad_id == 0
    assert len(vocab.content_words) == 22
    assert {str(d) for d in range(10)} <= set(vocab.words)
    assert vocab.unk_id is None


def test_encode_decode_round_trip():
    vocab = mnist_vocabulary()
    ids = vocab.encode(CAPTION)
    assert len(ids) == 12 and 0 not in ids
    assert vocab.decode(ids) == CAPTION
    assert vocab.decode(torch.tensor(ids + [0, 0])) == CAPTION  # padding dropped
    assert vocab.index("digit") == vocab.words.index("digit")


def test_spelled_digits_are_aliases_of_numerals():
    vocab = mnist_vocabulary()
    assert vocab.encode("The digit seven is at the top left of the image.") == vocab.encode(
        "the digit 7 is at the top left of the image ."
    )
    assert vocab.index("zero") == vocab.index("0")


def test_unknown_word_error_names_the_word_and_the_way_out():
    vocab = mnist_vocabulary()
    with pytest.raises(ValueError) as info:
        vocab.encode("the digit 3 is below the banana .")
    message = str(info.value)
    assert "'below'" in message and "'banana'" in message
    assert "22 words" in message and "--list-words" in message
    assert "the digit 3 is below the banana ." in message


def test_unknown_words_map_to_unk_when_the_vocabulary_has_one():
    vocab = Vocabulary(words=(PAD, UNK, "a", "cat"))
    assert vocab.encode("a dog") == [2, 1]
    assert vocab.decode([2, 1]) == "a <unk>"


def test_vocabulary_validates_its_words():
    with pytest.raises(ValueError, match="padding token"):
        Vocabulary(words=("a", PAD))
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(words=(PAD, "a", "a"))
    with pytest.raises(ValueError, match="aliases"):
        Vocabulary(words=(PAD, "a"), aliases={"b": "c"})
    with pytest.raises(ValueError, match="out of range"):
        mnist_vocabulary().decode([99])


def test_encode_batch_pads_with_zero():
    vocab = mnist_vocabulary()
    captions = ["the digit 7 .", CAPTION, "digit"]
    tokens, lengths = encode_batch(vocab, captions, max_len=20)
    assert tokens.dtype == torch.long and lengths.dtype == torch.long
    assert tokens.shape == (3, 12)
    assert lengths.tolist() == [4, 12, 1]
    for row, n, caption in zip(tokens, lengths, captions, strict=True):
        assert (row[n:] == 0).all() and (row[:n] != 0).all()
        assert vocab.decode(row) == caption


def test_encode_batch_rejects_empty_and_over_long_captions():
    vocab = mnist_vocabulary()
    with pytest.raises(ValueError, match="at least one word"):
        encode_batch(vocab, [CAPTION, "  "], max_len=None)
    with pytest.raises(ValueError, match=r"12 tokens.*limit of 8"):
        encode_batch(vocab, [CAPTION], max_len=8)
    with pytest.raises(ValueError, match="at least one caption"):
        encode_batch(vocab, [], max_len=None)
    with pytest.raises(TypeError, match="single str"):
        encode_batch(vocab, CAPTION, max_len=None)


def test_json_round_trip_is_atomic(tmp_path):
    vocab = mnist_vocabulary()
    path = tmp_path / "vocab.json"
    vocab.to_json(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json"]  # no temp file left
    loaded = Vocabulary.from_json(path)
    assert loaded == vocab
    assert loaded.aliases == vocab.aliases
    assert loaded.encode("the digit seven .") == vocab.encode("the digit 7 .")
    assert json.loads(path.read_text())["words"][0] == PAD
