"""The library's C++ parts (``csrc/``), built on first use by PyTorch's extension builder.

Each is compiled once per machine and PyTorch version into PyTorch's extension cache
(``~/.cache/torch_extensions``, or ``TORCH_EXTENSIONS_DIR``) and loaded from there afterwards.
Building needs a C++ compiler (``CXX``, default ``c++``) and ninja; ``missing`` says which is
absent without building anything.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")


def missing(what: str) -> str | None:
    """Why ``what`` (named in the message, e.g. "the OpenBLAS product op") cannot be built
    here: no C++ compiler or no ninja. None if both are found. Cheap: builds nothing."""
    compiler = os.environ.get("CXX", "c++")  # what PyTorch's extension builder calls
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}; set CXX) to build {what}"
    if shutil.which("ninja") is None:
        return f"no ninja to build {what} (pip install ninja)"
    return None


def build(name: str, source: str, openmp: bool = False, flags: tuple[str, ...] = ()) -> None:
    """Compile (once, cached) and load ``csrc/<source>`` as the extension ``name`` (its ops
    then under the namespace its ``TORCH_LIBRARY`` names), with ``flags`` added to the
    compiler's. Raises what the builder raises where it fails."""
    from torch.utils.cpp_extension import load

    cflags = ["-O3", "-fopenmp"] if openmp else ["-O3"]
    load(name=name, sources=[str(CSRC / source)], is_python_module=False,
         extra_cflags=cflags + list(flags), extra_ldflags=["-fopenmp"] if openmp else [])


def load_or_why(log: logging.Logger, name: str, source: str, what: str, instead: str, skip: str,
                openmp: bool = False, flags: tuple[str, ...] = ()) -> str | None:
    """``build`` for a part the library can do without: None once built (cached) and loaded,
    else why not, logged on ``log`` (no compiler or ninja: info; a failed build: a warning
    with the compiler's last words). ``what`` names the part, ``instead`` what runs in its
    place, ``skip`` the setting that skips the build."""
    why = missing(what)
    if why:
        log.info("%s; %s", why, instead)
        return why
    log.info("loading %s (built once, then cached)", what)
    try:
        build(name, source, openmp=openmp, flags=flags)
    except (OSError, RuntimeError, ImportError) as e:  # what PyTorch's builder raises
        why = f"{what} did not build ({str(e)[-2000:]})"
        log.warning("%s; %s (%s skips the build)", why, instead, skip)
        return why
    return None
