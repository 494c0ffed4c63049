"""COCO 32x32 end to end on a fixture in COCO 2014's exact layout and schema, made here:
a few dozen small JPEGs of random sizes and modes (one truncated, one not a JPEG at all) and
the two caption JSON files (images, annotations with image_id/caption)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from aligndraw.checkpoint import load_model_dir
from aligndraw.cli import main
from aligndraw.config import RunConfig, preset
from aligndraw.data import coco_prepare, make_dataset
from aligndraw.data.batching import length_grouped_order
from aligndraw.data.coco import CocoCaptions, CocoConfig, split_keys
from aligndraw.data.coco_prepare import prepare_coco
from aligndraw.data.mnist_captions import CaptionedMnistConfig
from aligndraw.pipeline import AlignDrawPipeline
from aligndraw.text import PAD, UNK, tokenize

N_TRAIN, N_VAL = 30, 20
ADJECTIVES = ("red", "small", "large", "white", "old")
NOUNS = ("bus", "dog", "kitchen", "man", "plate")
PLACES = ("near a tall green tree", "on the street", "in a room", "by water")
TINY = ["model.steps=2", "model.embed_dim=8", "model.lang_hidden=8", "model.align_dim=8",
        "model.enc_hidden=16", "model.dec_hidden=16", "model.z_dim=4", "model.read_n=3",
        "model.write_n=3", "data.val_images=5", "data.test_images=10", "--no-progress"]
SPLIT = CocoConfig(val_images=5, test_images=10)


def _caption(rng, image_id: int, k: int) -> str:
    adj, noun, place = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(PLACES)
    return f"A {adj} {noun}, {place} (photo {image_id}) take {k}."


def _image(rng, k: int, mode: str) -> Image.Image:
    if k == 0:  # wide: red margins, blue centre square -> the centre crop is all blue
        arr = np.zeros((48, 96, 3), np.uint8)
        arr[:, :, 0] = 255
        arr[:, 24:72] = (0, 0, 255)
    elif k == 1:  # tall: red top and bottom, green centre square
        arr = np.zeros((100, 50, 3), np.uint8)
        arr[:, :, 0] = 255
        arr[25:75] = (0, 255, 0)
    else:
        h, w = rng.integers(24, 90, size=2)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def make_coco(root, seed: int = 0) -> dict:
    """Write the fixture; returns {caption text as kept: image id} and the special files."""
    rng = np.random.default_rng(seed)
    owner, special = {}, {}
    (root / "annotations").mkdir(parents=True)
    for pool, n, first in (("train2014", N_TRAIN, 9), ("val2014", N_VAL, 40000)):
        (root / pool).mkdir()
        images, annotations = [], []
        for k in range(n):
            image_id = first + 7 * k
            name = f"COCO_{pool}_{image_id:012d}.jpg"
            mode = {3: "L", 7: "CMYK"}.get(k % 10, "RGB")  # grayscale and CMYK JPEGs too
            img = _image(rng, k, mode)
            img.save(root / pool / name, "JPEG", quality=90)
            images.append({"license": 1, "file_name": name, "coco_url": "", "height": img.height,
                           "width": img.width, "date_captured": "2013-11-14 16:28:13",
                           "flickr_url": "", "id": image_id})
            if pool == "train2014" and k == n - 1:
                continue  # an image nobody captioned: left out
            for c in range(6 if k % 4 == 0 else 5):  # a 6th caption is dropped (5 per image)
                text = _caption(rng, image_id, c)
                if pool == "train2014" and k == 2 and c == 0:
                    text = text.replace("take", "xylophone take")  # a word seen once
                if pool == "val2014" and k == 4 and c == 0:
                    text = text.replace("take", "quokka take")  # never seen in training
                annotations.append({"image_id": image_id, "id": len(annotations) * 3 + 1,
                                    "caption": text + " "})
                if c < 5:
                    owner[text] = image_id
        annotations.append({"image_id": 999999, "id": 10**6, "caption": "An orphan caption."})
        json.dump({"info": {"description": "fixture", "year": 2014}, "licenses": [],
                   "images": images, "annotations": annotations},
                  open(root / "annotations" / f"captions_{pool}.json", "w"))
    truncated = root / "train2014" / images_name("train2014", 9 + 7 * 5)
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])  # a JPEG cut short
    garbage = root / "val2014" / images_name("val2014", 40000 + 7 * 6)
    garbage.write_bytes(b"this is not a JPEG file" * 10)
    special.update(truncated=truncated, garbage=garbage, owner=owner)
    return special


def images_name(pool: str, image_id: int) -> str:
    return f"COCO_{pool}_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco2014")
    special = make_coco(root)
    out = tmp_path_factory.mktemp("prepared") / "coco"
    report = prepare_coco(root, out, workers=1, progress=False)
    return {"root": root, "out": out, "report": report, **special}


# ------------------------------------------------------------------------------ preparation
def test_prepared_arrays_have_the_documented_shapes(coco):
    out, meta = coco["out"], coco["report"].meta
    images = np.load(out / "train2014_images.npy")
    assert images.shape == (N_TRAIN - 2, 3, 32, 32) and images.dtype == np.uint8  # -truncated, -uncaptioned
    assert np.load(out / "val2014_images.npy").shape == (N_VAL - 1, 3, 32, 32)  # -not a JPEG
    for pool, n_images in (("train2014", N_TRAIN - 2), ("val2014", N_VAL - 1)):
        tokens = np.load(out / f"{pool}_tokens.npy")
        lengths = np.load(out / f"{pool}_lengths.npy")
        index = np.load(out / f"{pool}_image_index.npy")
        assert tokens.shape == (5 * n_images, lengths.max()) and tokens.dtype == np.uint16
        assert lengths.shape == index.shape == (5 * n_images,)
        assert (tokens[np.arange(tokens.shape[1]) >= lengths[:, None]] == 0).all()  # 0-padded
        assert (tokens[np.arange(tokens.shape[1]) < lengths[:, None]] > 0).all()
        assert np.bincount(index).tolist() == [5] * n_images  # five captions each
        p = meta["pools"][pool]
        assert p["images"] == n_images and p["captions"] == 5 * n_images
        assert p["orphan_captions"] == 1 and p["extra_captions_dropped"] > 0
    assert meta["pools"]["train2014"]["without_captions"] == 1
    assert meta["vocab_size"] == len(json.loads((out / "vocab.json").read_text())["words"])
    assert not (out.parent / ".coco.partial").exists(), "chunk cache left behind"


def test_centre_crop_then_antialiased_resize_and_rgb(coco):
    images = np.load(coco["out"] / "train2014_images.npy").astype(float)
    wide, tall = images[0].mean((1, 2)), images[1].mean((1, 2))  # per-channel means
    assert wide[2] > 200 and wide[0] < 40, wide  # the blue centre, not the red margins
    assert tall[1] > 200 and tall[0] < 40, tall
    gray = images[3]  # a grayscale JPEG becomes three equal channels
    assert np.abs(gray[0] - gray[1]).max() <= 1 and np.abs(gray[1] - gray[2]).max() <= 1
    assert images[6].std() > 0  # the CMYK JPEG (k = 7; k = 5 was truncated) decoded to RGB


def test_every_caption_points_at_its_image(coco):
    data = CocoCaptions(SPLIT, root=coco["out"])
    for split in (data.train_epoch(0), data.validation(), data.test()):
        assert len(split) == 5 * len(split.image_ids)
        for text, row in zip(split.captions, split.image_index, strict=True):
            assert coco["owner"][text] == split.image_ids[row]
            # the stored ids are the tokenised caption, rare words as <unk>
        ids = split.tokens[0, :split.lengths[0]]
        assert data.vocab.decode(ids).split() == [
            w if w in data.vocab.words else UNK for w in tokenize(split.captions[0])]


def test_vocabulary_lowercases_splits_punctuation_and_maps_unseen_words_to_unk(coco, tmp_path):
    data = CocoCaptions(SPLIT, root=coco["out"])
    words = data.vocab.words
    assert words[:2] == (PAD, UNK) and data.vocab.unk_id == 1
    assert {",", ".", "(", ")", "a", "xylophone"} <= set(words) and "A" not in words
    assert "quokka" not in words  # only in a validation caption: stored as <unk>
    captions = json.loads((coco["out"] / "val2014_captions.json").read_text())
    i = next(i for i, c in enumerate(captions) if "quokka" in c)
    position = tokenize(captions[i]).index("quokka")
    assert np.load(coco["out"] / "val2014_tokens.npy")[i, position] == data.vocab.unk_id
    assert data.config.min_word_count == 1
    # A minimum count of 2 drops the word seen once.
    report = prepare_coco(coco["root"], tmp_path / "min2", min_count=2, workers=1, progress=False)
    rare = CocoCaptions(CocoConfig(val_images=5, test_images=10, min_word_count=2),
                        root=report.out).vocab
    assert "xylophone" not in rare.words and len(rare) == len(data.vocab) - 1
    assert report.meta["vocab_size_by_min_count"]["2"] == len(rare)
    with pytest.raises(ValueError, match="--min-count 1"):
        CocoCaptions(CocoConfig(val_images=5, test_images=10, min_word_count=3), root=coco["out"])


def test_corrupt_jpegs_are_reported_and_skipped(coco, tmp_path, caplog, capsys):
    skipped = {s["file"]: s["error"] for s in coco["report"].skipped}
    assert set(skipped) == {f"train2014/{coco['truncated'].name}", f"val2014/{coco['garbage'].name}"}
    assert "truncated" in skipped[f"train2014/{coco['truncated'].name}"]
    assert "cannot identify image file" in skipped[f"val2014/{coco['garbage'].name}"]
    with caplog.at_level(logging.WARNING, logger="aligndraw.data.coco"):
        assert main(["data", "coco", "--root", str(coco["root"]), "--out", str(tmp_path / "c"),
                     "--no-progress", "--workers", "2"]) == 0
    assert coco["garbage"].name in caplog.text
    printed = capsys.readouterr().out
    assert "skipped val2014/" + coco["garbage"].name in printed and "1 skipped" in printed
    # Two threads give the same arrays as one.
    for name in ("train2014_images.npy", "val2014_tokens.npy", "vocab.json"):
        assert (tmp_path / "c" / name).read_bytes() == (coco["out"] / name).read_bytes()


def test_an_interrupted_preparation_restarts_from_its_chunks(coco, tmp_path, monkeypatch):
    monkeypatch.setattr(coco_prepare, "CHUNK", 8)
    real, calls = coco_prepare._decode_chunk, []

    def failing(paths, size):
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(paths, size)

    monkeypatch.setattr(coco_prepare, "_decode_chunk", failing)
    out = tmp_path / "coco"
    with pytest.raises(KeyboardInterrupt):
        prepare_coco(coco["root"], out, workers=1, progress=False)
    assert not out.exists()  # nothing half-written under the final name
    assert len(list((tmp_path / ".coco.partial").rglob("chunk_*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(coco_prepare, "_decode_chunk", lambda p, s: calls.append(len(p)) or real(p, s))
    prepare_coco(coco["root"], out, workers=1, progress=False)
    assert len(calls) == 2 + 3  # the rest of train2014 (30 images, 4 chunks), val2014 (3 chunks)
    for name in ("train2014_images.npy", "train2014_tokens.npy", "val2014_image_index.npy"):
        assert np.array_equal(np.load(out / name), np.load(coco["out"] / name)), name


def test_bad_roots_and_outputs_are_clear_errors(coco, tmp_path):
    with pytest.raises(ValueError, match="missing .*annotations/captions_val2014.json"):
        prepare_coco(tmp_path, tmp_path / "out", progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a prepared COCO directory"):
        prepare_coco(coco["root"], foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="aligndraw data coco"):
        CocoCaptions(SPLIT, root=tmp_path / "nothing")
    with pytest.raises(ValueError, match="val2014 has 19 images"):
        CocoCaptions(CocoConfig(val_images=10, test_images=10), root=coco["out"])


# ------------------------------------------------------------------------------ splits, batches
def test_splits_are_disjoint_seeded_and_round_robin(coco):
    data = CocoCaptions(SPLIT, root=coco["out"])
    val, test = data.validation(), data.test()
    assert len(val.image_ids) == 5 and len(test.image_ids) == 10
    assert not set(val.image_ids) & set(test.image_ids)
    ids = np.load(coco["out"] / "val2014_image_ids.npy")
    ranked = ids[np.argsort(split_keys(ids, SPLIT.seed))]
    assert test.image_ids.tolist() == ranked[:10].tolist()  # fixed by the hash of the ids
    assert sorted(val.image_index[:5].tolist()) == list(range(5))  # first captions: distinct images
    again = CocoCaptions(SPLIT, root=coco["out"]).test()
    assert again.captions == test.captions
    other = CocoCaptions(CocoConfig(val_images=5, test_images=10, seed=7), root=coco["out"]).test()
    assert other.image_ids.tolist() != test.image_ids.tolist()
    assert data.preview_captions() == val.captions[:8]


def test_length_grouped_batches_hold_captions_of_equal_length():
    lengths = np.random.default_rng(0).integers(5, 12, size=203)
    batches = length_grouped_order(lengths, 8, shuffle=True, generator=np.random.default_rng(1))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(203))  # each caption once
    equal = [b for b in batches if len(set(lengths[b])) == 1]
    assert len(equal) >= len(batches) - 8  # only the pooled leftovers may mix lengths
    kept = length_grouped_order(lengths, 8, shuffle=True, generator=np.random.default_rng(1),
                                drop_last=True)
    assert len(kept) == 203 // 8 and all(len(b) == 8 for b in kept)
    again = length_grouped_order(lengths, 8, shuffle=True, generator=np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_coco_batches_for_training_evaluation_and_ddp(coco):
    data = CocoCaptions(SPLIT, root=coco["out"])
    train = data.train_epoch(0)
    plan = data.batches(train, 8, shuffle=True, generator=np.random.default_rng(0), drop_last=True)
    assert len(plan) == len(train) // 8
    batches = list(plan)
    for b in batches:
        assert b.images.shape == (8, 3, 32, 32) and b.images.dtype == torch.float32
        assert 0 <= b.images.min() and b.images.max() <= 1
        assert b.tokens.dtype == torch.long and b.tokens.shape[1] == int(b.lengths.max())
        assert b.layouts is None and not b.held_out.any()
    assert sum(len(set(b.lengths.tolist())) == 1 for b in batches) >= len(batches) - 1
    assert plan[3:][0].captions == plan[3].captions  # resuming mid-epoch
    ordered = list(data.validation().batches(data.vocab, 10, shuffle=False))
    assert [c for b in ordered for c in b.captions] == data.validation().captions
    shards = [data.train_epoch(1, rank=r, world_size=2) for r in range(2)]
    counts = [len(data.batches(s, 4, shuffle=True, generator=np.random.default_rng(3),
                               drop_last=True)) for s in shards]
    assert counts[0] == counts[1] == len(train) // 2 // 4
    assert not set(shards[0].captions) & set(shards[1].captions)


# ------------------------------------------------------------------------------ configs
def test_configs_name_their_dataset_and_old_ones_are_mnist():
    config = preset("coco32", ["data.root=/data/coco", "data.val_images=7"])
    assert isinstance(config.data, CocoConfig) and config.data.root == "/data/coco"
    assert config.model.channels == 3 and config.model.read_n == 9 and config.model.z_dim == 275
    again = RunConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    old = config.to_dict()
    old["data"] = {k: v for k, v in CaptionedMnistConfig().to_dict().items() if k != "dataset"}
    assert isinstance(RunConfig.from_dict(old).data, CaptionedMnistConfig)
    assert isinstance(preset("mnist-captions").data, CaptionedMnistConfig)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        RunConfig.from_dict({"data": {"dataset": "imagenet"}})
    with pytest.raises(ValueError, match="unknown data field 'held_out'"):
        preset("coco32", ["data.held_out=[]"])


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def coco_run(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "coco"
    assert main(["train", "--preset", "coco32", "--out", str(out), "--data-dir", str(coco["out"]),
                 "--epochs", "1", "--batch-size", "16", "--log-every", "1", *TINY]) == 0
    return out


def test_coco32_trains_through_the_cli(coco, coco_run):
    records = [json.loads(x) for x in (coco_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == (N_TRAIN - 2) * 5 // 16 and all(np.isfinite(r["loss"]) for r in train)
    val = [r for r in records if r["split"] == "validation"]
    assert len(val) == 1 and 0 < val[0]["bound"] < 1e5
    assert (coco_run / "samples" / "epoch_000.png").stat().st_size > 0
    model, vocab, config = load_model_dir(coco_run)
    data = CocoCaptions(SPLIT, root=coco["out"])
    assert config.model.vocab_size == len(vocab) == len(data.vocab)  # not the preset's 25,325
    assert vocab == data.vocab and config.model.channels == 3
    assert isinstance(config.data, CocoConfig) and config.data.min_word_count == 1
    assert config.data.root == str(coco["out"].resolve())  # evaluate finds the data again
    assert isinstance(make_dataset(config.data), CocoCaptions)


def test_generate_from_a_coco_caption(coco_run, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "A small dog, on the street.", "--model", str(coco_run), "--num", "2",
                 "--out", str(out)]) == 0
    image = Image.open(out / "caption00_sample01.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    pipe = AlignDrawPipeline.from_pretrained(coco_run)
    a = pipe("a red bus", generator=torch.Generator().manual_seed(0), output_type="np").images
    b = pipe("a red bus", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (1, 3, 32, 32) and np.array_equal(a, b)


def test_unknown_words_are_named_unless_drawn_as_unk(coco_run, tmp_path):
    pipe = AlignDrawPipeline.from_pretrained(coco_run)
    with pytest.raises(ValueError, match=r"unknown words 'quokka', 'zebu' in caption .*allow_unknown"):
        pipe("a quokka , a zebu on the street")
    out = pipe("a quokka on the street", allow_unknown=True, output_type="np")
    assert out.images.shape == (1, 3, 32, 32) and pipe.unknown_words("a quokka") == ["quokka"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "aligndraw", "generate", "a quokka on a bus",
                             "--model", str(coco_run), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown word 'quokka'" in result.stderr and "--allow-unknown" in result.stderr
    assert not (tmp_path / "x").exists()
    assert main(["generate", "a quokka on a bus", "--model", str(coco_run), "--num", "1",
                 "--allow-unknown", "--out", str(tmp_path / "y")]) == 0
    assert (tmp_path / "y" / "caption00_sample00.png").is_file()


def test_evaluate_a_coco_model(coco_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(coco_run), "--metrics", "nll,iwae,retrieval,ssim",
                 "--iwae-k", "2", "--retrieval-samples", "1", "--shortlist", "5",
                 "--ssim-samples", "2", "--max-captions", "6", "--batch-size", "32",
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert list(metrics) == ["nll", "iwae", "retrieval_nn", "retrieval_random", "ssim"]
    assert all(list(groups) == ["all"] for groups in metrics.values())  # nothing held out
    nll = metrics["nll"]["all"]
    assert nll["count"] == 50 and nll["bound"] == pytest.approx(nll["nll"] + nll["kl"])
    assert metrics["retrieval_nn"]["all"]["count"] == 6 and 1 <= metrics["retrieval_nn"]["all"]["med_r"] <= 5
    assert metrics["ssim"]["all"]["count"] == 6
    assert "pixels" in json.loads(out.read_text())["definitions"]["retrieval_nn"]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(coco_run), "--metrics", "fidelity"]) == 2
    assert "fidelity needs captioned-MNIST" in capsys.readouterr().err
