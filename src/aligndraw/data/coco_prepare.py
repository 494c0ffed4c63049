"""Prepare Microsoft COCO 2014 for alignDRAW: JPEGs and caption JSONs -> 32x32 arrays + vocabulary.

Reads the standard layout a COCO user already has (nothing is downloaded)::

    ROOT/train2014/*.jpg   ROOT/val2014/*.jpg
    ROOT/annotations/captions_train2014.json   ROOT/annotations/captions_val2014.json

(the JSON schema: ``images`` [{id, file_name, ...}], ``annotations`` [{id, image_id, caption}])
and writes the directory :mod:`aligndraw.data.coco` describes.

- Images: decoded with Pillow, converted to RGB (grayscale and CMYK JPEGs included), centre-
  cropped to the largest square, resized to S x S with Lanczos (antialiased). JPEGs are first
  decoded at a reduced scale (libjpeg DCT scaling, Pillow's ``draft``) that keeps at least
  2S pixels on the short side: several times faster, and the Lanczos step still averages over
  many source pixels per output pixel. EXIF orientation is ignored, as COCO's annotations are.
- An image that fails to decode (corrupt, truncated, missing) is logged, listed in
  ``meta.json`` under ``skipped`` and left out with its captions; never silently.
- Captions: at most ``captions_per_image`` (5, as the authors kept) per image, in annotation
  id order; tokenised by :func:`aligndraw.text.tokenize` (lower-case, punctuation split off).
- Vocabulary: ``<pad>``, ``<unk>``, then every word with at least ``min_count`` occurrences in
  the training captions, most frequent first; rarer words and words never seen in training
  become ``<unk>``.

Restartable: images are decoded in chunks, each saved (atomically) under a sibling directory
``.OUT.partial/``; a run that is interrupted picks up the chunks already done. The output
directory is filled in a temporary sibling and renamed into place at the end, so ``OUT`` is
either the complete previous version or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from aligndraw.data.coco import (
    DATASET,
    DEFAULT_MIN_WORD_COUNT,
    FORMAT_VERSION,
    META_NAME,
    POOLS,
    VOCAB_NAME,
    default_coco_dir,
    pool_file,
)
from aligndraw.text import PAD, UNK, Vocabulary, tokenize

log = logging.getLogger("aligndraw.data.coco")
RESIZE = ("RGB; centre crop to the largest square; Lanczos (antialiased) resize; JPEGs decoded "
          "at reduced scale (draft) keeping >= 2x the target size")
DRAFT_FACTOR = 2
CHUNK = 1024  # images per restartable chunk
REPORT_MIN_COUNTS = (1, 2, 3, 4, 5, 10)


@dataclass
class PoolListing:
    """One pool's images (sorted by COCO id) and their captions, from the annotation JSON."""

    pool: str
    image_ids: np.ndarray  # (N,) int64
    files: list[str]  # N file names under ROOT/pool/
    captions: list[list[str]]  # N lists of at most captions_per_image texts
    without_captions: int  # listed images nobody captioned (left out)
    extra_captions: int  # captions beyond captions_per_image (left out)
    orphan_captions: int  # captions whose image_id is not listed (left out)


@dataclass
class PrepareReport:
    """What :func:`prepare_coco` wrote: the directory, its ``meta.json`` and the skipped files."""

    out: Path
    meta: dict

    @property
    def skipped(self) -> list[dict]:
        return [s for p in POOLS for s in self.meta["pools"][p]["skipped"]]


def read_annotations(root: Path, pool: str, captions_per_image: int) -> PoolListing:
    """Parse ``annotations/captions_<pool>.json`` (COCO schema) into a :class:`PoolListing`."""
    path = root / "annotations" / f"captions_{pool}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = sorted((int(im["id"]), str(im["file_name"])) for im in data["images"])
        notes = sorted((int(a["image_id"]), int(a.get("id", 0)), str(a["caption"]))
                       for a in data["annotations"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a COCO captions file (images [{{id, file_name}}], "
                         f"annotations [{{image_id, caption}}]): {type(err).__name__}: {err}") from err
    row = {image_id: i for i, (image_id, _) in enumerate(images)}
    captions: list[list[str]] = [[] for _ in images]
    extra = orphan = 0
    for image_id, _, text in notes:  # by image, then annotation id
        if image_id not in row:
            orphan += 1
        elif len(captions[row[image_id]]) >= captions_per_image:
            extra += 1
        else:
            captions[row[image_id]].append(" ".join(text.split()))
    keep = [i for i, c in enumerate(captions) if c]
    return PoolListing(pool, np.array([images[i][0] for i in keep], dtype=np.int64),
                       [images[i][1] for i in keep], [captions[i] for i in keep],
                       without_captions=len(images) - len(keep), extra_captions=extra,
                       orphan_captions=orphan)


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """(3, size, size) uint8: RGB, centre crop to a square, Lanczos resize (module docstring)."""
    with Image.open(path) as img:
        img.draft("RGB", (DRAFT_FACTOR * size, DRAFT_FACTOR * size))  # JPEG only; else no-op
        rgb = img.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    small = rgb.resize((size, size), Image.Resampling.LANCZOS,
                       box=(left, top, left + side, top + side))
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _decode_chunk(paths: list[Path], size: int) -> dict[str, np.ndarray]:
    """Decode one chunk; failures give a zero image, ok=False and the error text."""
    images = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path, size)
            ok[i] = True
        except Exception as err:  # noqa: BLE001 - any decoder failure is reported, not fatal
            errors[i] = f"{type(err).__name__}: {err}"
    return {"images": images, "ok": ok, "errors": np.array(errors, dtype=str)}


def _save_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _fingerprint(listing: PoolListing, size: int) -> str:
    """Names a pool's chunk cache: changes with the image list, the size or the resize method."""
    h = hashlib.sha256(json.dumps([listing.pool, size, RESIZE, CHUNK, listing.files,
                                   listing.image_ids.tolist()]).encode())
    return h.hexdigest()[:16]


def decode_pool(listing: PoolListing, root: Path, cache: Path, size: int, workers: int,
                progress: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a pool's images in restartable chunks under ``cache``.

    Returns:
        images (N, 3, S, S) uint8, ok (N,) bool, errors: N strings ("" where ok).
    """
    cache = cache / f"{listing.pool}-{_fingerprint(listing, size)}"
    cache.mkdir(parents=True, exist_ok=True)
    paths = [root / listing.pool / name for name in listing.files]
    starts = range(0, len(paths), CHUNK)
    chunk_path = {s: cache / f"chunk_{s // CHUNK:05d}.npz" for s in starts}
    todo = [s for s in starts if not chunk_path[s].is_file()]
    done = len(paths) - sum(min(CHUNK, len(paths) - s) for s in todo)
    bar = tqdm(total=len(paths), initial=done, desc=f"decode {listing.pool}", unit="img",
               disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers)  # Pillow decodes and resizes without the GIL
    try:
        futures = {s: pool.submit(_decode_chunk, paths[s:s + CHUNK], size) for s in todo}
        for s, future in futures.items():
            _save_npz_atomically(chunk_path[s], future.result())
            bar.update(min(CHUNK, len(paths) - s))
    finally:  # on Ctrl-C, do not decode the chunks still queued: a restart redoes them
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    parts = []
    for s in starts:
        with np.load(chunk_path[s]) as chunk:
            parts.append({k: chunk[k] for k in ("images", "ok", "errors")})
    if not parts:
        return np.zeros((0, 3, size, size), np.uint8), np.zeros(0, bool), []
    images = np.concatenate([p["images"] for p in parts])
    ok = np.concatenate([p["ok"] for p in parts])
    errors = [str(e) for p in parts for e in p["errors"]]
    return images, ok, errors


def build_vocabulary(token_lists: list[list[str]], min_count: int) -> tuple[Vocabulary, Counter]:
    """``<pad>``, ``<unk>`` and the words seen at least ``min_count`` times, most frequent first."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in (PAD, UNK)),
                   key=lambda w: (-counts[w], w))
    return Vocabulary(words=(PAD, UNK, *words)), counts


def _encode(vocab: Vocabulary, token_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(M, Lmax) 0-padded ids (uint16 when they fit) and (M,) int32 lengths."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int32)
    dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max else np.int32
    tokens = np.zeros((len(token_lists), int(lengths.max(initial=1))), dtype=dtype)
    for i, t in enumerate(token_lists):
        tokens[i, :len(t)] = vocab.encode_tokens(t)
    return tokens, lengths


def _check_layout(root: Path) -> None:
    needed = [root / p for p in POOLS] + [root / "annotations" / f"captions_{p}.json" for p in POOLS]
    missing = [str(p.relative_to(root)) for p in needed if not p.exists()]
    if missing:
        raise ValueError(f"{root} is not a COCO 2014 directory: missing {', '.join(missing)} "
                         "(expected train2014/, val2014/, annotations/captions_train2014.json, "
                         "annotations/captions_val2014.json)")


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / META_NAME).is_file():
        raise ValueError(f"{out} exists and is not a prepared COCO directory (no {META_NAME}); "
                         "choose a new or empty --out: it is replaced as a whole")


def prepare_coco(root: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 min_count: int = DEFAULT_MIN_WORD_COUNT, image_size: int = 32,
                 captions_per_image: int = 5, workers: int | None = None,
                 progress: bool = True) -> PrepareReport:
    """COCO 2014 under ``root`` -> the prepared directory ``out`` (default: the data cache).

    Args:
        min_count: words seen fewer times in the training captions become ``<unk>``.
        image_size: S of the S x S images (the paper: 32).
        captions_per_image: keep at most this many captions per image (the authors: 5).
        workers: decoding threads (default: min(8, CPUs)).

    Returns:
        a :class:`PrepareReport`; its ``skipped`` lists the images that failed to decode.
    """
    from aligndraw import __version__
    from aligndraw.checkpoint import write_dir_atomically

    root = Path(root).expanduser()
    out = Path(out).expanduser() if out is not None else default_coco_dir()
    for name, value in (("min_count", min_count), ("image_size", image_size),
                        ("captions_per_image", captions_per_image)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    _check_layout(root)
    _check_out(out)
    workers = workers or min(8, os.cpu_count() or 1)
    cache = out.parent / f".{out.name}.partial"
    pools, meta_pools = {}, {}
    for pool in POOLS:
        listing = read_annotations(root, pool, captions_per_image)
        images, ok, errors = decode_pool(listing, root, cache, image_size, workers, progress)
        skipped = [{"file": f"{pool}/{listing.files[i]}", "image_id": int(listing.image_ids[i]),
                    "error": errors[i]} for i in np.flatnonzero(~ok)]
        for s in skipped:
            log.warning("skipped %s (image %d): %s", s["file"], s["image_id"], s["error"])
        keep = np.flatnonzero(ok)
        texts = [c for i in keep for c in listing.captions[i]]
        owner = np.array([r for r, i in enumerate(keep) for _ in listing.captions[i]], dtype=np.int32)
        token_lists = [tokenize(t) for t in texts]
        words = np.array([len(t) > 0 for t in token_lists], dtype=bool)
        pools[pool] = dict(images=images[keep], image_ids=listing.image_ids[keep],
                           texts=[t for t, w in zip(texts, words, strict=True) if w],
                           tokens=[t for t in token_lists if t], image_index=owner[words])
        meta_pools[pool] = {"listed_images": len(listing.files) + listing.without_captions,
                            "images": len(keep), "skipped": skipped,
                            "without_captions": listing.without_captions,
                            "extra_captions_dropped": listing.extra_captions,
                            "orphan_captions": listing.orphan_captions,
                            "empty_captions": int((~words).sum())}
    vocab, counts = build_vocabulary(pools["train2014"]["tokens"], min_count)
    for pool, p in pools.items():
        p["token_ids"], p["lengths"] = _encode(vocab, p["tokens"])
        unk = int((p["token_ids"] == vocab.unk_id).sum())
        meta_pools[pool].update(captions=len(p["texts"]), max_length=int(p["lengths"].max(initial=0)),
                                unknown_token_rate=unk / max(1, int(p["lengths"].sum())))
    meta = {
        "format": FORMAT_VERSION, "dataset": DATASET, "aligndraw_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": str(root.resolve()),
        "image_size": image_size, "resize": RESIZE, "captions_per_image": captions_per_image,
        "min_word_count": min_count, "vocab_size": len(vocab),
        "vocab_size_by_min_count": {str(k): 2 + sum(c >= k for c in counts.values())
                                    for k in REPORT_MIN_COUNTS},
        "pools": meta_pools,
        "splits": "train = all train2014 captions; validation and test = val2014 images chosen "
                  "when loading by CocoConfig (val_images, test_images, seed)",
    }

    def fill(directory: Path) -> None:
        for pool, p in pools.items():
            arrays = {"images": p["images"], "image_ids": p["image_ids"], "tokens": p["token_ids"],
                      "lengths": p["lengths"], "image_index": p["image_index"]}
            for name, array in arrays.items():
                np.save(pool_file(directory, pool, name), array)
            pool_file(directory, pool, "captions").write_text(json.dumps(p["texts"]) + "\n")
        vocab.to_json(directory / VOCAB_NAME)
        (directory / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")

    write_dir_atomically(out, fill)
    shutil.rmtree(cache, ignore_errors=True)
    return PrepareReport(out=out, meta=meta)
