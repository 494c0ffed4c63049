"""Training loop: the paper's optimiser, plateau decay, checkpoints, exact resume, data parallel.

    run → (per epoch) train_epoch → train_step → validate → save

The optimiser is the authors' RMSProp (no momentum, ε inside the square root) after clipping
each parameter tensor's gradient norm at 10; Adam is an option. The learning rate is divided
by 10 when the validation bound stops improving. A checkpoint (``last/``: model directory plus
``trainer_state.pt``) is written atomically every ``checkpoint_every`` steps and at the end;
``best/`` holds the model with the best validation bound. Resuming restores weights,
optimiser, schedule, data position and every random stream, so a resumed run takes exactly the
same steps as an uninterrupted one. Under ``torchrun`` every process holds a replica (rank 0's
weights, broadcast at the start), draws its own shard of every epoch, and the gradients are
averaged by one all-reduce of one flat buffer after each backward pass (gloo on CPU, nccl on
CUDA; ``average_gradients``); only rank 0 logs and writes.

The data is whatever ``config.data`` names (captioned MNIST or COCO, through the one
:class:`aligndraw.data.CaptionDataset` interface). The vocabulary comes from the data: when
its size differs from ``model.vocab_size`` (the coco32 preset's is the paper's), the config
is corrected before the model is built, and the run's config records the real size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from aligndraw import allocator, compiler, gemm, visualize
from aligndraw.baselines import build_model
from aligndraw.checkpoint import fill_model_dir, model_card, save_model_dir, write_dir_atomically
from aligndraw.config import RunConfig, TrainConfig
from aligndraw.data import Batch, BatchPlan, CaptionDataset, make_dataset
from aligndraw.evaluation import lower_bound
from aligndraw.model import standard_noise
from aligndraw.sentence_vectors import SentenceVectorEncoder, train_sentence_encoder
from aligndraw.text import encode_batch

log = logging.getLogger("aligndraw.train")
STATE_NAME = "trainer_state.pt"


class PaperRMSprop(torch.optim.Optimizer):
    """RMSProp as in the authors' code: cache ← ρ·cache + (1−ρ)·g², θ ← θ − lr·g/√(cache + ε)."""

    def __init__(self, params, lr: float = 1e-3, decay: float = 0.9, eps: float = 1e-6) -> None:
        super().__init__(params, {"lr": lr, "decay": decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None, grad_scales: list[torch.Tensor] | None = None):
        """One update. ``grad_scales``: a 0-d factor per parameter with a gradient (in
        ``param_groups`` order) to use the gradients multiplied by, without writing them."""
        offset = 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if grad_scales is not None:
                grads = torch._foreach_mul(grads, grad_scales[offset:offset + len(params)])
                offset += len(params)
            for p in params:  # made once (a zeros_like in setdefault's argument ran every step)
                if "cache" not in self.state[p]:
                    self.state[p]["cache"] = torch.zeros_like(p)
            caches = [self.state[p]["cache"] for p in params]
            torch._foreach_mul_(caches, group["decay"])
            torch._foreach_addcmul_(caches, grads, grads, value=1 - group["decay"])
            denom = torch._foreach_add(caches, group["eps"])
            torch._foreach_sqrt_(denom)
            torch._foreach_addcdiv_(params, grads, denom, value=-group["lr"])


def clip_scales(grads: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The gradients' norms (n,) and the factor that brings each to norm ≤ max_norm (0-d each)."""
    norms = torch.stack(torch._foreach_norm(grads))  # (n,)
    return norms, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind())


def clip_grad_norm_per_tensor(params, max_norm: float) -> torch.Tensor:
    """Scale each tensor's gradient to norm ≤ max_norm separately; returns the norms (before)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms, scales = clip_scales(grads, max_norm)
    torch._foreach_mul_(grads, scales)
    return norms


def average_gradients(params, world_size: int) -> None:
    """Replace every process's gradients by their mean over the processes, in place.

    One all-reduce of one flat buffer: a step's gradients (2.9M values for mnist-captions)
    travel in a single message, and the compiled training step stays one graph (no hooks
    inside backward, as DistributedDataParallel would add). Every rank must pass the same
    parameters; one without a gradient contributes zeros (and gets them).
    """
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    dist.all_reduce(flat)
    flat /= world_size
    parts = flat.split([g.numel() for g in grads])
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads, strict=True)])


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s parameters and buffers, in place (once per run)."""
    for t in (*module.parameters(), *module.buffers()):
        dist.broadcast(t, src)


class Update:
    """After backward: clip each gradient tensor to norm ≤ ``clip_norm``, then step.

    ``compiled`` (``PaperRMSprop`` only): the clip and the step run under ``torch.compile``,
    which fuses each tensor's foreach operations (the norm; the cache's decay and g²;
    √(cache + ε); the weight update) into a few loops over it, instead of a pass over memory
    per operation and a new tensor for the denominators. There the gradients are only read,
    scaled inside the update (``PaperRMSprop.step(grad_scales=…)``), not clipped in place:
    a compiled model's gradients are views of shared buffers, and a compiled function that
    writes into such inputs depends on how they alias, which its cached graphs do not record.
    Its first call runs eagerly, so the optimiser's state exists before the trace. The
    learning rate is a constant in the graph, so a new rate (a plateau decay) traces it
    again, in seconds. The weights equal the eager update's to fp32 rounding.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clip_norm: float, compiled: bool = False) -> None:
        self.optimizer, self.clip_norm = optimizer, clip_norm
        fuse = compiled and isinstance(optimizer, PaperRMSprop)
        self._compiled = torch.compile(self._fused) if fuse else None

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _eager(self) -> None:
        clip_grad_norm_per_tensor(self._params(), self.clip_norm)
        self.optimizer.step()

    def _fused(self) -> None:
        _, scales = clip_scales([p.grad for p in self._params()], self.clip_norm)
        self.optimizer.step(grad_scales=scales)

    def __call__(self) -> None:
        if self._compiled is None or not self.optimizer.state:  # the first step makes the state
            self._eager()
        else:
            self._compiled()


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return PaperRMSprop(params, lr=config.lr, decay=config.rmsprop_decay, eps=config.rmsprop_eps)


@dataclass
class Progress:
    """Where training stands; saved in ``trainer_state.pt`` for exact resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already taken
    lr: float = 1e-3
    best_val: float = math.inf
    bad_epochs: int = 0
    hold_until: int = 0  # no decay before this epoch either (set by a warm restart)


def update_schedule(p: Progress, val_bound: float, config: TrainConfig) -> bool:
    """Record a validation bound; decay lr after ``lr_patience`` epochs without improvement.

    Epochs before ``lr_hold_epochs`` never count as bad: early on DRAW can sit near the mean
    image for a few epochs before its latents take over, and decaying then stalls it. After a
    warm restart the same hold applies again (``p.hold_until``): the bound first gets worse at
    the raised rate, and counting those epochs would decay the rate straight back.
    Returns whether the bound improved on the best so far.
    """
    if val_bound < p.best_val:
        p.best_val, p.bad_epochs = val_bound, 0
        return True
    if p.epoch < max(config.lr_hold_epochs, p.hold_until):
        return False
    p.bad_epochs += 1
    if p.bad_epochs >= config.lr_patience and p.lr > config.min_lr:
        p.lr, p.bad_epochs = max(p.lr * config.lr_decay, config.min_lr), 0
    return False


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def close_distributed() -> None:
    """Leave the process group once every rank is done (no-op without one). A rank that exits
    while another still writes its checkpoint would otherwise tear down gloo's threads under it
    (seen as "terminate called without an active exception" and SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fit_to_data(config: RunConfig, data: CaptionDataset) -> RunConfig:
    """``config`` with the data's resolved settings and vocabulary size (logged if changed)."""
    if len(data.vocab) != config.model.vocab_size:
        log.info("model.vocab_size %d -> %d: the size of the dataset's vocabulary",
                 config.model.vocab_size, len(data.vocab))
        config = replace(config, model=replace(config.model, vocab_size=len(data.vocab)))
    return replace(config, data=data.config)


class Trainer:
    """Owns model, optimiser, data and bookkeeping for one run directory."""

    def __init__(self, config: RunConfig, out_dir: str | os.PathLike, *, device: str = "cpu",
                 data: CaptionDataset | None = None, data_source: str | os.PathLike | None = None,
                 mnist_source: str | None = None, resume: bool = False,
                 restart_lr: bool = False, progress_bar: bool = True) -> None:
        """``data``: a ready dataset (tests); else built from ``config.data``, reading from
        ``data_source`` (MNIST idx files or prepared COCO; ``mnist_source`` is its old name).
        ``restart_lr`` (with ``resume``): a warm restart — the learning rate starts again at
        ``config.train.lr``, and no decay for ``lr_hold_epochs`` epochs; everything else
        resumes exactly."""
        if restart_lr and not resume:
            raise ValueError("restart_lr only applies when resuming a run (pass --resume)")
        self.data = data or make_dataset(config.data, source=data_source or mnist_source)
        self.vocab = self.data.vocab
        config = self.config = fit_to_data(config, self.data)
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        if config.train.batch_size % self.dist.world_size:
            raise ValueError(f"train.batch_size={config.train.batch_size} must divide evenly "
                             f"over {self.dist.world_size} processes")
        # freed buffers stay in the heap for the next step (aligndraw.allocator): the mmap
        # threshold taken, in bytes (0: not set)
        self.kept_freed_memory = allocator.keep_freed_memory() if allocator.wanted_on(self.device) else 0
        if config.train.precision == "bf16" and (why := gemm.bf16_warning(self.device)):
            log.warning(why)
        torch.manual_seed(config.train.seed)
        self.model = build_model(config.model).to(self.device)
        if self.dist.world_size > 1:
            broadcast_parameters(self.model)
        self.net = self.model
        self._compile_logged = False
        if config.train.compile:  # graphs are built on the first steps (logged as "compile")
            self.net = compiler.compile(self.net)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                        config.train)
        self.update = Update(self.optimizer, config.train.clip_norm, compiled=config.train.compile)
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(config.train.seed * 1000 + self.dist.rank)
        self.progress = Progress(lr=config.train.lr)
        self.progress_bar = progress_bar and self.dist.main
        if resume:
            self.resume(restart_lr=restart_lr)
        elif config.model.model == "sentvec":
            self.train_sentence_encoder()

    def train_sentence_encoder(self) -> dict[str, float]:
        """sentvec: train the caption autoencoder on this run's training captions (every rank
        the same, seeded), put its frozen encoder into the model and log how well it spells
        validation and test captions back (seen and held-out compositions)."""
        assert isinstance(self.model.encoder, SentenceVectorEncoder)
        test = self.data.test()
        check = {"validation": self.data.validation().captions,
                 "test_seen": [c for c, h in zip(test.captions, test.held_out, strict=True) if not h],
                 "test_held_out": [c for c, h in zip(test.captions, test.held_out, strict=True) if h]}
        tick = time.perf_counter()
        encoder, metrics = train_sentence_encoder(
            self.data.train_epoch(0).captions, self.vocab, self.config.model.sentence_dim,
            steps=self.config.train.sentence_steps, seed=self.config.train.seed,
            check={k: v for k, v in check.items() if v})
        self.model.encoder.load_state_dict(encoder.state_dict())
        self.log_metrics({"split": "sentence_encoder", **metrics,
                          "seconds": round(time.perf_counter() - tick, 1)})
        return metrics

    # ------------------------------------------------------------------ the loop
    def run(self, max_steps: int | None = None, dry_run: bool = False) -> Progress:
        """Train until ``epochs`` are done or ``max_steps`` optimizer steps have been taken.

        ``dry_run`` takes one step, validates one batch, writes a grid and a checkpoint.
        """
        if dry_run:
            max_steps = self.progress.step + 1
        self._log_config()
        p = self.progress
        while p.epoch < self.config.train.epochs:
            if self.train_epoch(max_steps):
                break
            self.end_epoch(max_batches=1 if dry_run else self.config.train.val_batches)
        if dry_run:
            self.end_epoch(max_batches=1, advance=False)
        self.save()
        return p

    def train_epoch(self, max_steps: int | None) -> bool:
        """Run the rest of the current epoch; True when ``max_steps`` stopped it early."""
        p, cfg = self.progress, self.config.train
        batches = self.epoch_batches(p.epoch)
        bar = tqdm(total=len(batches), initial=p.batch_in_epoch, desc=f"epoch {p.epoch}",
                   disable=not self.progress_bar, leave=False)
        tick, images = time.perf_counter(), 0
        for batch in batches[p.batch_in_epoch:]:
            if max_steps is not None and p.step >= max_steps:
                bar.close()
                return True
            first = time.perf_counter()
            terms = self.train_step(batch)
            if self.config.train.compile and not self._compile_logged:
                self._compile_logged = True
                self.log_metrics({"split": "compile",
                                  "first_step_s": round(time.perf_counter() - first, 1)})
            p.step, p.batch_in_epoch = p.step + 1, p.batch_in_epoch + 1
            images += batch.images.shape[0] * self.dist.world_size
            bar.update()
            bar.set_postfix(loss=f"{terms['loss']:.1f}")
            if p.step % cfg.log_every == 0:
                rate = images / (time.perf_counter() - tick)
                self.log_metrics({"split": "train", **terms, "img_per_s": round(rate, 1)})
                tick, images = time.perf_counter(), 0
            if p.step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        return False

    def epoch_batches(self, epoch: int) -> BatchPlan:
        """This rank's batches of ``epoch`` (built lazily), in an order fixed by (seed, epoch)."""
        split = self.data.train_epoch(epoch, rank=self.dist.rank, world_size=self.dist.world_size)
        rng = np.random.default_rng([self.config.train.seed, epoch])
        per_rank = self.config.train.batch_size // self.dist.world_size
        return self.data.batches(split, per_rank, shuffle=True, generator=rng, drop_last=True)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """Zero grad, forward, backward, clip each tensor, step. Returns the batch's terms."""
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # ε is drawn here, not inside the model, so that a compiled model sees a plain tensor.
        noise = standard_noise(self.model.noise_shape(batch.images.shape[0]), None, batch.images,
                               self.noise)
        with self.autocast():
            out = self.net(batch.images, batch.tokens, batch.lengths, noise=noise)
        out.loss.backward()
        if self.dist.world_size > 1:
            average_gradients(self.model.parameters(), self.dist.world_size)
        self.update()  # clip each tensor's gradient, step
        return {"loss": out.loss.item(), "nll": out.nll.mean().item(), "kl": out.kl.mean().item()}

    def autocast(self):
        if self.config.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ------------------------------------------------------------------ epoch end
    def end_epoch(self, max_batches: int | None = None, advance: bool = True) -> dict[str, float]:
        """Validate, decay the learning rate on a plateau, save the best model and a grid."""
        p = self.progress
        val = self.validate(max_batches)
        improved = update_schedule(p, val["bound"], self.config.train)
        self._set_lr(p.lr)
        self.log_metrics({"split": "validation", **val, "improved": improved})
        if self.dist.main:
            if improved:
                save_model_dir(self.out / "best", self.model, self.vocab, self.config,
                               model_card(self.config, {"validation": val, "step": p.step}))
            self.save_grid(self.out / "samples" / f"epoch_{p.epoch:03d}.png")
        if advance:
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        return val

    @torch.no_grad()
    def validate(self, max_batches: int | None = None) -> dict[str, float]:
        """Mean bound, nll and kl (nats per image) on the validation scenes, fixed noise."""
        result = lower_bound(self.model, self.data.validation(), self.vocab, self.device,
                             batch_size=self.config.train.batch_size, max_batches=max_batches,
                             seed=self.config.train.seed, autocast=self.autocast)
        return {k: v for k, v in result["all"].items() if k != "count"}

    def save_grid(self, path: Path) -> None:
        """Samples for the dataset's fixed preview captions (MNIST: every kind; COCO: the
        first validation captions), one per caption, seeded."""
        captions = self.data.preview_captions()
        tokens, lengths = encode_batch(self.vocab, captions)
        g = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
        sample = self.model.sample(tokens.to(self.device), lengths.to(self.device), generator=g,
                                   history=False)
        scale = max(3, 96 // self.config.model.width)  # room for the caption under small tiles
        visualize.save_image(visualize.image_grid(sample.images, nrow=4, scale=scale,
                                                  captions=captions), path)

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """Write ``last/`` (model directory + trainer state) atomically, on rank 0."""
        rng_states = self._gather_rng_states()
        if not self.dist.main:
            return
        state = {"progress": dataclasses.asdict(self.progress),
                 "optimizer": self.optimizer.state_dict(), "noise_rng": rng_states,
                 "world_size": self.dist.world_size}

        def fill(directory: Path) -> None:
            fill_model_dir(directory, self.model, self.vocab, self.config,
                           model_card(self.config, {"step": self.progress.step}))
            torch.save(state, directory / STATE_NAME)

        write_dir_atomically(self.out / "last", fill)

    def resume(self, restart_lr: bool = False) -> None:
        """Restore weights, optimiser, progress and random streams from ``last/``; with
        ``restart_lr`` the learning rate restarts at ``config.train.lr``."""
        last = self.out / "last"
        if not (last / STATE_NAME).is_file():
            raise ValueError(f"cannot resume: {last / STATE_NAME} does not exist "
                             "(start without --resume, or point --out at an existing run)")
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(last / "model.safetensors"),
                                             device=str(self.device)))
        state = torch.load(last / STATE_NAME, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        if restart_lr:
            self.progress.lr, self.progress.bad_epochs = self.config.train.lr, 0
            self.progress.hold_until = self.progress.epoch + self.config.train.lr_hold_epochs
        self._set_lr(self.progress.lr)
        rngs = state["noise_rng"]
        if len(rngs) == self.dist.world_size:
            self.noise.set_state(rngs[self.dist.rank].cpu())
        else:
            log.warning("resuming with %d processes instead of %d: noise streams reseeded",
                        self.dist.world_size, len(rngs))
        log.info("resumed from %s at step %d (epoch %d)", last, self.progress.step,
                 self.progress.epoch)

    def _gather_rng_states(self) -> list[torch.Tensor]:
        state = self.noise.get_state()
        if self.dist.world_size == 1:
            return [state]
        self._check_replicas_in_sync()
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    @torch.no_grad()
    def _check_replicas_in_sync(self) -> None:
        """Data-parallel invariant: every rank holds the same weights (checked at each checkpoint)."""
        checksum = torch.stack([p.double().sum() for p in self.model.parameters()])
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, checksum)
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError("data-parallel replicas diverged: ranks hold different weights")

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        record = {"step": self.progress.step, "epoch": self.progress.epoch,
                  "lr": self.progress.lr, "time": round(time.time(), 3), **record}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in record.items() if k != "time"))

    def _log_config(self) -> None:
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run_config.json").write_text(self.config.to_json() + "\n")
            params = sum(p.numel() for p in self.model.parameters())
            log.info("training %s (%.2fM parameters) on %s × %d into %s", self.config.preset,
                     params / 1e6, self.device, self.dist.world_size, self.out)
            if self.device.type == "cpu":
                log.info("CPU fp32 products: %s, batched: %s (aligndraw.gemm; ALIGNDRAW_CPU_GEMM="
                         "onednn|openblas|aten, ALIGNDRAW_CPU_BMM=openblas|aten)",
                         gemm.backend(), gemm.batched_backend())
                kept = f"blocks up to {self.kept_freed_memory >> 20} MiB" if self.kept_freed_memory else "no"
                cached = "; freed tensors cached by size" if allocator.block_cache_installed() else ""
                log.info("freed memory kept for reuse: %s%s (aligndraw.allocator; %s=0 turns it off)",
                         kept, cached, allocator.ENV)
