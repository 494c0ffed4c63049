"""The CUDA path: the same model, trainer, compiler and pipeline on a GPU.

CI has no GPU, so these run where one is lent (``benchmarks/cuda_check.sh``); each compares the
GPU's results with the CPU's or the naive reference's, not with fixed numbers.
"""

import json

import torch
from safetensors.torch import load_file

from aligndraw import compiler, trainer
from aligndraw.pipeline import AlignDrawPipeline
from aligndraw.trainer import Trainer

from conftest import needs_cuda, random_batch, relative_distance, tiny_config, tiny_run_config
from conftest import perturbed_model as _model
from reference import naive_forward

pytestmark = needs_cuda
CUDA = torch.device("cuda")


def _loss_and_grads(model, images, tokens, lengths, noise):
    out = model(images, tokens, lengths, noise=noise)
    return out, torch.autograd.grad(out.loss, list(model.parameters()))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cuda_float64_matches_the_naive_reference():
    config = tiny_config(height=10, width=12, read_n=3, write_n=4)
    model = _model(config).double().to(CUDA)
    images, tokens, lengths = (t.to(CUDA) for t in random_batch(config))
    images = images.double()
    noise = torch.randn(4, config.steps, config.z_dim, dtype=torch.float64).to(CUDA)
    out = model(images, tokens, lengths, noise=noise)
    nll, kl_steps, _ = naive_forward(model, images, tokens, lengths, noise)
    torch.testing.assert_close(out.nll, nll)
    torch.testing.assert_close(out.kl_steps, kl_steps)


def test_cuda_loss_gradients_and_samples_follow_the_cpu():
    config = tiny_config()
    cpu = _model(config)
    gpu = _model(config).to(CUDA)
    batch = random_batch(config)
    noise = torch.randn(4, config.steps, config.z_dim)
    want, want_grads = _loss_and_grads(cpu, *batch, noise)
    got, got_grads = _loss_and_grads(gpu, *(t.to(CUDA) for t in batch), noise.to(CUDA))
    assert got.loss.device.type == "cuda"
    torch.testing.assert_close(got.loss.cpu(), want.loss, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-5)
    tokens, lengths = batch[1], batch[2]
    with torch.no_grad():
        a = cpu.sample(tokens, lengths, noise=noise).images
        b = gpu.sample(tokens.to(CUDA), lengths.to(CUDA), noise=noise.to(CUDA)).images
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_a_cuda_generator_seed_gives_the_same_images():
    config = tiny_config()
    model = _model(config).to(CUDA)
    _, tokens, lengths = (t.to(CUDA) for t in random_batch(config))

    def draw(seed):
        with torch.no_grad():
            return model.sample(tokens, lengths, generator=torch.Generator(CUDA).manual_seed(seed)).images

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_bf16_autocast_on_cuda_follows_fp32():
    config = tiny_config()
    model = _model(config, scale=0.1).to(CUDA)
    images, tokens, lengths = (t.to(CUDA) for t in random_batch(config))
    noise = torch.randn(4, config.steps, config.z_dim, device=CUDA)
    ref, ref_grads = _loss_and_grads(model, images, tokens, lengths, noise)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = _loss_and_grads(model, images, tokens, lengths, noise)
    assert out.loss.dtype == torch.float32
    assert not torch.equal(out.loss, ref.loss)  # autocast did compute in bf16
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-3, atol=0)
    flat, ref_flat = _flat(grads), _flat(ref_grads)
    assert torch.isfinite(flat).all()
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.999


def test_the_compiled_model_on_cuda_stacks_its_sums_and_equals_the_eager_one(monkeypatch):
    torch._dynamo.reset()
    config = tiny_config()
    model = _model(config, scale=0.1).to(CUDA)
    batch = tuple(t.to(CUDA) for t in random_batch(config))
    noise = torch.randn(4, config.steps, config.z_dim, device=CUDA)
    want, want_grads = _loss_and_grads(model, *batch, noise)
    changed = []  # sums of products the graph pass rewrote, per compiled graph
    stack = compiler.stack_products
    monkeypatch.setattr(compiler, "stack_products", lambda graph, *rest: changed.append(stack(graph, *rest)))
    assert not compiler.on_cpu(model)
    with torch.compiler.config.patch(force_disable_caches=True):  # the pass runs, not a cache
        got, got_grads = _loss_and_grads(compiler.compile(model), *batch, noise)
    # the backward graph: at least the four step-shared weights and the context mix (as on the CPU)
    assert max(changed) >= 5
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert relative_distance(got_grads, want_grads) <= 1e-5
    scale = float(_flat(want_grads).abs().max())  # near-zero gradients differ by round-off only
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)


def _same_noise_on_every_device(monkeypatch) -> None:
    """The trainer's ε from one seeded CPU generator, moved to the batch's device: a CPU and a
    GPU run then see the same ε (each device's own generator gives different numbers)."""
    cpu = torch.Generator().manual_seed(0)
    monkeypatch.setattr(trainer, "standard_noise", lambda shape, noise, like, generator:
                        torch.randn(shape, generator=cpu).to(like.device))


def test_training_on_cuda_reaches_the_cpu_runs_weights_and_loads_on_the_cpu(tmp_path, synthetic_data,
                                                                            monkeypatch):
    config = tiny_run_config()
    _same_noise_on_every_device(monkeypatch)
    Trainer(config, tmp_path / "cpu", data=synthetic_data(config), progress_bar=False).run(max_steps=3)
    _same_noise_on_every_device(monkeypatch)
    gpu = Trainer(config, tmp_path / "gpu", data=synthetic_data(config), device="cuda",
                  progress_bar=False)
    assert next(gpu.model.parameters()).device.type == "cuda"
    gpu.run(max_steps=3)
    a = load_file(str(tmp_path / "cpu" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "gpu" / "last" / "model.safetensors"))  # saved from the GPU, read on the CPU
    assert a.keys() == b.keys()
    for k in a:  # same batches, same ε: the same weights up to rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
    init = Trainer(config, tmp_path / "init", data=synthetic_data(config), progress_bar=False).model
    assert any(not torch.equal(v, b[k]) for k, v in init.state_dict().items())  # and they moved
    losses = [r["loss"] for r in _records(tmp_path / "gpu") if r["split"] == "train"]
    assert len(losses) == 3 and all(abs(x) < 1e6 for x in losses)


def test_compiled_bf16_training_on_cuda_runs_and_saves_finite_weights(tmp_path, synthetic_data):
    torch._dynamo.reset()
    config = tiny_run_config(compile=True, precision="bf16")
    trainer = Trainer(config, tmp_path, data=synthetic_data(config), device="cuda", progress_bar=False)
    trainer.run(max_steps=3)
    records = _records(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 3 and all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e6 for r in train)
    assert [r for r in records if r["split"] == "compile"][0]["first_step_s"] > 0
    weights = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_the_bundled_model_generates_on_cuda_as_on_the_cpu():
    cpu = AlignDrawPipeline.from_pretrained("mnist-captions")
    gpu = AlignDrawPipeline.from_pretrained("mnist-captions", device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    caption = "the digit 3 is on the left of the digit 7 ."

    def draw(pipe, generator):
        return pipe(caption, num_images_per_caption=4, output_type="pt", generator=generator).images

    on_gpu = [draw(gpu, torch.Generator("cuda").manual_seed(0)) for _ in range(2)]
    assert torch.equal(on_gpu[0], on_gpu[1])  # a CUDA generator's seed repeats on the GPU
    # a CPU generator draws the same z for both devices: the same images, up to float rounding
    a = draw(cpu, torch.Generator().manual_seed(0))
    b = draw(gpu, torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 60, 60)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
