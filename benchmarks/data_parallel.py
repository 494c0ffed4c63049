"""Data-parallel variants for ``throughput.py --processes N``: N processes × 1 thread each.

This is what the trainer does under ``torchrun --nproc-per-node N -m aligndraw train
--num-threads 1``: every process holds a replica, runs the training step on its B/N images of
the batch, the gradients are averaged across processes after backward (one gloo all-reduce,
``aligndraw.trainer.average_gradients``), and every replica takes the same clipped optimiser
step.
The global batch stays B, and the averaged gradient is the gradient of the mean loss over
all B images, so the step is the single-process step up to summation order (checked by
``check``). On a few CPU cores this uses the cores better than intra-op threads: each core
runs whole training steps, so the elementwise kernels and small products of every drawing
step, which one op's threads split badly, run in parallel too.

The timing protocol of ``throughput.py`` is kept: the main process tells every worker to run
one step and waits for all of them, so workers never run while another variant is timed (an
idle worker blocks in ``recv`` and uses no CPU).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aligndraw import allocator
from aligndraw.config import ModelConfig
from aligndraw.model import AlignDraw
from aligndraw.trainer import average_gradients


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker builds: the model kind, its weights, the whole batch and the settings."""

    kind: str  # "library" or "naive"
    config: ModelConfig
    state: dict[str, torch.Tensor]  # library-model state dict (the naive model maps it)
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, tokens, lengths (whole batch)
    precision: str
    seed: int
    compiled: bool
    flush_denormal: bool = False  # torch.set_flush_denormal(True) in the worker, before its threads
    keep_freed_memory: bool = False  # aligndraw.allocator.keep_freed_memory() in the worker


def shard(batch: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of a batch that ``world`` divides evenly."""
    if batch % world:
        raise ValueError(f"a batch of {batch} does not split evenly over {world} processes")
    per = batch // world
    return slice(rank * per, (rank + 1) * per)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_model(spec: WorkerSpec) -> torch.nn.Module:
    lib = AlignDraw(spec.config)
    lib.load_state_dict(spec.state)
    if spec.kind == "library":
        return lib
    from benchmarks.naive_reference import NaiveAlignDraw, load_from_library

    return load_from_library(NaiveAlignDraw(spec.config), lib)


def _worker(rank: int, world: int, port: int, conn, spec: WorkerSpec) -> None:
    """One replica: set up, then run the commands the main process sends until "stop"."""
    from benchmarks.throughput import Variant  # spawn: imported in the child

    if spec.flush_denormal:
        torch.set_flush_denormal(True)
    if spec.keep_freed_memory:  # the parent process checked that this C library takes it
        allocator.keep_freed_memory()
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        part = shard(spec.inputs[0].shape[0], rank, world)
        inputs = tuple(x[part] for x in spec.inputs)
        model = _build_model(spec)
        variant = Variant(f"rank{rank}", model, spec.precision, inputs, spec.seed + rank,
                          compiled=spec.compiled, world_size=world)
        conn.send(("ready", os.getpid()))
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            cpu = time.process_time()
            result = _check(variant, arg, part, rank) if command == "check" else getattr(
                variant, f"{command}_step")()
            conn.send((time.process_time() - cpu, result))
    except BaseException:  # the main process raises it; a silent worker would hang the run
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check(variant, arg: dict[str, Any], part: slice, rank: int) -> dict[str, Any]:
    """Loss, KL per step, averaged gradients (rank 0) and samples for given weights and noise;
    the replica's own weights are put back afterwards."""
    model = variant.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(arg["state"])
    model.zero_grad(set_to_none=True)
    images, tokens, lengths = variant.images, variant.tokens, variant.lengths
    out = variant.forward(images, tokens, lengths, noise=arg["noise"][part])
    out.loss.backward()
    average_gradients(model.parameters(), dist.get_world_size())
    grads = ({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
             if rank == 0 else None)
    with torch.no_grad():
        sample = variant.sampler(tokens, lengths, noise=arg["noise"][part], history=False).images
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    return {"loss": out.loss.detach(), "kl_steps": out.kl_steps.detach(), "grads": grads,
            "sample": sample}


class DataParallelVariant:
    """A variant of ``throughput.py`` whose steps run in ``processes`` workers (1 thread each).

    ``train_step`` / ``sample_step`` run one step on every worker and return when all are done;
    ``worker_cpu_s`` is the workers' summed CPU time of the last step. Call ``close``.
    """

    def __init__(self, name: str, spec: WorkerSpec, processes: int) -> None:
        shard(spec.inputs[0].shape[0], 0, processes)  # fail early on an uneven split
        self.name, self.precision = name, spec.precision
        self.worker_cpu_s = 0.0
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, processes, port, theirs, spec), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        self.pids = [self._receive(conn)[1] for conn in self.conns]

    def _receive(self, conn) -> tuple:
        try:
            reply = conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"{self.name}: a worker process died") from exc
        if reply[0] == "error":
            raise RuntimeError(f"{self.name}: a worker failed:\n{reply[1]}")
        return reply

    def _run(self, command: str, arg: Any = None) -> list[Any]:
        for conn in self.conns:
            conn.send((command, arg))
        replies = [self._receive(conn) for conn in self.conns]
        self.worker_cpu_s = sum(cpu for cpu, _ in replies)
        return [result for _, result in replies]

    def train_step(self) -> None:
        self._run("train")

    def sample_step(self) -> None:
        self._run("sample")

    def check(self, state: dict[str, torch.Tensor], noise: torch.Tensor) -> SimpleNamespace:
        """The data-parallel step's results for ``state`` and ``noise`` (B, T, Z), gathered:
        loss (mean over the whole batch), kl_steps (B, T), grads (averaged) and sample (B, …)."""
        parts = self._run("check", {"state": state, "noise": noise})
        return SimpleNamespace(loss=torch.stack([p["loss"] for p in parts]).mean(),
                               kl_steps=torch.cat([p["kl_steps"] for p in parts]),
                               grads=parts[0]["grads"],
                               sample=torch.cat([p["sample"] for p in parts]))

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if proc.is_alive():
                try:
                    conn.send(("stop", None))
                except (BrokenPipeError, OSError):
                    pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
