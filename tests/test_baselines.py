"""The baselines: sentence-vector DRAW, fully-connected and conv-deconv conditional VAEs, the
caption autoencoder behind sentvec, and the report that compares them."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aligndraw import evaluation as ev
from aligndraw import visualize
from aligndraw.baselines import CaptionVAE, build_model, conv_sizes
from aligndraw.checkpoint import load_model_dir
from aligndraw.model import AlignDraw
from aligndraw.pipeline import AlignDrawPipeline
from aligndraw.report import load_run, main_table, training_record, write_report
from aligndraw.sentence_vectors import (
    CaptionAutoencoder,
    SentenceVectorEncoder,
    reconstruction_accuracy,
    train_sentence_encoder,
)
from aligndraw.text import encode_batch, mnist_vocabulary
from aligndraw.trainer import Trainer

from conftest import random_batch, synthetic_digits, tiny_config, tiny_run_config

VAES = ("fcvae", "convvae")


def vae_config(kind, **kw):
    base = dict(model=kind, vae_hidden=32, conv_channels=4, height=12, width=12)
    base.update(kw)
    return tiny_config(**base)


# ------------------------------------------------------------------------------ models
def test_build_model_makes_the_kind_the_config_names():
    for kind, cls in (("aligndraw", AlignDraw), ("noalign", AlignDraw), ("sentvec", AlignDraw),
                      ("fcvae", CaptionVAE), ("convvae", CaptionVAE)):
        model = build_model(vae_config(kind))
        assert type(model) is cls and model.config.model == kind
    assert isinstance(build_model(vae_config("sentvec")).encoder, SentenceVectorEncoder)
    with pytest.raises(ValueError, match="fcvae"):
        CaptionVAE(tiny_config())


def test_conv_sizes_floor_each_halving_and_reject_tiny_images():
    assert conv_sizes(60) == [60, 30, 15, 7]
    assert conv_sizes(32) == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="too small"):
        conv_sizes(4)


@pytest.mark.parametrize("kind", VAES)
@pytest.mark.parametrize("size", [(12, 12, 1), (15, 13, 3), (60, 60, 1)])
def test_vae_bound_terms_and_samples_have_the_shared_shapes(kind, size):
    h, w, c = size
    cfg = vae_config(kind, height=h, width=w, channels=c)
    torch.manual_seed(0)
    model = build_model(cfg)
    images, tokens, lengths = random_batch(cfg)
    out = model(images, tokens, lengths, generator=torch.Generator().manual_seed(0), log_weight=True)
    assert out.nll.shape == out.kl.shape == out.log_weight.shape == (4,)
    assert out.kl_steps.shape == (4, 1) and torch.equal(out.kl_steps[:, 0], out.kl)
    assert (out.kl >= 0).all() and (out.nll > 0).all()
    assert out.loss.item() == pytest.approx((out.nll + out.kl).mean().item())
    s = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(1))
    assert s.images.shape == (4, c, h, w) and 0 <= s.images.min() and s.images.max() <= 1
    assert s.canvases.shape == (4, 2, c, h, w) and torch.equal(s.canvases[:, 1], s.images)
    assert s.write_windows.shape == (4, 1, 4) and s.write_windows[0, 0].tolist() == [0, 0, w, h]
    torch.testing.assert_close(s.alignments.sum(-1), torch.ones(4, 1))
    assert (s.alignments[1, 0, lengths[1]:] == 0).all()
    s2 = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(1), history=False)
    assert s2.canvases is None
    torch.testing.assert_close(s2.images, s.images, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", VAES)
def test_vae_kl_matches_a_monte_carlo_estimate_of_log_q_minus_log_p(kind):
    """KL(q || p) analytic = E_q[log q(z) − log p(z)], from the same model's log_weight terms."""
    cfg = vae_config(kind)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images, tokens, lengths = random_batch(cfg, batch=1)
    n = 20000
    with torch.no_grad():
        out = model(images.expand(n, -1, -1, -1), tokens.expand(n, -1), lengths.expand(n),
                    generator=torch.Generator().manual_seed(0), log_weight=True)
    # log_weight = −nll + log p(z) − log q(z)  →  log q − log p = −nll − log_weight
    mc = (-out.nll - out.log_weight).double().mean()
    assert mc.item() == pytest.approx(out.kl[0].item(), rel=0.05, abs=0.05)


@pytest.mark.parametrize("kind", ["sentvec", *VAES])
def test_same_noise_same_images_and_a_seed_reproduces_them(kind):
    cfg = vae_config(kind)
    model = build_model(cfg)
    _, tokens, lengths = random_batch(cfg)
    noise = torch.randn(model.noise_shape(4))
    a = model.sample(tokens, lengths, noise=noise).images
    assert torch.equal(a, model.sample(tokens, lengths, noise=noise).images)
    b = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(b, model.sample(tokens, lengths, generator=torch.Generator().manual_seed(3)).images)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="noise must have shape"):
        model.sample(tokens, lengths, noise=torch.randn(4, 7, cfg.z_dim))


@pytest.mark.parametrize("kind", ["aligndraw", "noalign", *VAES])
def test_temperature_scales_the_prior_noise(kind):
    cfg = vae_config(kind) if kind in VAES else tiny_config(model=kind)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from the zero-initialised prior
    _, tokens, lengths = random_batch(cfg)
    noise = torch.randn(model.noise_shape(4))
    half = model.sample(tokens, lengths, noise=noise, temperature=0.5).images
    torch.testing.assert_close(half, model.sample(tokens, lengths, noise=noise * 0.5).images)
    assert torch.equal(model.sample(tokens, lengths, noise=noise, temperature=1).images,
                       model.sample(tokens, lengths, noise=noise).images)
    assert not torch.allclose(half, model.sample(tokens, lengths, noise=noise).images)
    mean = model.sample(tokens, lengths, noise=noise, temperature=0).images  # the prior mean
    torch.testing.assert_close(mean, model.sample(tokens, lengths, noise=-3 * noise, temperature=0).images)
    for bad in (-0.1, 10.5, float("nan"), "hot", True):
        with pytest.raises(ValueError, match="temperature must be a number between 0 and 10"):
            model.sample(tokens, lengths, noise=noise, temperature=bad)


@pytest.mark.parametrize("kind", ["sentvec", *VAES])
def test_gradients_reach_every_trainable_parameter_and_spare_the_frozen_encoder(kind):
    cfg = vae_config(kind)
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():  # a non-zero init so that every path carries gradient
        torch.nn.init.normal_(p, 0, 0.1)
    model(*random_batch(cfg), generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in model.named_parameters():
        if kind == "sentvec" and name.startswith("encoder."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", VAES)
def test_vaes_learn_on_a_fixed_batch(kind):
    cfg = vae_config(kind)
    torch.manual_seed(0)
    model = build_model(cfg)
    images, tokens, lengths = random_batch(cfg)
    images = (images > 0.5).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = model(images, tokens, lengths, generator=g).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])  # from 144·ln 2 nats of coin flips


# ------------------------------------------------------------------------------ sentence vectors
def test_sentence_vector_is_repeated_at_real_words_and_zero_past_them():
    vocab = mnist_vocabulary()
    enc = SentenceVectorEncoder(len(vocab), 16)
    tokens, lengths = encode_batch(vocab, ["the digit 1 is at the top of the digit 2 .",
                                           "the digit 3 is at the top left of the image ."])
    h = enc(tokens, lengths)  # (2, L, 16)
    v = enc.vectors(tokens, lengths)
    for i in range(2):
        n = int(lengths[i])
        assert torch.equal(h[i, :n], v[i].expand(n, -1)) and (h[i, n:] == 0).all()
    # Padding never changes a caption's vector (packed GRU).
    alone = enc.vectors(tokens[:1, : lengths[0]], lengths[:1])
    torch.testing.assert_close(alone[0], v[0])


def test_caption_autoencoder_learns_to_spell_captions_back_and_is_frozen():
    vocab = mnist_vocabulary()
    places = ("top left", "top right", "bottom left", "bottom right")
    captions = [f"the digit {d} is at the {p} of the image ." for d in range(10) for p in places]
    untrained = CaptionAutoencoder(len(vocab), 128).eval()
    assert reconstruction_accuracy(untrained, vocab, captions) < 0.05
    encoder, metrics = train_sentence_encoder(captions, vocab, 128, steps=200, batch_size=40,
                                              seed=0, check={"train": captions})
    assert metrics["accuracy_train"] > 0.1 and metrics["loss"] < 0.3  # from ln 23 ≈ 3.1 per word
    assert all(not p.requires_grad for p in encoder.parameters())
    a, _ = train_sentence_encoder(captions, vocab, 16, steps=5, seed=1)
    b, _ = train_sentence_encoder(captions, vocab, 16, steps=5, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="steps"):
        train_sentence_encoder(captions, vocab, 32, steps=0)


def test_sentvec_run_trains_the_encoder_first_keeps_it_frozen_and_reloads_it(tmp_path, synthetic_data):
    config = tiny_run_config(sentence_steps=30)
    config = config.__class__(model=vae_config("sentvec", height=60, width=60, steps=2,
                                               sentence_dim=16),
                              data=config.data, train=config.train, preset="tiny")
    trainer = Trainer(config, tmp_path, data=synthetic_data(config), progress_bar=False)
    before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    trainer.run(max_steps=3)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["split"] == "sentence_encoder" and 0 <= first["accuracy_validation"] <= 1
    saved = load_file(str(tmp_path / "last" / "model.safetensors"))
    for k, v in before.items():
        assert torch.equal(saved[f"encoder.{k}"], v), k  # unchanged by the DRAW steps
    model, _, _ = load_model_dir(tmp_path)
    assert model.config.model == "sentvec"
    assert all(not p.requires_grad for p in model.encoder.parameters())
    # Resuming does not retrain the encoder: no second sentence_encoder record.
    Trainer(config, tmp_path, data=synthetic_data(config), resume=True, progress_bar=False).run(max_steps=4)
    splits = [json.loads(x)["split"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert splits.count("sentence_encoder") == 1


# ------------------------------------------------------------------------------ shared harness
@pytest.fixture(scope="module")
def data():
    from aligndraw.data.mnist_captions import CaptionedMnist, CaptionedMnistConfig

    config = CaptionedMnistConfig(train_scenes_per_epoch=64, val_digits=200, val_scenes=16,
                                  test_scenes=40)
    return CaptionedMnist(config, train=synthetic_digits(600, 0), test=synthetic_digits(200, 1))


@pytest.mark.parametrize("kind", ["sentvec", *VAES])
def test_every_metric_runs_on_the_baselines(kind, data):
    from aligndraw.reader import ImageReader, ReaderConfig

    torch.manual_seed(0)
    model = build_model(vae_config(kind, height=60, width=60, steps=2)).eval()
    scenes = data.test()
    bound = ev.lower_bound(model, scenes, data.vocab, batch_size=20)["all"]
    iwae = ev.iwae_bound(model, scenes.subset(slice(0, 8)), data.vocab, k=5, batch_size=20)["all"]
    assert bound["count"] == 40 and iwae["iwae"] <= iwae["bound"] + 1e-6
    reader = ImageReader(ReaderConfig(channels=(4, 8), features=8)).eval()
    r = ev.retrieval(model, scenes, data.vocab, reader, data.train_epoch(0).captions, samples=2,
                     shortlist=10, max_captions=4, batch_size=50)
    assert 1 <= r["retrieval_nn"]["all"]["med_r"] <= 10
    s = ev.ssim_scores(model, scenes, data.vocab, samples=2, max_captions=4)["all"]
    assert -1 <= s["mean"] <= 1
    f = ev.caption_fidelity(model, reader, scenes, data.vocab, samples=1, max_captions=4)["all"]
    assert 0 <= f["fidelity"] <= 100


@pytest.mark.parametrize("kind", VAES)
def test_vae_runs_train_resume_exactly_and_load_in_the_pipeline(kind, tmp_path, synthetic_data):
    base = tiny_run_config()
    config = base.__class__(model=vae_config(kind, height=60, width=60), data=base.data,
                            train=base.train, preset="tiny")
    Trainer(config, tmp_path / "a", data=synthetic_data(config), progress_bar=False).run(max_steps=4)
    Trainer(config, tmp_path / "b", data=synthetic_data(config), progress_bar=False).run(max_steps=2)
    Trainer(config, tmp_path / "b", data=synthetic_data(config), resume=True,
            progress_bar=False).run(max_steps=4)
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pipe = AlignDrawPipeline.from_pretrained(tmp_path / "a")
    out = pipe(["the digit 1 is at the top left of the image ."], num_images_per_caption=2,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 1, 60, 60) and out.canvases.shape == (2, 2, 1, 60, 60)


# ------------------------------------------------------------------------------ report
def test_training_record_sums_training_time_without_pauses(tmp_path):
    lines = [{"step": 10, "epoch": 0, "time": 0.0, "split": "train"},
             {"step": 20, "epoch": 0, "time": 60.0, "split": "validation", "bound": 300.0},
             {"step": 30, "epoch": 1, "time": 5000.0, "split": "train"},  # resumed after a pause
             {"step": 40, "epoch": 1, "time": 5120.0, "split": "validation", "bound": 250.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    rec = training_record(tmp_path / "metrics.jsonl")
    assert rec["minutes"] == pytest.approx(3.0) and rec["steps"] == 40 and rec["epochs"] == 1
    assert training_record(tmp_path / "missing.jsonl") == {}


def _fake_eval(run_dir, bound, fidelity):
    metrics = {"nll": {g: {"count": 4, "bound": bound + i, "nll": 0.0, "kl": 0.0}
                       for i, g in enumerate(("all", "seen", "held_out"))},
               "fidelity": {g: {"count": 4, "fidelity": fidelity, "ceiling": 99.0}
                            for g in ("all", "seen", "held_out")}}
    (run_dir / "evaluation").mkdir()
    (run_dir / "evaluation" / "test.json").write_text(json.dumps(
        {"split": "test", "metrics": metrics, "definitions": {"nll": "one sample"}}))


def test_report_tables_one_row_per_model_and_a_figure_of_every_model(tmp_path, synthetic_data):
    runs = []
    for kind, bound, fid in (("aligndraw", 123.45, 50.0), ("fcvae", 234.56, 12.5)):
        base = tiny_run_config()
        config = base.__class__(model=vae_config(kind, height=60, width=60, steps=2),
                                data=base.data, train=base.train, preset="tiny")
        Trainer(config, tmp_path / kind, data=synthetic_data(config), progress_bar=False).run(max_steps=1)
        _fake_eval(tmp_path / kind, bound, fid)
        runs.append(tmp_path / kind)
    summaries = [load_run(r) for r in runs]
    assert [s.name for s in summaries] == ["alignDRAW", "fully-connected VAE"]
    table = main_table(summaries).splitlines()
    assert len(table) == 4 and "123.45" in table[2] and "234.56" in table[3]
    assert "50.0" in table[2] and "12.5" in table[3] and "–" in table[2]  # no retrieval run
    captions = ["the digit 1 is at the top left of the image .",  # seen compositions
                "the digit 3 is on the left of the digit 5 ."]
    md, figure = write_report(runs, tmp_path / "out" / "results.md", captions)
    text = md.read_text()
    assert "124.45" in text and "125.45" in text  # seen and held-out bounds
    assert "**nll**: test split, one sample (alignDRAW, fully-connected VAE)" in text
    assert f"]({figure.name})" in text
    from PIL import Image

    full = Image.open(figure)
    blank = torch.zeros(2, 1, 60, 60)
    layout = visualize.comparison_grid([("alignDRAW", blank), ("fully-connected VAE", blank)], captions)
    assert full.size == layout.size  # two model rows, two caption columns
    assert not np.array_equal(np.asarray(full), np.asarray(layout))  # samples, not blanks
    with pytest.raises(ValueError, match=r"\.md"):
        write_report(runs, tmp_path / "out" / "results.txt", captions)
    pipe = AlignDrawPipeline.from_pretrained(runs[0])  # the figure marks held-out captions
    assert pipe.is_held_out("the digit 8 is at the top left of the image .") is True
    assert pipe.is_held_out(captions[0]) is False and pipe.is_held_out("a red bus .") is None


def test_report_rejects_a_json_that_is_not_an_evaluation(tmp_path):
    from aligndraw.checkpoint import save_model_dir
    from aligndraw.config import RunConfig

    config = RunConfig(model=vae_config("fcvae"))
    save_model_dir(tmp_path / "best", build_model(config.model), mnist_vocabulary(), config, "card")
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not an `aligndraw evaluate --out` file"):
        load_run(tmp_path)


def test_comparison_grid_checks_its_rows():
    with pytest.raises(ValueError, match="2 captions"):
        visualize.comparison_grid([("m", torch.zeros(3, 1, 8, 8))], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        visualize.comparison_grid([], ["a"])
    img = visualize.comparison_grid([("m", torch.ones(2, 1, 8, 8)), ("n", torch.zeros(2, 1, 8, 8))],
                                    ["a", "b"], scale=2)
    strip_h = 8 * 2 + 2 * 2
    assert img.height > 2 * strip_h


def test_report_and_train_commands_name_bad_input(tmp_path, capsys):
    from aligndraw.checkpoint import save_model_dir
    from aligndraw.cli import main
    from aligndraw.config import RunConfig

    config = RunConfig(model=vae_config("convvae"))
    save_model_dir(tmp_path / "run" / "best", build_model(config.model), mnist_vocabulary(), config, "card")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.txt")]) == 2
    assert "must end in .md" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.md"),
                 "--notes", str(tmp_path / "missing.md")]) == 2
    assert "--notes" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.md"),
                 "--captions", "the digit 1 is at the top left of the image ."]) == 0
    assert "conv-deconv VAE" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r_samples.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "x"), "--model", "lstmvae"])
    assert "invalid choice" in capsys.readouterr().err
