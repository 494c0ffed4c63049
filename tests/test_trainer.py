import json

import pytest
import torch
from safetensors.torch import load_file

from aligndraw import gemm
from aligndraw.config import TrainConfig
from aligndraw.model import AlignDraw
from aligndraw.trainer import (
    PaperRMSprop,
    Progress,
    Trainer,
    Update,
    average_gradients,
    broadcast_parameters,
    clip_grad_norm_per_tensor,
    update_schedule,
)

from conftest import random_batch, tiny_config, tiny_run_config


def test_paper_rmsprop_matches_the_update_rule():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = PaperRMSprop([p], lr=0.1, decay=0.9, eps=1e-6)
    theta, cache = p.detach().clone(), torch.zeros(5)
    for _ in range(3):
        g = torch.randn(5)
        p.grad = g.clone()
        opt.step()
        cache = 0.9 * cache + 0.1 * g**2
        theta = theta - 0.1 * g / torch.sqrt(cache + 1e-6)
    torch.testing.assert_close(p.detach(), theta)


def test_clipping_is_per_tensor_not_global():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.full((4,), 10.0)  # norm 20 → scaled to 10
    b.grad = torch.full((4,), 1.0)  # norm 2 → untouched
    norms = clip_grad_norm_per_tensor([a, b], 10.0)
    torch.testing.assert_close(norms, torch.tensor([20.0, 2.0]))
    torch.testing.assert_close(a.grad.norm(), torch.tensor(10.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(b.grad, torch.ones(4))


def _update_steps(compiled: bool, lr_after: int = 2) -> tuple[list[torch.Tensor], int]:
    """Four updates of three tensors (one clipped every step), the rate cut after two."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((7, 5), (5,), (3, 4, 2))]
    frozen = torch.nn.Parameter(torch.randn(4))  # in a group, never given a gradient
    # two groups, the second also holding a parameter without a gradient
    groups = [{"params": params[:1]}, {"params": [frozen, *params[1:]]}]
    opt = PaperRMSprop(groups, lr=0.1, decay=0.9, eps=1e-6)
    update = Update(opt, clip_norm=1.5, compiled=compiled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    grads = torch.Generator().manual_seed(1)
    for step in range(4):
        if step == lr_after:
            opt.param_groups[0]["lr"] = 0.01
        for i, p in enumerate(params):  # fresh gradients each step, as after backward
            p.grad = torch.randn(p.shape, generator=grads) * (10.0 if i == 0 else 0.1)
        update()
    assert "cache" not in opt.state[frozen]
    return [p.detach() for p in params], torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_the_compiled_update_equals_the_eager_one_and_is_traced_once_per_rate():
    eager, no_graphs = _update_steps(compiled=False)
    compiled, graphs = _update_steps(compiled=True)
    # the first step eagerly; then one graph per learning rate (the rate is a constant in it)
    assert no_graphs == 0 and graphs == 2
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    start, _ = _update_steps(compiled=False, lr_after=0)
    assert not torch.allclose(start[0], eager[0])  # the rate cut changes the weights


def _aliased_or_not_update(aliased: bool, seed: int) -> list[torch.Tensor]:
    """Weights after three compiled updates; gradients views of one buffer (as a compiled
    model's backward leaves them) or tensors of their own."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((6, 5), (6,), (4, 3))]
    update = Update(PaperRMSprop(params, lr=0.1), clip_norm=1.0, compiled=True)
    grads = torch.Generator().manual_seed(seed)
    for step in range(3):
        flat = torch.randn(sum(p.numel() for p in params), generator=grads)  # (Σ numel,)
        pieces = flat.split([p.numel() for p in params])
        parts = [piece.view_as(p) for piece, p in zip(pieces, params, strict=True)]
        for p, part in zip(params, parts, strict=True):
            p.grad = part if aliased else part.clone()
        update()
        if step:  # compiled (the first step is eager, and clips in place): read, not written
            assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), flat)
    return [p.detach() for p in params]


def test_the_compiled_update_does_not_depend_on_how_gradients_alias():
    """A compiled model's gradients are views of shared buffers; the update must read them, not
    write them, and give the same weights for aliased gradients and gradients of their own,
    traced in either order (inductor's caches outlive ``reset``). A graph that wrote into
    aliased gradients once failed when served to unaliased ones in another process; that
    crash needed full-size models, so this test checks the writes, not the crash."""
    for first in (True, False):
        torch._dynamo.reset()
        a = _aliased_or_not_update(aliased=first, seed=3)
        torch._dynamo.reset()
        b = _aliased_or_not_update(aliased=not first, seed=3)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def _weights(run_dir):
    return load_file(str(run_dir / "last" / "model.safetensors"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, synthetic_data):
    config = tiny_run_config()
    straight = Trainer(config, tmp_path / "a", data=synthetic_data(config), progress_bar=False)
    straight.run(max_steps=4)
    first = Trainer(config, tmp_path / "b", data=synthetic_data(config), progress_bar=False)
    first.run(max_steps=2)
    resumed = Trainer(config, tmp_path / "b", data=synthetic_data(config), resume=True,
                      progress_bar=False)
    assert resumed.progress.step == 2
    resumed.run(max_steps=4)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # And the run really moved: weights differ from a 2-step run.
    two = Trainer(config, tmp_path / "c", data=synthetic_data(config), progress_bar=False)
    two.run(max_steps=2)
    assert any(not torch.equal(a[k], v) for k, v in _weights(tmp_path / "c").items())


def test_resume_across_an_epoch_boundary(tmp_path, synthetic_data):
    config = tiny_run_config()  # 48 scenes / batch 8 = 6 steps per epoch
    Trainer(config, tmp_path / "a", data=synthetic_data(config), progress_bar=False).run(max_steps=9)
    Trainer(config, tmp_path / "b", data=synthetic_data(config), progress_bar=False).run(max_steps=5)
    t = Trainer(config, tmp_path / "b", data=synthetic_data(config), resume=True, progress_bar=False)
    t.run(max_steps=9)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert t.progress.epoch == 1 and t.progress.batch_in_epoch == 3


def test_full_run_writes_metrics_checkpoints_grids_and_decays_lr(tmp_path, synthetic_data):
    config = tiny_run_config(epochs=3, checkpoint_every=4)
    trainer = Trainer(config, tmp_path, data=synthetic_data(config), progress_bar=False)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "validation"]
    train = [r for r in records if r["split"] == "train"]
    assert len(val) == 3 and len(train) == 18
    assert all({"loss", "nll", "kl", "img_per_s"} <= set(r) for r in train)
    for epoch in range(3):
        assert (tmp_path / "samples" / f"epoch_{epoch:03d}.png").stat().st_size > 0
    assert (tmp_path / "best" / "model.safetensors").exists()
    assert trainer.progress.epoch == 3
    assert [r["lr"] for r in val] == [trainer.progress.lr] * 3  # every epoch improved here
    assert not list(tmp_path.glob(".*tmp*")), "temporary directories left behind"


def test_restart_lr_resumes_weights_but_starts_the_rate_again(tmp_path, synthetic_data):
    config = tiny_run_config()
    first = Trainer(config, tmp_path, data=synthetic_data(config), progress_bar=False)
    first.run(max_steps=2)
    first.progress.lr, first.progress.bad_epochs = 1e-5, 1  # as if the rate had decayed
    first.save()
    exact = Trainer(config, tmp_path, data=synthetic_data(config), resume=True, progress_bar=False)
    assert exact.progress.lr == 1e-5 and exact.progress.bad_epochs == 1
    warm = Trainer(config, tmp_path, data=synthetic_data(config), resume=True, restart_lr=True,
                   progress_bar=False)
    assert warm.progress.lr == config.train.lr and warm.progress.bad_epochs == 0
    assert warm.progress.hold_until == warm.progress.epoch + config.train.lr_hold_epochs
    assert warm.progress.step == 2
    assert {g["lr"] for g in warm.optimizer.param_groups} == {config.train.lr}
    with pytest.raises(ValueError, match="only applies when resuming"):
        Trainer(config, tmp_path / "new", data=synthetic_data(config), restart_lr=True,
                progress_bar=False)


def test_compiled_training_follows_the_eager_run(tmp_path, synthetic_data):
    config = tiny_run_config()
    eager = Trainer(config, tmp_path / "eager", data=synthetic_data(config), progress_bar=False)
    eager.run(max_steps=3)
    compiled_config = tiny_run_config(compile=True)
    compiled = Trainer(compiled_config, tmp_path / "compiled", data=synthetic_data(compiled_config),
                       progress_bar=False)
    compiled.run(max_steps=3)
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    for k in a:  # same batches, same noise: the same weights up to float rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    records = [json.loads(line) for line in
               (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    compile_records = [r for r in records if r["split"] == "compile"]
    assert len(compile_records) == 1 and compile_records[0]["first_step_s"] > 0
    start = Trainer(config, tmp_path / "start", data=synthetic_data(config), progress_bar=False)
    assert any(not torch.equal(v, b[k]) for k, v in start.model.state_dict().items())


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, synthetic_data):
    config = tiny_run_config()
    with pytest.raises(ValueError, match="cannot resume"):
        Trainer(config, tmp_path, data=synthetic_data(config), resume=True, progress_bar=False)


def test_plateau_schedule_decays_after_patience_and_stops_at_min_lr():
    config = TrainConfig(lr=1e-3, lr_patience=2, lr_decay=0.1, min_lr=1e-5, lr_hold_epochs=0)
    p = Progress(lr=1e-3)
    seen = [(update_schedule(p, bound, config), p.lr)
            for bound in (100, 90, 95, 91, 92, 93, 80, 85, 86, 87, 88, 89, 90)]
    improved = [s[0] for s in seen]
    lrs = [s[1] for s in seen]
    assert improved == [True, True, False, False, False, False, True] + [False] * 6
    assert lrs[:3] == [1e-3] * 3
    assert lrs[3] == pytest.approx(1e-4)  # second epoch without improvement
    assert lrs[5] == pytest.approx(1e-5)  # two more
    assert lrs[-1] == pytest.approx(1e-5)  # never below min_lr
    assert p.best_val == 80


def test_no_decay_during_the_hold_epochs_then_patience_counts_from_there():
    config = TrainConfig(lr=1e-3, lr_patience=2, lr_decay=0.1, lr_hold_epochs=3)
    p = Progress(lr=1e-3)
    lrs = []
    for epoch, bound in enumerate((100, 101, 102, 103, 104, 105)):
        p.epoch = epoch
        update_schedule(p, bound, config)
        lrs.append(p.lr)
    # epochs 1 and 2 are bad but held; 3 and 4 are the first two that count
    assert lrs[:4] == [1e-3] * 4 and lrs[4] == pytest.approx(1e-4)


def test_a_warm_restart_holds_decay_again():
    config = TrainConfig(lr=1e-3, lr_patience=2, lr_decay=0.1, lr_hold_epochs=3)
    p = Progress(lr=1e-3, epoch=40, best_val=100.0, hold_until=43)  # restarted at epoch 40
    lrs = []
    for epoch, bound in zip(range(40, 46), (104, 103, 102, 101, 100.5, 100.2), strict=True):
        p.epoch = epoch
        update_schedule(p, bound, config)
        lrs.append(p.lr)
    # 40–42 are worse than the best but held; 43 and 44 count, so the rate decays at 44
    assert lrs[:4] == [1e-3] * 4 and lrs[4] == pytest.approx(1e-4)


def test_validation_is_deterministic(tmp_path, synthetic_data):
    config = tiny_run_config()
    trainer = Trainer(config, tmp_path, data=synthetic_data(config), progress_bar=False)
    assert trainer.validate() == trainer.validate()


def _six_image_problem(seed: int):
    """A float64 tiny model (weights from ``seed``) and a batch of 6: images, tokens, lengths, ε."""
    torch.manual_seed(seed)
    model = AlignDraw(tiny_config()).double()
    images, tokens, lengths = random_batch(tiny_config(), batch=6, seed=1)
    noise = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return model, (images.double(), tokens, lengths, noise)


def _half_batch_worker(rank: int, port: int, out: str) -> None:
    """One of two processes: rank 1 starts from other weights; broadcast, half the batch each,
    average the gradients; both save what they hold."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, batch = _six_image_problem(seed=rank)  # other weights on rank 1 until the broadcast
    broadcast_parameters(model)
    images, tokens, lengths, noise = (x[3 * rank: 3 * rank + 3] for x in batch)
    model(images, tokens, lengths, noise=noise).loss.backward()
    average_gradients(model.parameters(), 2)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()},
                "grads": {n: p.grad for n, p in model.named_parameters()}}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_average_to_the_full_batch_gradient(tmp_path):
    """Data parallel = the single-process step: rank 0's weights everywhere, and the averaged
    half-batch gradients equal the gradient of the mean loss over the whole batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_half_batch_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, (images, tokens, lengths, noise) = _six_image_problem(seed=0)
    model(images, tokens, lengths, noise=noise).loss.backward()
    for name, p in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["params"][name], p.detach(), rtol=0, atol=0)
            torch.testing.assert_close(rank["grads"][name], p.grad, rtol=1e-10, atol=1e-14)
    assert float(model.canvas0.grad.abs().max()) > 0  # the comparison is not between zeros


def test_bf16_on_a_cpu_without_native_bf16_products_is_warned_about(tmp_path, synthetic_data,
                                                                     monkeypatch, caplog):
    config = tiny_run_config(precision="bf16")
    monkeypatch.setattr(gemm, "cpu_bf16_native", lambda: False)
    with caplog.at_level("WARNING", logger="aligndraw.train"):
        Trainer(config, tmp_path / "slow", data=synthetic_data(config), progress_bar=False)
    assert any("no native bf16 matrix products" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(gemm, "cpu_bf16_native", lambda: True)
    with caplog.at_level("WARNING", logger="aligndraw.train"):
        Trainer(config, tmp_path / "fast", data=synthetic_data(config), progress_bar=False)
    assert not any("bf16" in r.getMessage() for r in caplog.records)


def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(tmp_path, synthetic_data, monkeypatch):
    from aligndraw import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or 1 << 30)
    config = tiny_run_config()
    monkeypatch.delenv(allocator.ENV, raising=False)
    first = Trainer(config, tmp_path / "a", data=synthetic_data(config), progress_bar=False)
    assert first.kept_freed_memory and calls == [1]
    monkeypatch.setenv(allocator.ENV, "0")
    second = Trainer(config, tmp_path / "b", data=synthetic_data(config), progress_bar=False)
    assert not second.kept_freed_memory and calls == [1]
