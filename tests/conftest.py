"""Shared fixtures: tiny model configs (STYLE.md: hidden 8–16, T=3, 12×12 images)."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from aligndraw import allocator, gemm, openblas, step_kernels
from aligndraw.config import ModelConfig

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this PyTorch build has no oneDNN")
needs_openblas = pytest.mark.skipif(openblas.missing() is not None,
                                    reason=f"OpenBLAS products cannot be built here: {openblas.missing()}")
needs_avx2 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64")
                                or "avx2" not in gemm.cpu_flags(),
                                reason="an x86 processor with AVX2 (AVX2 kernels asked for by name)")
needs_block_cache = pytest.mark.skipif(allocator.block_cache_missing() is not None,
                                       reason=f"no block cache here: {allocator.block_cache_missing()}")
needs_step_kernels = pytest.mark.skipif(step_kernels.missing() is not None,
                                        reason=f"no step kernels here: {step_kernels.missing()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(autouse=True)
def _allocator_left_alone(monkeypatch):
    """Trainers built in tests leave the test process's allocator as it is (the setting is
    process-wide and cannot be undone); ``tests/test_allocator.py`` checks it in processes of
    its own, and a trainer test turns it back on where it checks the trainer's call."""
    monkeypatch.setenv("ALIGNDRAW_KEEP_FREED_MEMORY", "0")
    monkeypatch.delenv("ALIGNDRAW_BLOCK_CACHE", raising=False)  # the default, where a test turns it on


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """N(0, 1) values of ``shape`` from their own seeded generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``n`` torch threads within the block (ops split their work over them), as before after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=23, channels=1, height=12, width=12, steps=3, read_n=3, write_n=3,
                embed_dim=8, lang_hidden=8, align_dim=8, enc_hidden=16, dec_hidden=16, z_dim=4,
                canvas_init=-2.0)
    base.update(overrides)
    return ModelConfig(**base)


def random_batch(config: ModelConfig, batch: int = 4, max_len: int = 6, seed: int = 0):
    """Images in [0, 1], 0-padded word ids and lengths (at least one caption is full-length)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, config.channels, config.height, config.width, generator=g)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len
    tokens = torch.randint(1, config.vocab_size, (batch, max_len), generator=g)
    tokens = tokens * (torch.arange(max_len)[None, :] < lengths[:, None])
    return images, tokens, lengths


def relative_distance(got, want) -> float:
    """‖got − want‖ / ‖want‖ over lists of tensors (e.g. all gradients), each flattened."""
    flat_got, flat_want = (torch.cat([t.float().flatten() for t in ts]) for ts in (got, want))
    return float((flat_got - flat_want).norm() / flat_want.norm())


def perturbed_model(config: ModelConfig, seed: int = 0, scale: float = 0.3):
    """An ``AlignDraw`` with N(0, scale²) added to every weight: larger weights than the
    paper's init, so that every path carries signal in a comparison."""
    from aligndraw.model import AlignDraw

    torch.manual_seed(seed)
    model = AlignDraw(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture
def tiny() -> ModelConfig:
    return tiny_config()


def tiny_run_config(**train_overrides):
    """A full-size 60×60 scene config with a tiny network, for trainer and CLI tests."""
    from aligndraw.config import RunConfig, TrainConfig
    from aligndraw.data.mnist_captions import CaptionedMnistConfig

    model = tiny_config(height=60, width=60, steps=2)
    data = CaptionedMnistConfig(train_scenes_per_epoch=48, val_digits=200, val_scenes=16,
                                test_scenes=16)
    train = dict(batch_size=8, checkpoint_every=1000, log_every=1, epochs=3)
    train.update(train_overrides)
    return RunConfig(model=model, data=data, train=TrainConfig(**train), preset="tiny")


def synthetic_digits(n: int = 600, seed: int = 0):
    """Random 28×28 blobs with labels: a stand-in for MNIST in unit tests only."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = (rng.random((n, 28, 28)) > 0.7).astype(np.uint8) * 255
    return images, rng.integers(0, 10, n).astype(np.uint8)


@pytest.fixture
def synthetic_data():
    from aligndraw.data.mnist_captions import CaptionedMnist

    def make(config):
        return CaptionedMnist(config.data, train=synthetic_digits(600, 0),
                              test=synthetic_digits(200, 1))

    return make


@pytest.fixture(scope="session")
def mnist_dir():
    """The verified MNIST directory (fetched for real on first use, then cached)."""
    from aligndraw.data.mnist import ensure_mnist

    return ensure_mnist(progress=False)
