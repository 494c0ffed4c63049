"""The library's C++ parts (``csrc/``), built on first use by PyTorch's extension builder.

Each is compiled once per machine and PyTorch version into PyTorch's extension cache
(``~/.cache/torch_extensions``, or ``TORCH_EXTENSIONS_DIR``) and loaded from there afterwards.
Building needs a C++ compiler (``CXX``, default ``c++``) and ninja; ``missing`` says which is
absent without building anything.
"""

from __future__ import annotations

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
