"""The image reader: shapes, labels, accuracy bookkeeping, save/load, training, the bundled one."""

import json

import numpy as np
import pytest
import torch

from aligndraw.cli import main
from aligndraw.data.mnist_captions import CaptionedMnist, CaptionedMnistConfig
from aligndraw.reader import (
    EMPTY,
    ImageReader,
    ReaderConfig,
    ReaderTrainConfig,
    evaluate_reader,
    layout_accuracy,
    layout_targets,
    load_reader,
    read_layouts,
    resolve_reader_dir,
    save_reader,
    train_reader,
)

from conftest import synthetic_digits

SMALL = ReaderConfig(channels=(4, 8), features=8)


def synthetic_data():
    config = CaptionedMnistConfig(train_scenes_per_epoch=32, val_digits=200, val_scenes=8,
                                  test_scenes=24)
    return CaptionedMnist(config, train=synthetic_digits(600, 0), test=synthetic_digits(200, 1))


def test_shapes_of_logits_and_features():
    reader = ImageReader(SMALL)
    x = torch.rand(3, 1, 60, 60)
    assert reader(x).shape == (3, 8, 11)
    assert reader.features(x).shape == (3, 8)


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="nothing"):
        ReaderConfig(channels=(4,) * 7)
    with pytest.raises(ValueError, match="compositions"):
        ReaderTrainConfig(compositions="held_out")


def test_empty_places_are_class_ten_and_read_back_as_minus_one():
    layouts = np.array([[3, -1, -1, -1, -1, -1, -1, -1], [-1, -1, -1, -1, 2, 9, -1, -1]])
    targets = layout_targets(layouts)
    assert targets[0].tolist() == [3] + [EMPTY] * 7
    reader = ImageReader(SMALL)
    with torch.no_grad():
        reader.head.weight.zero_()
        reader.head.bias.copy_(torch.nn.functional.one_hot(targets, 11).float().flatten()[:88] * 5)
    assert read_layouts(reader, torch.rand(2, 1, 60, 60))[0].tolist() == layouts[0].tolist()


def test_layout_accuracy_known_values():
    truth = torch.full((4, 8), -1)
    truth[:, 0] = torch.tensor([1, 2, 3, 4])
    predicted = truth.clone()
    predicted[1, 0] = 7  # one place wrong in scene 1
    predicted[3, 5] = 0  # a digit read where there is none in scene 3
    result = layout_accuracy(predicted, truth, np.array([False, False, True, True]))
    assert result["all"]["count"] == 4 and result["all"]["exact"] == 50.0
    assert result["all"]["places"] == pytest.approx(100 * 30 / 32)
    assert result["seen"]["exact"] == 50.0 and result["held_out"]["exact"] == 50.0


def test_save_load_round_trip(tmp_path):
    reader = ImageReader(SMALL).eval()
    save_reader(tmp_path / "r", reader, CaptionedMnistConfig(), ReaderTrainConfig(steps=1))
    loaded = load_reader(tmp_path / "r")
    x = torch.rand(2, 1, 60, 60)
    assert torch.equal(reader(x), loaded(x)) and loaded.config == SMALL
    assert json.loads((tmp_path / "r" / "config.json").read_text())["kind"] == "aligndraw-image-reader"
    assert not list(tmp_path.glob(".r.tmp*"))


def test_loading_something_else_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="neither a directory"):
        load_reader(tmp_path / "missing")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model": {}}')
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError):
        load_reader(tmp_path / "model")


@pytest.mark.parametrize("compositions", ["any", "seen"])
def test_training_runs_and_saves(tmp_path, compositions):
    train = ReaderTrainConfig(steps=3, batch_size=8, compositions=compositions, log_every=1)
    reader, metrics = train_reader(tmp_path / "r", SMALL, train, data=synthetic_data())
    assert set(metrics) == {"all", "seen", "held_out"} and metrics["all"]["count"] == 24
    assert not reader.training
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["train"]["compositions"] == compositions and saved["test_accuracy"] == metrics


def test_training_is_seeded(tmp_path):
    train = ReaderTrainConfig(steps=2, batch_size=8, seed=3)
    a, _ = train_reader(None, SMALL, train, data=synthetic_data())
    b, _ = train_reader(None, SMALL, train, data=synthetic_data())
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))


def test_bundled_reader_is_small_and_loads():
    directory = resolve_reader_dir()
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 1_000_000
    assert load_reader().config.features > 0


@pytest.mark.realdata
def test_bundled_reader_reads_real_test_scenes(mnist_dir):
    accuracy = evaluate_reader(load_reader(), CaptionedMnist(source=mnist_dir).test())
    assert accuracy["seen"]["exact"] > 97 and accuracy["held_out"]["exact"] > 96
    assert accuracy["all"]["places"] > 99.5


@pytest.mark.realdata
def test_cli_reader_train_and_evaluate(tmp_path, mnist_dir, capsys):
    out = tmp_path / "reader"
    assert main(["reader", "train", "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--channels", "4,8", "--threads", "1"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert main(["reader", "evaluate", "--reader", str(out), "--out", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "| held_out | 2000 |" in printed
    assert json.loads((tmp_path / "r.json").read_text())["test"]["all"]["count"] == 4000


@pytest.mark.parametrize("command", [["reader"], ["reader", "train"], ["reader", "evaluate"]])
def test_reader_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0 and "usage: aligndraw reader" in capsys.readouterr().out
