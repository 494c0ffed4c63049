"""``aligndraw.allocator``: freed memory kept for reuse, checked by the kernel's page-fault count.

The setting is process-wide and cannot be undone, so each side runs in a process of its own.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aligndraw import allocator

PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from aligndraw import allocator
    kept = allocator.keep_freed_memory() if sys.argv[1] == "kept" else 0
    faults = []
    for _ in range(30):  # a 64 MB block, freed and taken again, as a training step does
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 * 2**20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del block
    print(json.dumps({"kept": kept, "faults": faults}))
""")


def _probe(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_taken_again_without_new_page_faults():
    kept = _probe("kept")
    if kept["kept"] < 64 << 20:
        pytest.skip(f"this C library took an mmap threshold of {kept['kept']} bytes: a 64 MB block "
                    "stays a fresh mapping")
    default = _probe("default")
    # by default every new block is fresh pages from the kernel: it faults each time
    assert min(default["faults"]) > 0
    # kept, the heap grows for the first few blocks before freed ones are taken again; from
    # then on the blocks come from memory already faulted in
    assert sum(kept["faults"][-10:]) * 10 < sum(default["faults"][-10:])


@pytest.mark.parametrize(("device", "env", "want"), [
    ("cpu", None, True), (torch.device("cpu"), "1", True), ("cuda:0", None, False),
    (torch.device("cuda", 1), None, False), ("cpu", "0", False)])
def test_only_a_cpu_process_keeps_freed_memory(monkeypatch, device, env, want):
    if env is None:
        monkeypatch.delenv(allocator.ENV, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV, env)
    assert allocator.wanted_on(device) is want


@pytest.mark.parametrize(("value", "want"), [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_the_environment_can_turn_it_off(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(allocator.ENV, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV, value)
    assert allocator.wanted() is want


HUGE_PAGES = textwrap.dedent("""
    import json, os
    try:  # numpy's switch returns the setting it replaces
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        from numpy.core.multiarray import _set_madvise_hugepage
    from aligndraw import allocator
    if "NUMPY_MADVISE_HUGEPAGE" not in os.environ:
        _set_madvise_hugepage(True)  # numpy's default from Linux 4.6 on, whatever this kernel
    kept = allocator.keep_freed_memory()
    print(json.dumps({"kept": kept, "huge_pages": bool(_set_madvise_hugepage(True))}))
""")


def _probe_huge_pages(numpy_env: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if numpy_env is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = numpy_env
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keeping_freed_memory_stops_numpys_huge_page_marks_unless_the_user_set_them():
    unset = _probe_huge_pages(None)
    if not unset["kept"]:
        pytest.skip("this C library took no mmap threshold: nothing is kept, numpy is left alone")
    assert unset["huge_pages"] is False
    assert _probe_huge_pages("1")["huge_pages"] is True  # NUMPY_MADVISE_HUGEPAGE=1 stands
