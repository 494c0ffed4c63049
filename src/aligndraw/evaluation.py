"""Evaluation: the paper's metrics (PAPER.md, "Evaluation in the paper"), each reported over all
test scenes, over scenes whose compositions were seen in training, and over held-out ones
(captioned MNIST; COCO holds no compositions out, so its tables have the "all" row only).

- ``nll``: the lower bound −L(x | y) = nll + Σ_t KL_t in nats per image, one posterior sample.
- ``iwae``: the importance-weighted bound with K posterior samples (Burda et al. 2016),
  −log (1/K) Σ_k p(x, z_k | y) / q(z_k | x, y), tighter than ``nll``, reported beside the
  K-sample mean of the 1-sample bound.
- ``retrieval``: each caption ranks a shortlist of 100 test images (its own + 99 others) by
  L(x | y) − L(x | ȳ), ȳ the mean sentence representation of the training captions; R@K (%)
  and median rank. Shortlists: the 99 nearest neighbours of the caption's own image in the
  image reader's feature space (the paper used a CIFAR-10 CNN's), or 99 random test images.
  COCO has no image reader here: its neighbours are nearest in pixel space. With several
  captions per image (COCO), the shortlist holds distinct images.
- ``ssim``: SSIM between samples from the prior and the caption's real image, mean ± std over
  all (caption, sample) pairs; torchmetrics' SSIM map (Gaussian window 11, σ = 1.5, K1 = 0.01,
  K2 = 0.03, data range 1: Wang et al. 2004's settings) averaged away from the border, as
  scikit-image does (see :func:`ssim`).
- ``fidelity``: share of generated images in which the image reader (``aligndraw.reader``) sees
  exactly the caption's layout (the digit at each of the 8 places, or none), with the reader's
  accuracy on the real images of the same captions beside it as the ceiling. Captioned MNIST
  only: it needs layouts.

Every function takes a split of either dataset (:class:`aligndraw.data.CaptionSplit`).

Every stochastic function takes a ``seed``; noise is drawn on the CPU so results do not depend
on the device. Symbols: n scenes, m captions evaluated, c shortlist size, S posterior samples,
K importance samples, T steps, Z latent size, D2 caption-state size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from aligndraw.baselines import Model
from aligndraw.data import CaptionSplit
from aligndraw.data.mnist_captions import CAPTION_KINDS, parse_caption
from aligndraw.reader import ImageReader, layout_accuracy, read_features, read_layouts
from aligndraw.text import Vocabulary, encode_batch

TERMS = ("bound", "nll", "kl")
GROUPS = ("all", "seen", "held_out")
RECALL_AT = (1, 5, 10, 50)
SHORTLIST = 100  # the paper's shortlist size
SSIM_WINDOW = 11  # Gaussian window of Wang et al. (2004), σ = 1.5


# ------------------------------------------------------------------------------ bookkeeping
def group_masks(held_out: Tensor | np.ndarray) -> dict[str, Tensor]:
    """(n,) held-out flags → {"all", "seen", "held_out": (n,) bool masks}."""
    held = torch.as_tensor(held_out, dtype=torch.bool)
    return {"all": torch.ones_like(held), "seen": ~held, "held_out": held}


def _mean(x: Tensor) -> float:
    return x.double().mean().item() if x.numel() else math.nan


def groups_of(scenes: CaptionSplit) -> tuple[str, ...]:
    """The groups a split reports: all / seen / held-out (MNIST), or all only (COCO)."""
    return GROUPS if scenes.compositions else ("all",)


def summarise(terms: dict[str, Tensor], names: Sequence[str] = TERMS,
              groups: Sequence[str] = GROUPS) -> dict[str, dict[str, float]]:
    """Means of each term over all, seen and held-out images (with counts)."""
    out = {}
    for group, mask in group_masks(terms["held_out"]).items():
        if group in groups:
            out[group] = {"count": int(mask.sum()), **{t: _mean(terms[t][mask]) for t in names}}
    return out


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _captions(scenes: CaptionSplit, max_captions: int | None) -> CaptionSplit:
    """The first ``max_captions`` scenes (the test split is shuffled: seen and held-out mix)."""
    _check_positive(max_captions=max_captions)
    return scenes if max_captions is None else scenes.subset(slice(0, max_captions))


class _eval_mode:
    """Put modules in eval mode for a block and restore their previous mode after."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.modules = [m for m in modules if isinstance(m, torch.nn.Module)]

    def __enter__(self) -> None:
        self.was = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc) -> None:
        for m, was in zip(self.modules, self.was, strict=True):
            m.train(was)


# ------------------------------------------------------------------------------ lower bounds
@torch.no_grad()
def per_image_bound(model: Model, scenes: CaptionSplit, vocab: Vocabulary,
                    device: torch.device | str = "cpu", *, batch_size: int = 100,
                    max_batches: int | None = None, seed: int = 0,
                    autocast=nullcontext) -> dict[str, Tensor]:
    """Bound terms per image with seeded posterior noise.

    Returns:
        {"bound", "nll", "kl": (n,) float64 in nats, "held_out": (n,) bool} for the first
        ``max_batches`` batches (all scenes by default).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    parts: dict[str, list[Tensor]] = {k: [] for k in (*TERMS, "held_out")}
    for i, batch in enumerate(scenes.batches(vocab, batch_size, shuffle=False)):
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


def lower_bound(model: Model, scenes: CaptionSplit, vocab: Vocabulary,
                device: torch.device | str = "cpu", **kwargs) -> dict[str, dict[str, float]]:
    """Mean −L, nll and kl in nats per image, for all / seen / held-out scenes.

    Keyword arguments go to ``per_image_bound`` (batch_size, max_batches, seed, autocast).
    """
    with _eval_mode(model):
        return summarise(per_image_bound(model, scenes, vocab, device, **kwargs),
                         groups=groups_of(scenes))


@torch.no_grad()
def per_image_iwae(model: Model, scenes: CaptionSplit, vocab: Vocabulary, k: int,
                   device: torch.device | str = "cpu", *, batch_size: int = 100,
                   max_batches: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Importance-weighted bound with ``k`` posterior samples per image.

    Images go in batches of ``batch_size``; their B·K rows are run ``batch_size`` at a time.
    The noise of a batch is one (B, K, T, Z) draw from a CPU generator seeded with ``seed``, so
    with K = 1 (and a CPU device) it is the noise ``per_image_bound`` uses.

    Returns:
        {"iwae": (n,) −log mean_k w_k, "bound": (n,) mean over the K samples of nll + kl,
        "held_out": (n,)}, float64 nats; w_k = p(x, z_k | y) / q(z_k | x, y).
    """
    _check_positive(k=k, batch_size=batch_size, max_batches=max_batches)
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {"iwae": [], "bound": [], "held_out": []}
    for i, batch in enumerate(scenes.batches(vocab, batch_size, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        b = len(batch.captions)
        noise = torch.randn((b, k, *model.noise_shape(1)[1:]), generator=g).flatten(0, 1)  # (B·K, T, Z)
        rows = torch.arange(b).repeat_interleave(k)  # image of each row
        log_w, bound = [], []
        for start in range(0, b * k, batch_size):
            r = rows[start:start + batch_size]
            out = model(batch.images[r].to(device), batch.tokens[r].to(device),
                        batch.lengths[r].to(device), noise=noise[start:start + batch_size].to(device),
                        log_weight=True)
            log_w.append(out.log_weight.double().cpu())
            bound.append(out.bound.double().cpu())
        log_w_t = torch.cat(log_w).view(b, k)
        parts["iwae"].append(math.log(k) - torch.logsumexp(log_w_t, dim=1))
        parts["bound"].append(torch.cat(bound).view(b, k).mean(1))
        parts["held_out"].append(batch.held_out)
    return {name: torch.cat(v) for name, v in parts.items()}


def iwae_bound(model: Model, scenes: CaptionSplit, vocab: Vocabulary, k: int = 50,
               device: torch.device | str = "cpu", **kwargs) -> dict[str, dict[str, float]]:
    """Mean IWAE bound (K samples) beside the mean 1-sample bound, nats per image, by group.

    ``gap`` = bound − iwae ≥ 0 on average. Keyword arguments go to ``per_image_iwae``.
    """
    with _eval_mode(model):
        terms = per_image_iwae(model, scenes, vocab, k, device, **kwargs)
    terms["gap"] = terms["bound"] - terms["iwae"]
    return summarise(terms, ("bound", "iwae", "gap"), groups_of(scenes))


# ------------------------------------------------------------------------------ retrieval
@torch.no_grad()
def mean_sentence(model: Model, captions: Sequence[str], vocab: Vocabulary,
                  device: torch.device | str = "cpu", batch_size: int = 500) -> Tensor:
    """ȳ: the mean over ``captions`` of each caption's mean-over-words h_lang, (D2,).

    Used as a one-word caption (``h_lang`` of shape (B, 1, D2)): the alignment then puts all
    its weight on it, so s_t = ȳ at every step, for alignDRAW and noalignDRAW alike.
    """
    total = None
    for i in range(0, len(captions), batch_size):
        tokens, lengths = encode_batch(vocab, list(captions[i:i + batch_size]))
        h_lang = model.encoder(tokens.to(device), lengths.to(device))  # (B, L, D2), 0 past lengths
        per_caption = h_lang.sum(1) / lengths.to(device)[:, None]  # (B, D2)
        total = per_caption.sum(0) if total is None else total + per_caption.sum(0)
    return (total / len(captions)).cpu()


def nearest_shortlists(features: Tensor, queries: Tensor, size: int = SHORTLIST) -> Tensor:
    """Each query image and its ``size`` − 1 nearest other images by cosine distance.

    features: (n, F); queries: (m,) image indices. Returns (m, size) indices, query first.
    """
    f = torch.nn.functional.normalize(features.double(), dim=1)
    sim = f[queries] @ f.T  # (m, n)
    sim[torch.arange(len(queries)), queries] = -math.inf  # the query goes first, by hand
    others = sim.topk(size - 1, dim=1).indices  # (m, size − 1)
    return torch.cat([queries[:, None], others], dim=1)


def random_shortlists(n: int, queries: Tensor, size: int = SHORTLIST, seed: int = 0) -> Tensor:
    """Each query image and ``size`` − 1 other images drawn uniformly without replacement."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand((len(queries), n), generator=g)  # (m, n) random order per query
    keys[torch.arange(len(queries)), queries] = math.inf
    others = keys.topk(size - 1, dim=1, largest=False).indices
    return torch.cat([queries[:, None], others], dim=1)


def ranks_of_first(scores: Tensor) -> Tensor:
    """(m, c) scores, the true image in column 0 → (m,) its rank, 1 = best.

    Ties count against the true image (rank = 1 + number of others scoring ≥ it).
    """
    return 1 + (scores[:, 1:] >= scores[:, :1]).sum(1)


def recall_summary(ranks: Tensor, held_out: Tensor | np.ndarray, same_layout_at_1: Tensor | None = None,
                   groups: Sequence[str] = GROUPS) -> dict[str, dict[str, float]]:
    """R@K in % for K in (1, 5, 10, 50) and the median rank, by group (count = captions)."""
    out = {}
    for group, mask in group_masks(held_out).items():
        if group not in groups:
            continue
        r = ranks[mask].double()
        row: dict[str, float] = {"count": int(mask.sum())}
        row.update({f"R@{k}": 100 * _mean((r <= k).double()) for k in RECALL_AT})
        row["med_r"] = float(np.median(r.numpy())) if len(r) else math.nan
        if same_layout_at_1 is not None:
            row["same_layout@1"] = 100 * _mean(same_layout_at_1[mask].double())
        out[group] = row
    return out


@torch.no_grad()
def _mean_bounds(model: Model, images: np.ndarray, image_idx: Tensor, h_lang: Tensor,
                 lengths: Tensor, caption_idx: Tensor, noise: Tensor, device: torch.device,
                 batch_size: int) -> Tensor:
    """−L averaged over S samples for P (image, caption) pairs: (P,) float64.

    images: (n, C, H, W) pool; h_lang: (N, L, D2) and lengths: (N,) caption states;
    image_idx, caption_idx: (P,) the pairs; noise: (S, T, Z), the same S draws for every pair
    (common random numbers: score differences then vary less).
    """
    s = len(noise)
    pair = torch.arange(len(image_idx)).repeat_interleave(s)  # (P·S,) pair of each row
    sample = torch.arange(s).repeat(len(image_idx))  # (P·S,)
    bounds = []
    for start in range(0, len(pair), batch_size):
        p, k = pair[start:start + batch_size], sample[start:start + batch_size]
        x = torch.from_numpy(images[image_idx[p].numpy()]).to(device)  # (R, C, H, W)
        cap = caption_idx[p]
        tokens = torch.zeros(len(p), h_lang.shape[1], dtype=torch.long, device=device)  # gives L
        out = model(x, tokens, lengths[cap].to(device), noise=noise[k].to(device),
                    h_lang=h_lang[cap].to(device))
        bounds.append(out.bound.double().cpu())
    return torch.cat(bounds).view(-1, s).mean(1)


@torch.no_grad()
def retrieval(model: Model, scenes: CaptionSplit, vocab: Vocabulary, reader: ImageReader | None,
              train_captions: Sequence[str], device: torch.device | str = "cpu", *,
              samples: int = 4, shortlist: int = SHORTLIST, max_captions: int | None = None,
              seed: int = 0, batch_size: int = 500) -> dict[str, dict[str, dict[str, float]]]:
    """Image retrieval as in the paper, with nearest-neighbour and random shortlists.

    Each of the first ``max_captions`` captions scores its ``shortlist`` images (its own and
    others of the split's distinct images) by L(x | y) − L(x | ȳ) (= bound(x | ȳ) −
    bound(x | y)), each bound averaged over ``samples`` posterior samples; ȳ =
    :func:`mean_sentence` of ``train_captions``. L(x | ȳ) is computed once per image,
    L(x | y) once per (caption, image) pair: m · (2c − 1) · S forward rows. Neighbours are
    nearest in ``reader``'s feature space, or in pixel space when ``reader`` is None (COCO).

    Returns:
        {"retrieval_nn": ..., "retrieval_random": ...}, each {group: {count, R@1, R@5, R@10,
        R@50, med_r[, same_layout@1]}}; same_layout@1 (captioned MNIST) = % of captions whose
        top image has the caption's layout (several test images can fit a caption).
    """
    _check_positive(samples=samples, batch_size=batch_size)
    pool = scenes.image_pool()  # (N, C, H, W) the distinct images
    if not 2 <= shortlist <= len(pool):
        raise ValueError(f"shortlist must be in [2, {len(pool)}] (the number of images), got {shortlist}")
    device = torch.device(device)
    with _eval_mode(model, reader):
        m = len(_captions(scenes, max_captions))
        queries = torch.arange(m)
        own = torch.from_numpy(np.asarray(scenes.image_index[:m], dtype=np.int64))  # (m,)
        features = (read_features(reader, pool) if reader is not None
                    else torch.from_numpy(pool).flatten(1))  # (N, F)
        nn_list = nearest_shortlists(features, own, shortlist)
        rand_list = random_shortlists(len(pool), own, shortlist, seed=seed)
        candidates = torch.cat([nn_list, rand_list[:, 1:]], dim=1)  # (m, 2c − 1) image indices
        noise = torch.randn(model.noise_shape(samples), generator=torch.Generator().manual_seed(seed))
        # L(x | ȳ) for every image that appears in a shortlist.
        needed = candidates.unique()
        y_bar = mean_sentence(model, train_captions, vocab, device)[None, None]  # (1, 1, D2)
        bound_bar = torch.full((len(pool),), math.nan, dtype=torch.float64)
        bound_bar[needed] = _mean_bounds(model, pool, needed, y_bar, torch.ones(1, dtype=torch.long),
                                         torch.zeros_like(needed), noise, device, batch_size)
        # L(x | y) for every (caption, candidate) pair, caption states encoded once.
        tokens, lengths = encode_batch(vocab, scenes.captions[:m])
        h_lang = model.encoder(tokens.to(device), lengths.to(device)).cpu()  # (m, L, D2)
        c = candidates.shape[1]
        bound_y = _mean_bounds(model, pool, candidates.flatten(), h_lang, lengths,
                               queries.repeat_interleave(c), noise, device, batch_size).view(m, c)
    scores = bound_bar[candidates] - bound_y  # (m, c) = L(x|y) − L(x|ȳ)
    held = scenes.held_out[:m]
    out = {}
    for name, cols in (("retrieval_nn", slice(0, shortlist)),
                       ("retrieval_random", [0, *range(shortlist, c)])):
        sc, cand = scores[:, cols], candidates[:, cols]
        ranks = ranks_of_first(sc)
        same = None
        if scenes.compositions:  # every scene is its own image: pool rows are scenes
            layouts = torch.from_numpy(scenes.layouts)
            best_other = cand[torch.arange(m), 1 + sc[:, 1:].argmax(1)]
            top = torch.where(ranks == 1, own, best_other)  # ties go against the true image
            same = (layouts[top] == layouts[own]).all(1)
        out[name] = recall_summary(ranks, held, same, groups_of(scenes))
    return out


def require_compositions(scenes: CaptionSplit, metric: str) -> None:
    """``ValueError`` for a metric that needs captioned-MNIST layouts on other data."""
    if not scenes.compositions:
        raise ValueError(f"{metric} needs captioned-MNIST scenes (digit layouts read by the image "
                         "reader); this split has none (COCO): use nll, iwae, retrieval or ssim")


# ------------------------------------------------------------------------------ generation
def _prior_images(model: Model, scenes: CaptionSplit, vocab: Vocabulary, samples: int,
                  device: torch.device, seed: int, batch_size: int, temperature: float = 1.0):
    """Yield (caption indices (R,), generated images (R, C, H, W) on the CPU) in order.

    Each caption is repeated ``samples`` times; the noise of each chunk of ``batch_size`` rows
    comes from one CPU generator seeded with ``seed``; ``temperature`` as in ``model.sample``.
    """
    g = torch.Generator().manual_seed(seed)
    tokens, lengths = encode_batch(vocab, scenes.captions)
    rows = torch.arange(len(scenes)).repeat_interleave(samples)
    for start in range(0, len(rows), batch_size):
        r = rows[start:start + batch_size]
        noise = torch.randn(model.noise_shape(len(r)), generator=g)
        out = model.sample(tokens[r].to(device), lengths[r].to(device), noise=noise.to(device),
                           temperature=temperature, history=False)
        yield r, out.images.float().cpu()


def ssim(images: Tensor, targets: Tensor) -> Tensor:
    """(B,) SSIM of each image with its target, (B, C, H, W) in [0, 1].

    torchmetrics computes the SSIM map (Gaussian window 11×11, σ = 1.5, K1 = 0.01, K2 = 0.03)
    on reflect-padded images; we average it over the interior only (the 5-pixel border, where
    the window would reach into the padding, is dropped), as Wang et al.'s reference code and
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` do (the two agree to 1e-6 in float32, which we use: float64
    convolutions are ~15× slower on CPUs). On these mostly black scenes the
    border matters: black-on-black pixels score 1 and would inflate the mean.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        images.float(), targets.float(), data_range=1.0, gaussian_kernel=True, sigma=1.5,
        kernel_size=SSIM_WINDOW, reduction="none", return_full_image=True)  # (B, C, H, W) map
    border = SSIM_WINDOW // 2
    return full[..., border:-border, border:-border].double().mean((1, 2, 3))


@torch.no_grad()
def ssim_scores(model: Model, scenes: CaptionSplit, vocab: Vocabulary,
                device: torch.device | str = "cpu", *, samples: int = 50,
                max_captions: int | None = None, seed: int = 0, batch_size: int = 500,
                temperature: float = 1.0) -> dict[str, dict[str, float]]:
    """SSIM of ``samples`` prior samples per caption against its real image, by group
    (``temperature`` as in ``model.sample``; the paper samples at 1).

    Returns {group: {count (captions), mean, std}}; mean and std over all (caption, sample)
    pairs, as the paper reports them.
    """
    _check_positive(samples=samples, batch_size=batch_size)
    scenes = _captions(scenes, max_captions)
    values = torch.empty(len(scenes), samples, dtype=torch.float64)  # (m, S)
    with _eval_mode(model):
        done = 0
        for r, images in _prior_images(model, scenes, vocab, samples, torch.device(device), seed,
                                       batch_size, temperature):
            real = torch.from_numpy(scenes.caption_images(r.numpy()))
            values.view(-1)[done:done + len(r)] = ssim(images, real).double()
            done += len(r)
    out = {}
    for group, mask in group_masks(scenes.held_out).items():
        if group not in groups_of(scenes):
            continue
        v = values[mask].flatten()
        out[group] = {"count": int(mask.sum()), "mean": _mean(v),
                      "std": v.std(correction=0).item() if v.numel() else math.nan}
    return out


@torch.no_grad()
def caption_fidelity(model: Model, reader: ImageReader, scenes: CaptionSplit, vocab: Vocabulary,
                     device: torch.device | str = "cpu", *, samples: int = 1,
                     max_captions: int | None = None, seed: int = 0, batch_size: int = 500,
                     temperature: float = 1.0) -> dict[str, dict[str, float]]:
    """Share (%) of generated images whose read layout is exactly the caption's, by group
    (images sampled at ``temperature``, as in ``model.sample``).

    ``ceiling`` is the reader's exact-match accuracy on the real images of the same captions;
    a perfect generator scores about that. Returns {group: {count (images), fidelity, ceiling}}
    for all / seen / held_out, then one "KIND, GROUP" row per caption kind (e.g. "left-of, seen")
    and composition group present.
    """
    _check_positive(samples=samples, batch_size=batch_size)
    require_compositions(scenes, "fidelity")
    scenes = _captions(scenes, max_captions)
    parsed = [parse_caption(c) for c in scenes.captions]
    wanted = torch.from_numpy(np.stack([p.layout for p in parsed]))  # (m, 8)
    kinds = torch.tensor([p.kind for p in parsed])  # (m,)
    with _eval_mode(model, reader):
        chunks = list(_prior_images(model, scenes, vocab, samples, torch.device(device), seed,
                                    batch_size, temperature))
        rows = torch.cat([r for r, _ in chunks])  # (R,) caption of each generated image
        generated = torch.cat([read_layouts(reader, images, batch_size) for _, images in chunks])
        real = read_layouts(reader, scenes.images, batch_size)  # (m, 8)
    held = torch.as_tensor(scenes.held_out, dtype=torch.bool)
    out = _fidelity_rows(generated, rows, real, wanted, held, torch.ones_like(held), GROUPS)
    for kind in kinds.unique().tolist():
        by_group = _fidelity_rows(generated, rows, real, wanted, held, kinds == kind,
                                  ("seen", "held_out"))
        out.update({f"{CAPTION_KINDS[kind]}, {g}": v for g, v in by_group.items() if v["count"]})
    return out


def _fidelity_rows(generated: Tensor, rows: Tensor, real: Tensor, wanted: Tensor, held: Tensor,
                   keep: Tensor, groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """Fidelity and ceiling over the captions in ``keep`` (m,) bool. generated (R, 8) layouts
    read from the images of captions ``rows`` (R,); real (m, 8) read from the real images;
    wanted (m, 8); held (m,) → {group: {count, fidelity, ceiling}}."""
    mine = keep[rows]  # (R,)
    gen = layout_accuracy(generated[mine], wanted[rows[mine]], held[rows[mine]])
    ceiling = layout_accuracy(real[keep], wanted[keep], held[keep])
    return {g: {"count": gen[g]["count"], "fidelity": gen[g]["exact"],
                "ceiling": ceiling[g]["exact"]} for g in groups}


# ------------------------------------------------------------------------------ reporting
def _cell(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def markdown_table(results: dict[str, dict[str, dict[str, float]]],
                   notes: dict[str, str] | None = None) -> str:
    """{metric: {group: {term: value}}} → markdown tables (rows = groups), each under a heading
    and an optional one-line note (``notes[metric]``) saying what is measured."""
    lines = []
    for metric, groups in results.items():
        columns = [k for k in next(iter(groups.values())) if k != "count"]
        lines += [f"### {metric}", ""]
        if notes and metric in notes:
            lines += [notes[metric], ""]
        lines += ["| compositions | n | " + " | ".join(columns) + " |",
                  "|---|---:|" + "---:|" * len(columns)]
        for group, values in groups.items():
            cells = " | ".join(_cell(values[c]) for c in columns)
            lines.append(f"| {group} | {values['count']} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def metric_notes(iwae_k: int = 50, retrieval_samples: int = 4, shortlist: int = SHORTLIST,
                 ssim_samples: int = 50, fidelity_samples: int = 1, reader: str | None = "reader",
                 temperature: float = 1.0) -> dict[str, str]:
    """One line per metric saying exactly what its table holds (for the JSON and markdown).

    ``reader`` None: no image reader (COCO), retrieval neighbours are nearest in pixel space.
    """
    ranked = (f"each caption ranks {shortlist} test images (its own + {shortlist - 1} others) by "
              f"L(x|y) − L(x|ȳ), ȳ = mean training-caption h_lang, bounds averaged over "
              f"{retrieval_samples} posterior samples; R@K in %, med_r = median rank")
    ranked += ("" if reader is None else
               ", same_layout@1 = % whose top image has the caption's layout")
    prior = "prior samples" if temperature == 1.0 else f"prior samples at temperature {temperature:g}"
    space = ("pixels (no image classifier for this data; the paper used a CIFAR-10 CNN's features)"
             if reader is None else f"image-reader features, reader {reader!r}")
    return {
        "nll": "−L(x|y) = nll + KL in nats per image (lower is better), one posterior sample.",
        "iwae": f"Importance-weighted bound, K = {iwae_k} posterior samples (iwae), beside the mean "
                "1-sample bound over the same samples (bound); nats per image, gap = bound − iwae.",
        "retrieval_nn": f"Nearest-neighbour shortlist (cosine distance of {space}): {ranked}.",
        "retrieval_random": f"Random shortlist: {ranked}.",
        "ssim": f"SSIM (torchmetrics map, Gaussian 11×11, σ = 1.5, 5-pixel border dropped as in "
                f"scikit-image) of {ssim_samples} {prior} per "
                "caption against its real image; mean and std over all pairs; n = captions.",
        "fidelity": f"% of generated images ({fidelity_samples} {prior} per caption, n = images) "
                    f"in which the image reader ({reader!r}) finds exactly the caption's layout; "
                    "ceiling = the reader's exact-match accuracy on the real images of the same captions.",
    }
