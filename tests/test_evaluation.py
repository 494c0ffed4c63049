"""Evaluation metrics on hand-made cases with known answers, and on tiny models."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aligndraw import compiler
from aligndraw import evaluation as ev
from aligndraw.baselines import build_model
from aligndraw.data.mnist_captions import CAPTION_KINDS, CaptionedMnist, CaptionedMnistConfig, parse_caption
from aligndraw.model import AlignDraw
from aligndraw.reader import (
    ImageReader,
    ReaderConfig,
    evaluate_reader,
    layout_accuracy,
    load_reader,
    read_layouts,
)
from aligndraw.text import encode_batch, mnist_vocabulary

from conftest import synthetic_digits, tiny_config


@pytest.fixture(scope="module")
def data():
    config = CaptionedMnistConfig(train_scenes_per_epoch=64, val_digits=200, val_scenes=16,
                                  test_scenes=120)
    return CaptionedMnist(config, train=synthetic_digits(600, 0), test=synthetic_digits(200, 1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A larger init than the paper's so that q differs from the prior and the bounds differ.
    return AlignDraw(tiny_config(height=60, width=60, steps=2, init_std=0.1)).eval()


class RealImages:
    """A stand-in generator whose 'samples' are the real images of the captions, in order."""

    def __init__(self, scenes, samples, steps=2, z_dim=4):
        self.config = SimpleNamespace(steps=steps, z_dim=z_dim)
        self.images = torch.from_numpy(scenes.images).repeat_interleave(samples, 0)
        self.done = 0

    def noise_shape(self, batch):
        return (batch, self.config.steps, self.config.z_dim)

    def sample(self, tokens, lengths, generator=None, noise=None, temperature=1.0, history=True):
        images = self.images[self.done:self.done + len(tokens)]
        self.done += len(tokens)
        return SimpleNamespace(images=images)


# ------------------------------------------------------------------------------ ranking
def test_true_image_scored_highest_gives_perfect_recall():
    scores = torch.rand(30, 100)
    scores[:, 0] = 2.0
    ranks = ev.ranks_of_first(scores)
    assert ranks.tolist() == [1] * 30
    r = ev.recall_summary(ranks, np.zeros(30, bool))["all"]
    assert r["R@1"] == r["R@5"] == r["R@50"] == 100.0 and r["med_r"] == 1


def test_true_image_scored_lowest_gives_worst_rank():
    scores = torch.rand(30, 100)
    scores[:, 0] = -1.0
    r = ev.recall_summary(ev.ranks_of_first(scores), np.zeros(30, bool))["all"]
    assert r["R@1"] == r["R@50"] == 0.0 and r["med_r"] == 100


def test_ties_count_against_the_true_image():
    assert ev.ranks_of_first(torch.zeros(2, 100)).tolist() == [100, 100]


def test_recall_summary_known_values_and_groups():
    ranks = torch.tensor([1, 2, 6, 60])
    held = np.array([False, True, False, True])
    r = ev.recall_summary(ranks, held, same_layout_at_1=torch.tensor([True, False, True, True]))
    assert r["all"] == {"count": 4, "R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "R@50": 75.0,
                        "med_r": 4.0, "same_layout@1": 75.0}
    assert r["seen"]["R@10"] == 100.0 and r["held_out"]["R@1"] == 0.0
    assert r["held_out"]["med_r"] == 31.0


def test_nearest_shortlists_put_the_query_first_then_its_neighbours():
    angles = torch.linspace(0, 3, 12)
    features = torch.stack([angles.cos(), angles.sin()], 1)  # points on an arc: order = angle
    lists = ev.nearest_shortlists(features, torch.tensor([0, 5]), size=3)
    assert lists.tolist() == [[0, 1, 2], [5, 4, 6]] or lists.tolist() == [[0, 1, 2], [5, 6, 4]]


def test_random_shortlists_are_distinct_seeded_and_start_with_the_query():
    queries = torch.arange(20)
    a = ev.random_shortlists(150, queries, 100, seed=3)
    assert torch.equal(a, ev.random_shortlists(150, queries, 100, seed=3))
    assert not torch.equal(a, ev.random_shortlists(150, queries, 100, seed=4))
    assert torch.equal(a[:, 0], queries)
    assert all(len(set(row.tolist())) == 100 for row in a)


# ------------------------------------------------------------------------------ SSIM
def test_ssim_of_an_image_with_itself_is_one():
    x = torch.rand(4, 1, 60, 60, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ev.ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert (ev.ssim(x, 1 - x) < 0.5).all()


def naive_ssim(x, y, size=11, sigma=1.5, c1=0.01 ** 2, c2=0.03 ** 2):
    """Wang et al. (2004) with a Gaussian window, 'valid' filtering (no padding), mean."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    w = torch.exp(-r ** 2 / (2 * sigma ** 2))
    w = (w[:, None] * w[None, :] / w.sum() ** 2)[None, None]  # (1, 1, 11, 11)
    x, y = x.double(), y.double()
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx, vy = F.conv2d(x * x, w) - mx ** 2, F.conv2d(y * y, w) - my ** 2
    cov = F.conv2d(x * y, w) - mx * my
    ssim_map = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim_map.mean((1, 2, 3))


def test_ssim_matches_a_naive_reference_and_scikit_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 60, 60, generator=g)
    y = 0.5 * x + 0.5 * torch.rand(2, 1, 60, 60, generator=g)
    assert torch.allclose(ev.ssim(y, x), naive_ssim(y, x), atol=1e-5)
    # skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=1) on the same pairs (scikit-image 0.26.0):
    assert ev.ssim(y, x).tolist() == pytest.approx([0.6559275173271062, 0.6578262432900236], abs=1e-5)


def test_ssim_scores_of_the_real_images_are_one(data):
    scenes = data.test()
    result = ev.ssim_scores(RealImages(scenes.subset(slice(0, 10)), 3), scenes, data.vocab,
                            samples=3, max_captions=10, batch_size=4)
    assert result["all"]["count"] == 10
    assert result["seen"]["count"] + result["held_out"]["count"] == 10
    assert result["all"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert result["all"]["std"] == pytest.approx(0.0, abs=1e-5)


def test_ssim_scores_of_a_model_are_seeded(data, model):
    a = ev.ssim_scores(model, data.test(), data.vocab, samples=2, max_captions=6, seed=1)
    b = ev.ssim_scores(model, data.test(), data.vocab, samples=2, max_captions=6, seed=1)
    assert a == b and -1 <= a["all"]["mean"] <= 1


# ------------------------------------------------------------------------------ bounds
def test_iwae_with_one_sample_is_the_one_sample_bound_on_the_same_noise(data, model):
    scenes = data.test().subset(slice(0, 24))
    iwae = ev.per_image_iwae(model, scenes, data.vocab, k=1, batch_size=8, seed=5)
    plain = ev.per_image_bound(model, scenes, data.vocab, batch_size=8, seed=5)
    assert torch.allclose(iwae["bound"], plain["bound"])
    g = torch.Generator().manual_seed(5)
    tokens, lengths = encode_batch(data.vocab, scenes.captions[:8])
    out = model(torch.from_numpy(scenes.images[:8]), tokens, lengths, generator=g, log_weight=True)
    assert torch.allclose(iwae["iwae"][:8], -out.log_weight.double(), rtol=1e-6)
    assert torch.equal(iwae["held_out"], torch.from_numpy(scenes.held_out))


def test_iwae_is_tighter_than_the_bound_on_average(data, model):
    result = ev.iwae_bound(model, data.test().subset(slice(0, 16)), data.vocab, k=20,
                           batch_size=64, seed=0)
    r = result["all"]
    assert r["count"] == 16 and r["iwae"] < r["bound"] and r["gap"] > 0


def test_lower_bound_keeps_the_trainer_interface(data, model):
    result = ev.lower_bound(model, data.test(), data.vocab, batch_size=50, max_batches=1)
    assert result["all"]["count"] == 50
    assert result["all"]["bound"] == pytest.approx(result["all"]["nll"] + result["all"]["kl"])


# ------------------------------------------------------------------------------ retrieval
def test_mean_sentence_is_the_mean_of_per_caption_word_means(data, model):
    captions = ["the digit 1 is at the top left of the image .",
                "the digit 3 is on the left of the digit 5 ."]
    tokens, lengths = encode_batch(data.vocab, captions)
    with torch.no_grad():
        h = model.encoder(tokens, lengths)
    expected = (h[0, : lengths[0]].mean(0) + h[1, : lengths[1]].mean(0)) / 2
    assert torch.allclose(ev.mean_sentence(model, captions, data.vocab, batch_size=1), expected, atol=1e-6)


def test_retrieval_end_to_end_on_a_tiny_model(data, model):
    reader = ImageReader(ReaderConfig(channels=(4, 8), features=8)).eval()
    kwargs = dict(samples=2, shortlist=20, max_captions=6, seed=0, batch_size=64)
    train = data.train_epoch(0).captions
    a = ev.retrieval(model, data.test(), data.vocab, reader, train, **kwargs)
    assert set(a) == {"retrieval_nn", "retrieval_random"}
    for result in a.values():
        r = result["all"]
        assert r["count"] == 6 and 1 <= r["med_r"] <= 20
        assert r["R@1"] <= r["R@5"] <= r["R@10"] <= r["R@50"] == 100.0
        assert result["seen"]["count"] + result["held_out"]["count"] == 6
    assert a == ev.retrieval(model, data.test(), data.vocab, reader, train, **kwargs)
    with pytest.raises(ValueError, match="shortlist"):
        ev.retrieval(model, data.test(), data.vocab, reader, train, shortlist=500)


# ------------------------------------------------------------------------------ compiled
def _fixed_shapes(data, model) -> compiler.FixedShapes:
    """A new compiled wrapper of ``model``, Dynamo's caches emptied first (a test process
    compiles many models; each code object takes only so many graphs)."""
    torch._dynamo.reset()
    longest = encode_batch(data.vocab, data.test().captions)[0].shape[1]
    return compiler.FixedShapes(model, words=longest + 2)  # every call's captions padded


def _new_graphs(run):
    """run()'s result and how many graphs Dynamo compiled meanwhile."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    out = run()
    return out, counters["stats"]["unique_graphs"] - before


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_compiled_bounds_iwae_and_retrieval_share_one_graph_and_equal_eager(data, model):
    compiled = _fixed_shapes(data, model)
    scenes = data.test()  # 120 scenes: batches of 50, 50 and 20

    def evaluate(m):
        bound = ev.per_image_bound(m, scenes, data.vocab, batch_size=50, seed=3)
        iwae = ev.per_image_iwae(m, scenes.subset(slice(0, 12)), data.vocab, k=3, batch_size=8, seed=1)
        tokens, lengths = encode_batch(data.vocab, scenes.captions[:5])
        with torch.no_grad():
            h_lang = model.encoder(tokens, lengths)  # (5, L, D2)
        y_bar = ev.mean_sentence(model, scenes.captions, data.vocab)[None, None]  # (1, 1, D2): one word
        noise = torch.randn(model.noise_shape(2), generator=torch.Generator().manual_seed(0))
        common = (scenes.image_pool(), torch.arange(7))
        retrieval = [ev._mean_bounds(m, *common, h_lang, lengths, torch.arange(7) % 5, noise,
                                     torch.device("cpu"), 4),
                     ev._mean_bounds(m, *common, y_bar, torch.ones(1, dtype=torch.long),
                                     torch.zeros(7, dtype=torch.long), noise, torch.device("cpu"), 4)]
        return bound, iwae, retrieval

    want = evaluate(model)
    got, graphs = _new_graphs(lambda: evaluate(compiled))
    assert graphs == 1  # smaller batches, other caption lengths, given caption states: one graph
    assert [(g, rows) for g, rows, _ in compiled.compile_seconds] == [("forward", 50)]
    for name in ("bound", "nll", "kl"):
        _close(got[0][name], want[0][name])
    assert torch.equal(got[0]["held_out"], want[0]["held_out"])
    for name in ("iwae", "bound"):
        _close(got[1][name], want[1][name])
    for g, w in zip(got[2], want[2], strict=True):
        _close(g, w)


def test_compiled_samples_equal_the_eager_ones_one_graph_with_canvases_and_one_without(data, model):
    compiled = _fixed_shapes(data, model)
    tokens, lengths = encode_batch(data.vocab, data.test().captions[:3])

    def draw(m, rows, history, temperature):
        return m.sample(tokens[:rows], lengths[:rows], generator=torch.Generator().manual_seed(4),
                        history=history, temperature=temperature)

    calls = [(3, True, 1.0), (3, False, 1.0), (3, False, 0.5), (2, False, 0.0)]
    got, graphs = _new_graphs(lambda: [draw(compiled, *c) for c in calls])
    assert graphs == 2  # other temperatures and fewer rows: no graph of their own
    assert [(g, rows) for g, rows, _ in compiled.compile_seconds] == [("sample with canvases", 3),
                                                                      ("sample", 3)]
    for g, call in zip(got, calls, strict=True):
        w = draw(model, *call)
        assert g.alignments.shape == w.alignments.shape  # (B, T, L), the call's B and L
        assert (g.canvases is None) == (w.canvases is None)
        for name in ("images", "canvases", "alignments", "write_windows"):
            if getattr(w, name) is not None:
                torch.testing.assert_close(getattr(g, name), getattr(w, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fcvae", "convvae"])
def test_compiled_caption_vaes_equal_the_eager_ones(data, kind):
    torch.manual_seed(0)
    vae = build_model(tiny_config(model=kind, height=60, width=60, init_std=0.1)).eval()
    compiled = _fixed_shapes(data, vae)
    scenes = data.test().subset(slice(0, 20))
    want = ev.per_image_iwae(vae, scenes, data.vocab, k=2, batch_size=16, seed=2)
    got = ev.per_image_iwae(compiled, scenes, data.vocab, k=2, batch_size=16, seed=2)
    for name in ("iwae", "bound"):
        _close(got[name], want[name])
    _check_samples(vae, compiled, data)


def _check_samples(model, compiled, data):
    """Samples of 3 captions, then of 2 (padded into the first call's rows) at temperature
    0.5, equal to the eager model's."""
    tokens, lengths = encode_batch(data.vocab, data.test().captions[:3])
    g = torch.Generator()
    for rows, temperature in ((3, 1.0), (2, 0.5)):
        args = (tokens[:rows], lengths[:rows])
        kwargs = dict(history=False, temperature=temperature)
        want = model.sample(*args, generator=g.manual_seed(1), **kwargs).images
        got = compiled.sample(*args, generator=g.manual_seed(1), **kwargs).images
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["noalign", "sentvec"])
def test_compiled_noalign_and_sentvec_equal_the_eager_ones(data, kind):
    torch.manual_seed(0)
    draw = build_model(tiny_config(model=kind, height=60, width=60, steps=2, init_std=0.1)).eval()
    compiled = _fixed_shapes(data, draw)
    scenes = data.test().subset(slice(0, 24))
    want = ev.per_image_bound(draw, scenes, data.vocab, batch_size=16, seed=2)
    got, graphs = _new_graphs(lambda: ev.per_image_bound(compiled, scenes, data.vocab,
                                                         batch_size=16, seed=2))
    assert graphs == 1  # the encoder (sentvec's packed GRU too) runs before the graph
    for name in ("bound", "nll", "kl"):
        _close(got[name], want[name])
    _check_samples(draw, compiled, data)  # sentvec's sample graph is split at its encoder


def test_a_compiled_model_refuses_captions_longer_than_it_pads_to(data, model):
    compiled = compiler.FixedShapes(model, words=4)  # compiles nothing: the check comes first
    tokens = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="pads captions to 4 words"):
        compiled.sample(tokens, torch.full((2,), 5))
    with pytest.raises(ValueError, match="at least 1"):
        compiler.FixedShapes(model, words=0)
    assert not compiler.FixedShapes(model.train(), words=4).model.training  # traced in eval mode
    assert not hasattr(compiler.FixedShapes.__new__(compiler.FixedShapes), "words")  # no KeyError
    duplicate = copy.copy(compiled)  # asks for __setstate__ before it has a model
    assert duplicate.model is model and duplicate.noise_shape(2) == model.noise_shape(2)


def test_padding_rows_repeats_the_first_padding_words_appends_zeros_and_packing_sets_strides():
    t = torch.arange(6.0).view(3, 2)
    assert torch.equal(compiler.pad_rows(t, 5), torch.tensor([[0, 1], [2, 3], [4, 5], [0, 1], [0, 1.0]]))
    assert compiler.pad_rows(t, 3) is t
    tokens = torch.tensor([[3, 4], [5, 0]])
    assert torch.equal(compiler.pad_words(tokens, 4), torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]]))
    states = torch.ones(2, 1, 3)
    padded = compiler.pad_words(states, 3)
    assert padded.shape == (2, 3, 3) and torch.equal(padded[:, :1], states) and not padded[:, 1:].any()
    odd = torch.arange(32.0).view(2, 4, 4, 1).permute(0, 3, 1, 2)  # (2, 1, 4, 4), stride 1 on dim 1
    assert odd.is_contiguous() and odd.stride() != (16, 16, 4, 1)
    assert compiler.packed(odd).stride() == (16, 16, 4, 1) and torch.equal(compiler.packed(odd), odd)
    assert compiler.packed(t) is t
    with pytest.raises(ValueError, match="cannot pad 3 rows to 2"):
        compiler.pad_rows(t, 2)
    with pytest.raises(ValueError, match="cannot pad 2 words to 1"):
        compiler.pad_words(tokens, 1)
    with pytest.raises(ValueError, match=r"\(B, L\) or caption states \(B, L, D2\), got shape \(2,\)"):
        compiler.pad_words(torch.ones(2), 3)


# ------------------------------------------------------------------------------ fidelity
@pytest.mark.realdata
def test_fidelity_of_the_real_images_equals_the_reader_accuracy(mnist_dir):
    scenes = CaptionedMnist(source=mnist_dir).test().subset(slice(0, 400))
    reader = load_reader()
    result = ev.caption_fidelity(RealImages(scenes, 1), reader, scenes, mnist_vocabulary(),
                                 samples=1, batch_size=64)
    accuracy = evaluate_reader(reader, scenes)
    for group in ("all", "seen", "held_out"):
        assert result[group]["fidelity"] == pytest.approx(accuracy[group]["exact"])
        assert result[group]["ceiling"] == pytest.approx(accuracy[group]["exact"])
    assert result["all"]["fidelity"] > 90
    # One row per caption kind and group: real images score their own ceiling there too, and
    # the rows split the captions exactly.
    kinds = {k: v for k, v in result.items() if ", " in k}
    assert {k.split(", ")[0] for k in kinds} == set(CAPTION_KINDS)
    assert sum(v["count"] for v in kinds.values()) == 400
    for name, row in kinds.items():
        assert row["fidelity"] == pytest.approx(row["ceiling"]), name
    left = [i for i, c in enumerate(scenes.captions) if parse_caption(c).kind == 0]
    real = read_layouts(reader, scenes.images[left])
    wanted = torch.from_numpy(scenes.layouts[left])
    expected = layout_accuracy(real, wanted, scenes.held_out[left])
    assert result[f"{CAPTION_KINDS[0]}, seen"]["fidelity"] == pytest.approx(expected["seen"]["exact"])


def test_fidelity_of_a_tiny_model_is_a_share(data, model):
    reader = ImageReader(ReaderConfig(channels=(4, 8), features=8)).eval()
    result = ev.caption_fidelity(model, reader, data.test(), data.vocab, samples=2, max_captions=10)
    assert result["all"]["count"] == 20
    assert all(0 <= result[g]["fidelity"] <= 100 for g in ("all", "seen", "held_out"))
    kinds = {k: v for k, v in result.items() if ", " in k}
    assert sum(v["count"] for v in kinds.values()) == 20
    hits = sum(v["fidelity"] * v["count"] for v in kinds.values()) / 100
    assert hits == pytest.approx(result["all"]["fidelity"] * 20 / 100)


# ------------------------------------------------------------------------------ report
def test_markdown_table_has_a_row_per_group_and_the_note():
    results = {"ssim": {"all": {"count": 3, "mean": 0.156, "std": 0.02},
                        "seen": {"count": 2, "mean": 0.2, "std": 0.01},
                        "held_out": {"count": 1, "mean": 0.1, "std": 0.0}}}
    table = ev.markdown_table(results, ev.metric_notes())
    assert "### ssim" in table and "| held_out | 1 | 0.100 | 0.000 |" in table
    assert "torchmetrics" in table
