"""The paper-style results table and sample figure over several trained models.

    aligndraw evaluate --model runs/X --out runs/X/evaluation/test.json ...   (per model)
    aligndraw report runs/A runs/B ... --out docs/results                      (all models)

A run directory (or model directory) gives the model (``best/`` first), its training record
(``metrics.jsonl``: steps, epochs, best validation bound, training time) and every evaluation
JSON in its ``evaluation/`` folder (their metrics are merged). The report is one markdown file
with a table like the paper's (rows = models, columns = metrics, all test captions), the same
metrics for seen and held-out compositions, the settings each number was measured with, and a
figure with one sample of every model for the same captions and the same seed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aligndraw import visualize
from aligndraw.checkpoint import resolve_model_dir, write_text_atomically

MODEL_NAMES = {"aligndraw": "alignDRAW", "noalign": "noalignDRAW", "sentvec": "sentvecDRAW",
               "fcvae": "fully-connected VAE", "convvae": "conv-deconv VAE"}
MAX_GAP_S = 600.0  # gaps between metrics lines longer than this are pauses, not training


@dataclass
class RunSummary:
    """What the report knows about one model."""

    path: Path
    model_dir: Path
    kind: str
    parameters: int
    training: dict[str, Any] = field(default_factory=dict)  # steps, epochs, minutes
    metrics: dict[str, Any] = field(default_factory=dict)  # {metric: {group: {term: value}}}
    definitions: dict[str, str] = field(default_factory=dict)  # metric → what was measured

    @property
    def name(self) -> str:
        return MODEL_NAMES.get(self.kind, self.kind)


def training_record(metrics_file: Path) -> dict[str, Any]:
    """Steps, epochs and training time from a run's metrics.jsonl.

    Training time sums the gaps between consecutive lines, leaving out gaps longer than
    ``MAX_GAP_S`` (a stopped and resumed run).
    """
    if not metrics_file.is_file():
        return {}
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not lines:
        return {}
    times = [r["time"] for r in lines if "time" in r]
    seconds = sum(b - a for a, b in itertools.pairwise(times) if 0 <= b - a <= MAX_GAP_S)
    return {"steps": max(r.get("step", 0) for r in lines),
            "epochs": max(r.get("epoch", 0) for r in lines), "minutes": seconds / 60}


def load_run(path: str | os.PathLike) -> RunSummary:
    """Summarise a run directory (or model directory) for the report."""
    from safetensors import safe_open

    from aligndraw.config import RunConfig

    path = Path(path)
    model_dir = resolve_model_dir(path)
    config = RunConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    run = RunSummary(path=path, model_dir=model_dir, kind=config.model.model, parameters=parameters,
                     training=training_record(path / "metrics.jsonl"))
    state = path / "last" / "trainer_state.pt"
    if state.is_file():  # the exact last step (metrics.jsonl logs every log_every steps)
        progress = torch.load(state, map_location="cpu", weights_only=True)["progress"]
        for key, value in (("steps", progress["step"]), ("epochs", progress["epoch"])):
            run.training[key] = max(run.training.get(key, 0), value)
    for file in sorted((path / "evaluation").glob("*.json")):
        record = json.loads(file.read_text())
        if "metrics" not in record:
            raise ValueError(f"{file} is not an `aligndraw evaluate --out` file (no 'metrics')")
        run.metrics.update(record["metrics"])
        split = record.get("split", "?")
        run.definitions.update({m: f"{split} split, {d}" for m, d in record.get("definitions", {}).items()})
    return run


# ------------------------------------------------------------------------------ tables
def _get(run: RunSummary, metric: str, group: str, term: str) -> float | None:
    value = run.metrics.get(metric, {}).get(group, {}).get(term)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


COLUMNS: tuple[tuple[str, str, str, int], ...] = (
    # (header, metric, term, digits)
    ("bound (nats) ↓", "nll", "bound", 2),
    ("IWAE ↓", "iwae", "iwae", 2),
    ("R@1", "retrieval_nn", "R@1", 1),
    ("R@5", "retrieval_nn", "R@5", 1),
    ("R@10", "retrieval_nn", "R@10", 1),
    ("R@50", "retrieval_nn", "R@50", 1),
    ("Med r ↓", "retrieval_nn", "med_r", 1),
    ("R@10 (random list)", "retrieval_random", "R@10", 1),
    ("SSIM", "ssim", "mean", 3),
    ("fidelity %", "fidelity", "fidelity", 1),
)


def main_table(runs: Sequence[RunSummary], group: str = "all") -> str:
    """Markdown: one row per model, the paper's columns plus ours, for one group of captions."""
    head = ["model", "params", "steps", "train min", *[c[0] for c in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        cells = [run.name, f"{run.parameters / 1e6:.2f}M", str(run.training.get("steps", "–")),
                 _fmt(run.training.get("minutes"), 0)]
        for _, metric, term, digits in COLUMNS:
            value = _get(run, metric, group, term)
            if metric == "ssim" and value is not None:
                cells.append(f"{value:.3f} ± {_get(run, 'ssim', group, 'std') or 0:.3f}")
            else:
                cells.append(_fmt(value, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def groups_table(runs: Sequence[RunSummary]) -> str:
    """Markdown: bound, R@10, SSIM and fidelity for seen vs held-out compositions."""
    cols = (("bound", "nll", "bound", 2), ("R@10", "retrieval_nn", "R@10", 1),
            ("SSIM", "ssim", "mean", 3), ("fidelity %", "fidelity", "fidelity", 1))
    head = ["model"] + [f"{name} {g}" for name, *_ in cols for g in ("seen", "held-out")]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        cells = [run.name] + [_fmt(_get(run, metric, g, term), digits)
                              for _, metric, term, digits in cols for g in ("seen", "held_out")]
        lines.append("| " + " | ".join(cells) + " |")
    ceiling = next((v for r in runs for v in [_get(r, "fidelity", "all", "ceiling")] if v), None)
    if ceiling is not None:
        lines.append(f"\nCaption fidelity ceiling (the image reader on the real test images): "
                     f"{ceiling:.1f} %.")
    return "\n".join(lines)


def settings_lines(runs: Sequence[RunSummary]) -> list[str]:
    """One bullet per distinct metric definition (as ``evaluate`` wrote it), naming the models
    measured that way: a difference in settings between models shows as two bullets."""
    by_setting: dict[str, list[str]] = {}
    for run in runs:
        for metric, text in run.definitions.items():
            by_setting.setdefault(f"**{metric}**: {text}", []).append(run.name)
    return [f"- {key} ({', '.join(names)})" for key, names in by_setting.items()]


# ------------------------------------------------------------------------------ figure
@torch.no_grad()
def samples_figure(runs: Sequence[RunSummary], captions: Sequence[str], seed: int = 0,
                   device: str = "cpu"):
    """One prior sample per (model, caption), each model seeded with ``seed``; captions of
    compositions held out of training are marked [held-out]."""
    from aligndraw.pipeline import AlignDrawPipeline

    rows, labels = [], list(captions)
    for run in runs:
        pipe = AlignDrawPipeline.from_pretrained(run.model_dir, device=device)
        out = pipe(list(captions), generator=torch.Generator().manual_seed(seed), output_type="pt")
        rows.append((run.name, out.images))
        if run is runs[0]:  # mark compositions the (first) model never saw in training
            labels = [f"{c} [held-out]" if pipe.is_held_out(c) else c for c in captions]
    return visualize.comparison_grid(rows, labels)


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                 captions: Sequence[str], *, seed: int = 0, title: str = "Results",
                 notes: str | None = None) -> tuple[Path, Path]:
    """Write the markdown report ``out`` (e.g. results.md) and its figure beside it
    (results_samples.png); ``notes`` (markdown) is appended. Returns both paths."""
    runs = [load_run(p) for p in paths]
    out = Path(out)
    if out.suffix != ".md":
        raise ValueError(f"the report is markdown: --out must end in .md, got {str(out)!r}")
    figure = visualize.save_image(samples_figure(runs, captions, seed),
                                  out.with_name(f"{out.stem}_samples.png"))
    text = [f"# {title}", "",
            "All test captions (retrieval: nearest-neighbour shortlists unless marked random; "
            "↓ lower is better):", "", main_table(runs), "",
            "Seen and held-out compositions:", "", groups_table(runs), "",
            "Measured with:", "", *settings_lines(runs), "",
            f"![samples]({figure.name})", "",
            f"One sample per model for the same captions (seed {seed}); "
            "models from top to bottom as in the table.", ""]
    if notes:
        text += [notes.strip(), ""]
    md = write_text_atomically(out, "\n".join(text))
    return md, figure
