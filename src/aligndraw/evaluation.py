"""Evaluation: the variational lower bound in nats per image, for seen and held-out scenes.

    −L(x | y) = nll + Σ_t KL_t   (one posterior sample per image, as in the paper)

Every metric is reported three ways: over all scenes, over scenes whose compositions were seen
in training, and over held-out compositions. More metrics (importance-weighted bound,
retrieval, SSIM, caption fidelity) build on the same split.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from aligndraw.data.mnist_captions import Scenes, iterate_batches
from aligndraw.model import AlignDraw
from aligndraw.text import Vocabulary

TERMS = ("bound", "nll", "kl")
GROUPS = ("all", "seen", "held_out")


@torch.no_grad()
def per_image_bound(model: AlignDraw, scenes: Scenes, vocab: Vocabulary,
                    device: torch.device | str = "cpu", *, batch_size: int = 100,
                    max_batches: int | None = None, seed: int = 0,
                    autocast=nullcontext) -> dict[str, torch.Tensor]:
    """Bound terms per image with seeded posterior noise.

    Returns:
        {"bound", "nll", "kl": (n,) float64 in nats, "held_out": (n,) bool} for the first
        ``max_batches`` batches (all scenes by default).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*TERMS, "held_out")}
    for i, batch in enumerate(iterate_batches(scenes, vocab, batch_size, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        held_out = batch.held_out
        batch = batch.to(device)
        with autocast():
            out = model(batch.images, batch.tokens, batch.lengths, generator=g)
        for name, value in (("bound", out.bound), ("nll", out.nll), ("kl", out.kl)):
            parts[name].append(value.double().cpu())
        parts["held_out"].append(held_out)
    return {k: torch.cat(v) for k, v in parts.items()}


def summarise(terms: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Means of each term over all, seen and held-out images (with counts)."""
    held = terms["held_out"]
    masks = {"all": torch.ones_like(held), "seen": ~held, "held_out": held}
    out = {}
    for group, mask in masks.items():
        n = int(mask.sum())
        out[group] = {"count": n, **{t: (terms[t][mask].mean().item() if n else float("nan"))
                                     for t in TERMS}}
    return out


def lower_bound(model: AlignDraw, scenes: Scenes, vocab: Vocabulary,
                device: torch.device | str = "cpu", **kwargs) -> dict[str, dict[str, float]]:
    """Mean −L, nll and kl in nats per image, for all / seen / held-out scenes.

    Keyword arguments go to ``per_image_bound`` (batch_size, max_batches, seed, autocast).
    """
    was_training = model.training
    model.eval()
    try:
        return summarise(per_image_bound(model, scenes, vocab, device, **kwargs))
    finally:
        model.train(was_training)


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """{metric: {group: {term: value}}} → a markdown table (rows = groups)."""
    lines = []
    for metric, groups in results.items():
        columns = [k for k in next(iter(groups.values())) if k != "count"]
        lines += [f"### {metric}", "", "| compositions | images | " + " | ".join(columns) + " |",
                  "|---|---:|" + "---:|" * len(columns)]
        for group, values in groups.items():
            cells = " | ".join(f"{values[c]:.2f}" for c in columns)
            lines.append(f"| {group} | {values['count']} | {cells} |")
        lines.append("")
    return "\n".join(lines)
