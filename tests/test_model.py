import pytest
import torch

from aligndraw import step_kernels
from aligndraw.model import AlignDraw

from conftest import needs_step_kernels, perturbed_model, random_batch, tiny_config
from reference import naive_forward


def _model(config, seed=0, scale=0.3):
    return perturbed_model(config, seed, scale).double()


@pytest.mark.parametrize("kind", ["aligndraw", "noalign"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [{}, {"height": 10, "width": 12, "read_n": 3, "write_n": 4}])
def test_forward_matches_naive_reference_loss_and_gradients(kind, channels, shape):
    config = tiny_config(model=kind, channels=channels, **shape)
    model = _model(config)
    images, tokens, lengths = random_batch(config)
    images = images.double()
    noise = torch.randn(4, config.steps, config.z_dim, dtype=torch.float64)
    out = model(images, tokens, lengths, noise=noise, log_weight=True)
    nll, kl_steps, log_weight = naive_forward(model, images, tokens, lengths, noise)
    torch.testing.assert_close(out.nll, nll)
    torch.testing.assert_close(out.kl_steps, kl_steps)
    torch.testing.assert_close(out.log_weight, log_weight)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    ref_grads = torch.autograd.grad((nll + kl_steps.sum(1)).mean(), list(model.parameters()),
                                    allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_shapes_and_finite_terms(tiny):
    model = AlignDraw(tiny)
    images, tokens, lengths = random_batch(tiny)
    out = model(images, tokens, lengths, generator=torch.Generator().manual_seed(0))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.nll.shape == (4,) and out.kl.shape == (4,) and out.kl_steps.shape == (4, 3)
    assert (out.kl_steps > -1e-5).all()  # KL ≥ 0 up to float32 round-off
    torch.testing.assert_close(out.bound, out.nll + out.kl)


@pytest.mark.parametrize("kind", ["aligndraw", "noalign"])
def test_gradients_reach_every_parameter(kind):
    config = tiny_config(model=kind)
    model = _model(config).float()
    images, tokens, lengths = random_batch(config)
    model(images, tokens, lengths, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_padding_does_not_change_the_bound(tiny):
    model = _model(tiny).float()
    images, tokens, lengths = random_batch(tiny)
    noise = torch.randn(4, tiny.steps, tiny.z_dim)
    extra = torch.cat([tokens, torch.zeros(4, 3, dtype=torch.long)], 1)
    a = model(images, tokens, lengths, noise=noise)
    b = model(images, extra, lengths, noise=noise)
    torch.testing.assert_close(a.loss, b.loss)


def test_caption_changes_the_bound_and_samples(tiny):
    model = _model(tiny).float()
    images, tokens, lengths = random_batch(tiny)
    noise = torch.randn(4, tiny.steps, tiny.z_dim)
    other = tokens.flip(0)
    assert not torch.allclose(model(images, tokens, lengths, noise=noise).nll,
                              model(images, other, lengths.flip(0), noise=noise).nll)


def test_sample_shapes_ranges_and_seeded_determinism(tiny):
    model = _model(tiny).float()
    _, tokens, lengths = random_batch(tiny)
    s1 = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(7))
    s2 = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(7))
    s3 = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(8))
    assert s1.images.shape == (4, 1, 12, 12)
    assert s1.canvases.shape == (4, 4, 1, 12, 12)
    assert s1.alignments.shape == (4, 3, 6) and s1.write_windows.shape == (4, 3, 4)
    assert s1.images.min() >= 0 and s1.images.max() <= 1
    torch.testing.assert_close(s1.images, s1.canvases[:, -1])
    torch.testing.assert_close(s1.alignments.sum(-1), torch.ones(4, 3))
    assert torch.equal(s1.images, s2.images)
    assert not torch.equal(s1.images, s3.images)
    # Padding positions receive no attention.
    mask = torch.arange(6)[None] < lengths[:, None]
    assert (s1.alignments.permute(1, 0, 2)[:, ~mask] == 0).all()
    # history=False: the same images (the T writes summed in one product: another order of
    # fp32 additions) and alignments, no per-step canvases.
    s4 = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(7), history=False)
    assert s4.canvases is None
    torch.testing.assert_close(s4.images, s1.images, rtol=1e-5, atol=1e-6)
    assert torch.equal(s4.alignments, s1.alignments)
    assert torch.equal(s4.write_windows, s1.write_windows)


def test_sample_uses_the_prior_not_the_encoder(tiny):
    model = _model(tiny).float()
    _, tokens, lengths = random_batch(tiny)
    g = torch.Generator().manual_seed(0)
    before = model.sample(tokens, lengths, generator=g).images
    with torch.no_grad():
        model.enc_lstm.weight_ih.add_(1.0)
        model.posterior.weight.add_(1.0)
    after = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(before, after)


def test_noise_shape_is_checked(tiny):
    model = AlignDraw(tiny)
    images, tokens, lengths = random_batch(tiny)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(images, tokens, lengths, noise=torch.zeros(4, 2, 2))


def test_paper_initialisation(tiny):
    model = AlignDraw(tiny)
    assert torch.all(model.canvas0 == tiny.canvas_init)
    assert model.write_patch.bias.abs().sum() == 0
    assert 0.005 < model.enc_lstm.weight_hh.std() < 0.015


def test_given_caption_states_replace_the_encoder(tiny):
    model = _model(tiny).float()
    images, tokens, lengths = random_batch(tiny)
    noise = torch.randn(4, tiny.steps, tiny.z_dim)
    h_lang = model.encoder(tokens, lengths)
    a = model(images, tokens, lengths, noise=noise)
    b = model(images, tokens, lengths, noise=noise, h_lang=h_lang)
    torch.testing.assert_close(a.loss, b.loss)
    mean_state = h_lang.mean((0, 1), keepdim=True).expand(4, 1, -1)  # one-"word" caption ȳ
    ones = torch.ones(4, dtype=torch.long)
    c = model(images, tokens[:, :1], ones, noise=noise, h_lang=mean_state)
    assert not torch.allclose(a.nll, c.nll)


@pytest.mark.parametrize("kind", ["aligndraw", "noalign"])
def test_bf16_autocast_bound_and_gradients_follow_fp32(kind):
    config = tiny_config(model=kind)
    model = _model(config, scale=0.1).float()
    images, tokens, lengths = random_batch(config)
    noise = torch.randn(4, config.steps, config.z_dim)
    params = list(model.parameters())
    ref = model(images, tokens, lengths, noise=noise)
    ref_grads = torch.autograd.grad(ref.loss, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, tokens, lengths, noise=noise)
    grads = torch.autograd.grad(out.loss, params)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=0)
    flat, ref_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
    assert all(g.dtype == torch.float32 for g in grads) and torch.isfinite(flat).all()
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.9999


KERNELS = ("context", "scores", "lstm", "prior_sample", "posterior_kl", "attend")


def _kernel_calls(monkeypatch):
    """Count the model's calls of each step kernel."""
    calls = dict.fromkeys(KERNELS, 0)
    for name in calls:
        real = getattr(step_kernels, name)

        def counted(*args, name=name, real=real):
            calls[name] += 1
            return real(*args)
        monkeypatch.setattr(step_kernels, name, counted)
    return calls


def _without_kernels(monkeypatch, fn):
    """fn() with PyTorch's ops in place of the step kernels (ALIGNDRAW_STEP_KERNELS=0)."""
    monkeypatch.setenv(step_kernels.ENV, "0")
    step_kernels._load.cache_clear()
    try:
        return fn()
    finally:
        monkeypatch.delenv(step_kernels.ENV)
        step_kernels._load.cache_clear()


def _float_case(config, monkeypatch):
    """An fp32 model, a batch, posterior noise and the step kernels' call counts."""
    model = _model(config).float()
    images, tokens, lengths = random_batch(config)
    noise = torch.randn(4, config.steps, config.z_dim)
    return model, (images, tokens, lengths), noise, _kernel_calls(monkeypatch)


@needs_step_kernels
def test_sampling_and_evaluation_take_the_step_kernels_with_pytorch_ops_results(tiny, monkeypatch):
    model, (images, tokens, lengths), noise, calls = _float_case(tiny, monkeypatch)
    fused = model.sample(tokens, lengths, generator=torch.Generator().manual_seed(3))
    # one of each a drawing step (the first step's prior is N(0, I), without the kernel), and
    # every step's write windows in one attend after the loop
    t = tiny.steps
    assert calls == {"context": t, "scores": 0, "lstm": t, "prior_sample": t - 1, "posterior_kl": 0,
                     "attend": 1}
    with torch.no_grad():
        fused_loss = model(images, tokens, lengths, noise=noise)
    # evaluation's forward: the context and both cells each step, the posterior and its KL, and
    # the windows (read and write of the same size: one attend a step, and h_dec_0's read)
    assert calls == {"context": 2 * t, "scores": 0, "lstm": 3 * t, "prior_sample": t - 1,
                     "posterior_kl": t, "attend": 1 + t + 1}
    plain = _without_kernels(monkeypatch, lambda: model.sample(
        tokens, lengths, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        plain_loss = _without_kernels(monkeypatch, lambda: model(images, tokens, lengths, noise=noise))
    assert calls["lstm"] == 3 * t  # none more
    torch.testing.assert_close(fused.alignments, plain.alignments, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.canvases, plain.canvases, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.write_windows, plain.write_windows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_loss.nll, plain_loss.nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_loss.kl_steps, plain_loss.kl_steps, rtol=1e-5, atol=1e-5)


@needs_step_kernels
@pytest.mark.parametrize("shape", [{}, {"read_n": 3, "write_n": 4}, {"model": "noalign"}])
def test_training_takes_the_step_kernels_with_pytorch_ops_loss_and_gradients(shape, monkeypatch):
    """One attend a step, or two (grids of two sizes); noalignDRAW's one context share in every
    step's cell (no scores)."""
    config = tiny_config(**shape)
    model, (images, tokens, lengths), noise, calls = _float_case(config, monkeypatch)
    params = list(model.parameters())
    out = model(images, tokens, lengths, noise=noise)
    grads = torch.autograd.grad(out.loss, params)
    t, windows = config.steps, 1 if config.read_n == config.write_n else 2
    scores = t if config.model == "aligndraw" else 0
    # the alignment's scores, both cells, the posterior and its KL, and the windows, with their
    # gradients
    assert calls == {"context": 0, "scores": scores, "lstm": 2 * t, "prior_sample": 0,
                     "posterior_kl": t, "attend": 1 + windows * (t - 1) + 1}
    plain = _without_kernels(monkeypatch, lambda: model(images, tokens, lengths, noise=noise))
    plain_grads = torch.autograd.grad(plain.loss, params)
    assert calls["lstm"] == 2 * t  # none more
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl_steps, plain.kl_steps, rtol=1e-5, atol=1e-5)
    for (name, _), g, want in zip(model.named_parameters(), grads, plain_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@needs_step_kernels
def test_importance_weights_keep_pytorch_ops_for_the_posterior(tiny, monkeypatch):
    model, (images, tokens, lengths), noise, calls = _float_case(tiny, monkeypatch)
    with torch.no_grad():
        out = model(images, tokens, lengths, noise=noise, log_weight=True)
    # the posterior's sample and KL in PyTorch's ops (the log-ratios need μ_q and σ_q), both cells not
    assert calls["posterior_kl"] == 0 and calls["lstm"] == 2 * tiny.steps
    with torch.no_grad():
        plain = _without_kernels(monkeypatch, lambda: model(images, tokens, lengths, noise=noise,
                                                             log_weight=True))
    torch.testing.assert_close(out.log_weight, plain.log_weight, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.kl_steps, plain.kl_steps, rtol=1e-5, atol=1e-5)
