"""The bundled pretrained model and the demo built on it."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligndraw import AlignDrawPipeline
from aligndraw.checkpoint import bundled_models
from aligndraw.data.mnist_captions import DEFAULT_HELD_OUT

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "aligndraw" / "pretrained" / "mnist-captions"


def test_bundled_model_is_listed_and_small():
    assert bundled_models() == ["mnist-captions"]
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size < 12.5e6, f"bundled model is {size / 1e6:.1f} MB"
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["model"]["steps"] == 32 and config["model"]["dec_hidden"] == 300
    assert [tuple(p) for p in config["data"]["held_out"]] == list(DEFAULT_HELD_OUT)
    card = (BUNDLED / "README.md").read_text()
    assert "aligndraw train" in card and "fidelity" in card


def test_bundled_model_generates_deterministically():
    pipe = AlignDrawPipeline.from_pretrained("mnist-captions")
    caption = "the digit 8 is at the top left of the image ."  # a held-out composition
    a = pipe(caption, num_images_per_caption=2, output_type="np",
             generator=torch.Generator().manual_seed(5))
    b = pipe(caption, num_images_per_caption=2, output_type="np",
             generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a.images, b.images)
    image = a.images[0, 0]  # (60, 60)
    # Drawn in the top-left corner, not blank and not everywhere.
    assert image[:32, :32].mean() > 3 * image[32:, 32:].mean()
    assert image.max() > 0.5


def test_make_demo_writes_non_blank_outputs(tmp_path):
    env = {**os.environ, "MAKEFLAGS": ""}
    result = subprocess.run(["make", "-s", "demo", f"DEMO_OUT={tmp_path}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(tmp_path / "grid.png") in result.stdout
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"), dtype=np.float32)
    assert grid.std() > 20  # captions and drawings, not a blank sheet
    gifs = sorted(tmp_path.glob("caption*_drawing.gif"))
    heatmaps = sorted(tmp_path.glob("caption*_alignment.png"))
    assert len(gifs) == 6 and len(heatmaps) == 6
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames > 10
    sample = np.asarray(Image.open(tmp_path / "caption00_sample00.png"), dtype=np.float32)
    assert sample.max() > 100


def test_generate_defaults_to_the_bundled_model(tmp_path):
    from aligndraw.cli import main

    assert main(["generate", "the digit 3 is on the left of the digit 5 .", "--num", "1",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "caption00_sample00.png").is_file()
