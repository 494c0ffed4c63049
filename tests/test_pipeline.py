import json

import numpy as np
import pytest
import torch
from PIL import Image

from aligndraw import AlignDrawPipeline
from aligndraw.model import AlignDraw
from aligndraw.text import mnist_vocabulary

from conftest import tiny_run_config

CAPTION = "the digit 3 is at the top of the digit 1 ."


@pytest.fixture
def pipe():
    config = tiny_run_config()
    torch.manual_seed(0)
    model = AlignDraw(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return AlignDrawPipeline(model, mnist_vocabulary(), config)


def test_output_shapes_and_types(pipe):
    out = pipe([CAPTION, "the digit 7 is at the top left of the image ."],
               num_images_per_caption=3, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 6 and all(isinstance(i, Image.Image) for i in out.images)
    assert out.images[0].size == (60, 60)
    assert out.canvases.shape == (6, 3, 1, 60, 60)
    assert out.alignments.shape == (6, 2, 12)  # longest caption: 12 tokens
    assert out.write_windows.shape == (6, 2, 4)
    assert out.captions[:3] == [CAPTION] * 3 and out.words[0] == CAPTION.split()
    np.testing.assert_allclose(out.alignments.sum(-1), 1.0, rtol=1e-5)
    pt = pipe(CAPTION, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert isinstance(pt.images, torch.Tensor) and pt.images.shape == (1, 1, 60, 60)


def test_same_seed_same_images_independent_of_batch_size(pipe):
    a = pipe(CAPTION, num_images_per_caption=4, output_type="np",
             generator=torch.Generator().manual_seed(3))
    b = pipe(CAPTION, num_images_per_caption=4, output_type="np",
             generator=torch.Generator().manual_seed(3), batch_size=3)
    c = pipe(CAPTION, num_images_per_caption=4, output_type="np",
             generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(a.images, b.images, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.images, c.images)


def test_spelled_digits_are_accepted(pipe):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pipe("the digit three is at the top of the digit one .", output_type="np", generator=g())
    b = pipe(CAPTION, output_type="np", generator=g())
    np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize("caption, message", [
    ("the digit 3 is above the digit 1 .", "above"),
    ("", "at least one word"),
    ("the " * 40, "32"),
])
def test_bad_captions_raise_before_compute(pipe, caption, message):
    with pytest.raises(ValueError, match=message):
        pipe(caption)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="num_images_per_caption"):
        pipe(CAPTION, num_images_per_caption=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(CAPTION, output_type="jpeg")
    with pytest.raises(ValueError, match="no captions"):
        pipe([])
    with pytest.raises(ValueError, match="temperature"):
        pipe(CAPTION, temperature=-1)


def test_temperature_zero_draws_the_prior_mean_for_any_seed(pipe):
    a = pipe(CAPTION, generator=torch.Generator().manual_seed(1), output_type="pt", temperature=0)
    b = pipe(CAPTION, generator=torch.Generator().manual_seed(2), output_type="pt", temperature=0)
    torch.testing.assert_close(a.images, b.images)
    c = pipe(CAPTION, generator=torch.Generator().manual_seed(1), output_type="pt")
    d = pipe(CAPTION, generator=torch.Generator().manual_seed(2), output_type="pt")
    assert not torch.allclose(c.images, d.images)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "aligndraw_version" in config
    assert config["data"]["held_out"] == [list(p) for p in pipe.held_out]
    loaded = AlignDrawPipeline.from_pretrained(tmp_path / "m")
    assert loaded.held_out == pipe.held_out and len(loaded.held_out) == 8
    a = pipe(CAPTION, output_type="np", generator=torch.Generator().manual_seed(0))
    b = loaded(CAPTION, output_type="np", generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(a.images, b.images)
    assert not list(tmp_path.glob(".*")), "temporary directory left behind"


def test_save_overwrites_atomically(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    pipe.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_missing_and_corrupt_weights_are_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="neither a directory nor a bundled model"):
        AlignDrawPipeline.from_pretrained(tmp_path / "nope")
    pipe.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not really weights")
    with pytest.raises(ValueError, match="could not read weights"):
        AlignDrawPipeline.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing model.safetensors"):
        AlignDrawPipeline.from_pretrained(tmp_path / "m")


def test_weights_that_do_not_fit_the_config(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model"]["z_dim"] = 7
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit"):
        AlignDrawPipeline.from_pretrained(tmp_path / "m")


def test_run_directory_prefers_best(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "run" / "last")
    other = AlignDrawPipeline(AlignDraw(pipe.model.config), pipe.vocab, pipe.config)
    other.save_pretrained(tmp_path / "run" / "best")
    loaded = AlignDrawPipeline.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(loaded.model.canvas0, other.model.canvas0)


def test_wrapper_prefixes_are_stripped():
    from aligndraw.checkpoint import clean_state_dict

    state = {"module._orig_mod.canvas0": torch.zeros(1), "h_dec0": torch.ones(1)}
    assert sorted(clean_state_dict(state)) == ["canvas0", "h_dec0"]


