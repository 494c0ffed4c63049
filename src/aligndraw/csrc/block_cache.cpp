// PyTorch's CPU allocator with freed blocks kept by size: a tensor's storage, once freed, waits
// in a list for the next request of exactly its size instead of going back to the C library.
// A training step asks for the same sizes step after step, so after the first step almost every
// request is served from the lists (a hash lookup) where glibc's malloc searched its bins for a
// large block, coalesced neighbours and sorted its unsorted chunks, on the thread the other
// threads wait for. Loaded by aligndraw/allocator.py.
//
// Each block carries its size in a 64-byte header before the data, so the data keeps PyTorch's
// 64-byte alignment and the deleter needs no table. Blocks come from c10::alloc_cpu (PyTorch's
// own aligned allocation, with its out-of-memory error) and go back through c10::free_cpu.
// The lists hold at most `limit` bytes: a block larger than that is given back at once, and a
// free that would pass it first gives every kept block back, so sizes that stop being asked for
// (another caption length, another batch) stay only until the lists fill. A request that finds
// no memory gives every kept block back and tries once more.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <pthread.h>

#include <cstdint>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kHeader = 64;  // keeps the data at PyTorch's alignment
static_assert(kHeader % c10::gAlignment == 0 && kHeader >= sizeof(size_t));

struct Lists {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> blocks;  // by requested size
  size_t kept = 0;        // bytes waiting in the lists
  size_t limit = 0;       // most bytes the lists hold
  size_t allocated = 0;   // bytes in live tensors (for the profiler)
  int64_t hits = 0, misses = 0, releases = 0;
};

Lists& lists() {
  static Lists* instance = new Lists();  // never destroyed: tensors are freed at exit too
  return *instance;
}

size_t& header(void* block) { return *static_cast<size_t*>(block); }
void* data_of(void* block) { return static_cast<char*>(block) + kHeader; }

// Gives every kept block back to the C library; the caller holds the mutex.
void release_all(Lists& l) {
  if (l.kept == 0) return;
  for (auto& [size, blocks] : l.blocks) {
    for (void* block : blocks) c10::free_cpu(block);
  }
  l.blocks.clear();
  l.kept = 0;
  ++l.releases;
}

// Tells the profiler (when it records memory) that `delta` bytes at `data` were taken (> 0) or
// freed (< 0), after the lists were updated; the caller holds the mutex.
void report(void* data, int64_t delta, const Lists& l) {
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(data, delta, l.allocated, l.allocated + l.kept,
                                     c10::Device(c10::DeviceType::CPU));
  }
}

// Keeps a freed block in its size's list, or gives it back; the caller holds the mutex.
void keep(Lists& l, void* block, size_t size) {
  if (size > l.limit) {
    c10::free_cpu(block);
    return;
  }
  if (l.kept + size > l.limit) release_all(l);
  try {
    l.blocks[size].push_back(block);
  } catch (const std::bad_alloc&) {  // no memory for the list itself: give the block back
    c10::free_cpu(block);
    return;
  }
  l.kept += size;
}

void free_block(void* data) {
  if (data == nullptr) return;
  void* block = static_cast<char*>(data) - kHeader;
  const size_t size = header(block);
  Lists& l = lists();
  std::lock_guard<std::mutex> lock(l.mutex);
  l.allocated -= size;
  keep(l, block, size);
  report(data, -static_cast<int64_t>(size), l);
}

// A kept block of n bytes, counted as taken, or nullptr; the caller holds the mutex.
void* take(Lists& l, size_t n) {
  auto found = l.blocks.find(n);
  if (found == l.blocks.end() || found->second.empty()) return nullptr;
  void* block = found->second.back();
  found->second.pop_back();
  l.kept -= n;
  ++l.hits;
  return block;
}

// A new block of n bytes (and its header) from the C library; where none is left, every kept
// block is given back and it tries once more (PyTorch's out-of-memory error if that fails).
void* fresh(Lists& l, size_t n) {
  try {
    return c10::alloc_cpu(n + kHeader);
  } catch (const c10::Error&) {  // alloc_cpu's "not enough memory"
    std::lock_guard<std::mutex> lock(l.mutex);
    release_all(l);
  }
  return c10::alloc_cpu(n + kHeader);
}

struct BlockCache final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &free_block, cpu};
    Lists& l = lists();
    std::unique_lock<std::mutex> lock(l.mutex);
    void* block = take(l, n);
    if (block == nullptr) {
      lock.unlock();  // the C library's allocation without the lists' lock
      block = fresh(l, n);
      header(block) = n;
      lock.lock();
      ++l.misses;
    }
    l.allocated += n;
    report(data_of(block), static_cast<int64_t>(n), l);
    return {data_of(block), data_of(block), &free_block, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

BlockCache* installed = nullptr;  // written once, under std::call_once
std::once_flag install_once;

bool is_installed() { return installed != nullptr && c10::GetCPUAllocator() == installed; }

void lock_lists() { lists().mutex.lock(); }
void unlock_lists() { lists().mutex.unlock(); }

// Makes the block cache PyTorch's CPU allocator for the process (once; later calls set the
// limit, giving every kept block back where the lists hold more). Returns whether it is the
// allocator now (another one registered with a higher priority may be).
bool install(int64_t limit) {
  TORCH_CHECK(limit >= 0, "aligndraw_block_cache: limit must be >= 0 bytes, got ", limit);
  {
    Lists& l = lists();
    std::lock_guard<std::mutex> lock(l.mutex);
    l.limit = static_cast<size_t>(limit);
    if (l.kept > l.limit) release_all(l);
  }
  std::call_once(install_once, [] {
    TORCH_CHECK(pthread_atfork(&lock_lists, &unlock_lists, &unlock_lists) == 0,
                "aligndraw_block_cache: pthread_atfork failed");  // a forked child can lock
    installed = new BlockCache();
    c10::SetCPUAllocator(installed, /*priority=*/1);
  });
  return is_installed();
}

// requests served from the lists, requests that took a new block, bytes waiting in the lists,
// bytes in live tensors from this allocator, times every kept block was given back
std::vector<int64_t> stats() {
  Lists& l = lists();
  std::lock_guard<std::mutex> lock(l.mutex);
  return {l.hits, l.misses, static_cast<int64_t>(l.kept), static_cast<int64_t>(l.allocated),
          l.releases};
}

void release() {
  Lists& l = lists();
  std::lock_guard<std::mutex> lock(l.mutex);
  release_all(l);
}

}  // namespace

TORCH_LIBRARY(aligndraw_block_cache, m) {
  m.def("install(int limit) -> bool", &install);
  m.def("installed() -> bool", &is_installed);
  m.def("stats() -> int[]", &stats);
  m.def("release() -> ()", &release);
}
