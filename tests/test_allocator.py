"""``aligndraw.allocator``: freed memory kept for reuse, checked by the kernel's page-fault count,
and the block cache, checked by where its tensors' storage comes from.

The setting is process-wide and cannot be undone, so each side runs in a process of its own.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aligndraw import allocator, extensions

from conftest import needs_block_cache

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


def _run(script: str, *args: str, env: dict | None = None) -> dict:
    """``script``'s last printed line, as JSON, from a new process (the settings are process-wide)."""
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True,
                         text=True, env=env, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def _probe(setting: str) -> dict:
    # glibc's setting alone, not the block cache
    return _run(PROBE, setting, env=os.environ | {allocator.BLOCK_CACHE_ENV: "0"})


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
    env[allocator.BLOCK_CACHE_ENV] = "0"  # not needed here
    if numpy_env is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = numpy_env
    return _run(HUGE_PAGES, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keeping_freed_memory_stops_numpys_huge_page_marks_unless_the_user_set_them():
    unset = _probe_huge_pages(None)
    if not unset["kept"]:
        pytest.skip("this C library took no mmap threshold: nothing is kept, numpy is left alone")
    assert unset["huge_pages"] is False
    assert _probe_huge_pages("1")["huge_pages"] is True  # NUMPY_MADVISE_HUGEPAGE=1 stands


# --- the block cache (csrc/block_cache.cpp): PyTorch's CPU allocator for the whole process, so
# each case runs in a process of its own

BLOCKS = textwrap.dedent("""
    import json, sys
    import torch
    from aligndraw import allocator
    installed = allocator.cache_blocks(int(sys.argv[1]))
    a = torch.empty(1000, 250)  # 1,000,000 bytes
    where = a.data_ptr()
    del a
    before = allocator.block_cache_stats()
    b = torch.empty(250, 1000)  # the same bytes in another shape: the same block
    c = torch.empty(1001, 250)  # another size: a new block (counted as a miss)
    after = allocator.block_cache_stats()
    empties = [torch.empty(0), torch.empty(3, 0)]  # no block at all
    aligned = all(torch.empty(n).data_ptr() % 64 == 0 for n in (1, 3, 17, 1000, 250000))
    print(json.dumps({"installed": installed, "same_block": b.data_ptr() == where,
                      "before": before, "after": after, "aligned": aligned,
                      "empties": [e.numel() for e in empties]}))
""")


@needs_block_cache
def test_a_freed_block_is_handed_to_the_next_request_of_its_size():
    got = _run(BLOCKS, str(allocator.BLOCK_CACHE_LIMIT))
    assert got["installed"] and got["same_block"]
    assert got["before"]["kept"] == 1_000_000 and got["before"]["live"] == 0
    assert got["after"]["hits"] == got["before"]["hits"] + 1  # b
    assert got["after"]["misses"] == got["before"]["misses"] + 1  # c
    assert got["after"]["kept"] == 0 and got["after"]["live"] == 2_001_000
    assert got["aligned"] and got["empties"] == [0, 0]


LIMIT = textwrap.dedent("""
    import json
    import torch
    from aligndraw import allocator
    allocator.cache_blocks(1_500_000)  # bytes: room for one 1 MB block, not two
    a, b = torch.empty(250_000), torch.empty(250_000)
    del a
    one = allocator.block_cache_stats()
    del b  # two would pass the limit: every kept block is given back first, then b's is kept
    two = allocator.block_cache_stats()
    big = torch.empty(500_000)  # 2 MB, over the limit: given back at once, the kept block stays
    del big
    too_big = allocator.block_cache_stats()
    allocator.cache_blocks(0)  # a lower limit gives back what it cannot hold
    lowered = allocator.block_cache_stats()
    c = torch.empty(250_000)
    del c  # limit 0: nothing is kept
    none_kept = allocator.block_cache_stats()
    allocator.cache_blocks(1_500_000)
    d = torch.empty(250_000)
    del d
    allocator.release_cached_blocks()
    print(json.dumps({"one": one, "two": two, "too_big": too_big, "lowered": lowered,
                      "none_kept": none_kept, "released": allocator.block_cache_stats()}))
""")


@needs_block_cache
def test_the_cache_keeps_at_most_its_limit_and_gives_blocks_back():
    got = _run(LIMIT)
    assert got["one"]["kept"] == 1_000_000 and got["one"]["releases"] == 0
    assert got["two"]["kept"] == 1_000_000 and got["two"]["releases"] == 1
    assert got["too_big"]["kept"] == 1_000_000 and got["too_big"]["releases"] == 1
    assert got["lowered"]["kept"] == 0 and got["lowered"]["releases"] == 2
    assert got["none_kept"]["kept"] == 0 and got["none_kept"]["releases"] == 2
    assert got["released"]["kept"] == 0 and got["released"]["live"] == 0
    assert got["released"]["releases"] == 3  # d's block, kept under the raised limit, went back


SAME_RESULTS = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from conftest import random_batch, tiny_config
    from aligndraw import allocator
    from aligndraw.model import AlignDraw

    def step():  # a training step's loss and gradients, the same weights and noise each time
        torch.manual_seed(0)
        model = AlignDraw(tiny_config())
        images, tokens, lengths = random_batch(model.config)
        loss = model(images, tokens, lengths, generator=torch.Generator().manual_seed(1)).loss
        loss.backward()
        return [loss.detach(), *(p.grad for p in model.parameters())]

    want = step()  # PyTorch's own allocator
    assert allocator.cache_blocks()
    for _ in range(3):  # later steps take the blocks earlier steps freed, with their old contents
        got = step()
    hits = allocator.block_cache_stats()["hits"]
    print(json.dumps({"equal": all(torch.equal(g, w) for g, w in zip(got, want)), "hits": hits}))
""")


@needs_block_cache
def test_a_training_step_gives_the_same_results_from_reused_blocks():
    got = _run(SAME_RESULTS, str(Path(__file__).parent))
    assert got["hits"] > 0 and got["equal"]


FORK = textwrap.dedent("""
    import json, os, threading
    import torch
    from aligndraw import allocator
    allocator.cache_blocks()
    # the calls the child makes, once before the other thread starts: their first call runs
    # PyTorch's one-time static initialisers, and a child forked while the other thread is
    # inside one would wait for it forever (that lock is the C++ runtime's, not the lists')
    torch.empty(1000).fill_(1.0)
    allocator.block_cache_stats()
    # the other thread's calls: each allocates 20000 tensors in C++, without the GIL, so the
    # lists' lock is often held when the main thread forks. Without the fork handlers this
    # script hung in 3 of 3 runs (4 of 6 with 100 forks; one tensor a call and 20 forks: 0 of 3)
    small = [torch.empty(8) for _ in range(20000)]
    torch._foreach_add(small, 1.0)
    stop = threading.Event()

    def churn():  # another thread takes and frees blocks while the main thread forks
        while not stop.is_set():
            torch._foreach_add(small, 1.0)

    thread = threading.Thread(target=churn)
    thread.start()
    codes = []
    for _ in range(300):
        pid = os.fork()
        if pid == 0:  # the child takes and frees blocks through the inherited cache
            before = allocator.block_cache_stats()
            for n in range(50):
                torch.empty(1000 + n % 5).fill_(1.0)  # five sizes: the later ones are hits
            after = allocator.block_cache_stats()
            os._exit(0 if after["hits"] >= before["hits"] + 45 else 3)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    stop.set()
    thread.join()
    print(json.dumps({"codes": codes}))
""")


@needs_block_cache
@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_forked_child_takes_blocks_while_another_thread_held_the_lists():
    # without the fork handlers a child forked while the other thread held the lists' lock
    # would wait for it forever, and the timeout fails the test
    # (docs/benchmarks/fork-test-sensitivity-zen3.txt: how often, measured)
    assert _run(FORK)["codes"] == [0] * 300


PROFILED = textwrap.dedent("""
    import json
    import torch
    from aligndraw import allocator
    allocator.cache_blocks()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        x = torch.ones(1000, 1000)
        del x
    usage = [e.cpu_memory_usage for e in prof.events() if e.name == "aten::empty"]
    print(json.dumps({"usage": usage}))
""")


@needs_block_cache
def test_the_profiler_still_sees_the_step_s_memory():
    assert 4_000_000 in _run(PROFILED)["usage"]  # the (1000, 1000) floats torch.ones took


KEEP = textwrap.dedent("""
    import json
    from aligndraw import allocator
    allocator.keep_freed_memory()
    print(json.dumps({"cached": allocator.block_cache_installed()}))
""")


@needs_block_cache
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize(("value", "want"), [(None, True), ("1", True), ("0", False)])
def test_keeping_freed_memory_caches_blocks_unless_turned_off(value, want):
    env = {k: v for k, v in os.environ.items() if k != allocator.BLOCK_CACHE_ENV}
    if value is not None:
        env[allocator.BLOCK_CACHE_ENV] = value
    assert _run(KEEP, env=env)["cached"] is want


def test_without_a_toolchain_pytorch_s_allocator_stays(monkeypatch, caplog):
    monkeypatch.setattr(extensions.shutil, "which", lambda name: None)
    monkeypatch.setenv("CXX", "my-c++")
    allocator._load_block_cache.cache_clear()  # this process may have loaded it before
    try:
        with caplog.at_level("INFO", logger="aligndraw.allocator"):
            assert allocator.cache_blocks() is False
        assert allocator.block_cache_stats() is None
        assert "no C++ compiler (my-c++; set CXX) to build the CPU block cache" in caplog.text
        assert "PyTorch's own CPU allocator stays" in caplog.text
    finally:
        allocator._load_block_cache.cache_clear()


def test_a_negative_limit_is_refused():
    with pytest.raises(ValueError, match="limit must be ≥ 0 bytes, got -1"):
        allocator.cache_blocks(-1)
