import os
import subprocess
import sys
import textwrap

import pytest

# In a fresh process (the settings are process-wide): rounds of a training-step-like pattern,
# ten 8 MB tensors live at once, filled, then all freed; minor page faults of five rounds
# after three (the heap grows over the first ones), and the heap's free bytes after them.
_ROUNDS = textwrap.dedent("""
    import ctypes, resource, sys, torch
    from aligndraw import allocator
    kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
    def step():
        live = [torch.ones(1 << 21) for _ in range(10)]  # 80 MB, every page touched
        del live
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    class Info(ctypes.Structure):  # glibc's struct mallinfo2
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    print(kept, faults, libc.mallinfo2().fordblks)
""")
PAGES = 5 * 10 * (8 << 20) // 4096  # pages the five rounds touch


def _rounds(mode: str, env: dict | None = None) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True,
                         timeout=120, env=env, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_stays_in_the_heap_and_is_reused_without_page_faults():
    kept, faults, free_bytes = _rounds("keep")
    assert kept
    assert free_bytes >= 80 << 20  # the freed tensors' memory was not given back
    assert faults < PAGES // 20  # 0 to 2,048 seen; glibc's defaults fault 0 to 100,000 here


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_environment_can_keep_glibc_defaults():
    env = dict(os.environ, ALIGNDRAW_MALLOC="default")
    kept, _, _ = _rounds("keep", env)
    assert not kept
