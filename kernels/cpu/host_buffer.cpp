#include "vqtok/host_buffer.h"

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vqtok {

namespace {

constexpr size_t kHuge = size_t{2} << 20;  // x86-64 huge page
size_t round_up(size_t a, size_t b) { return (a + b - 1) / b * b; }

struct Mapping {
  void* p;
  size_t bytes;  // a multiple of kHuge
  bool huge;
};

struct Cache {
  std::mutex mu;
  std::deque<Mapping> free;  // oldest first
  size_t bytes = 0;
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: buffers may be freed during interpreter exit
  return *c;
}

Mapping map_fresh(size_t bytes) {
#if defined(__linux__)
  // Map one extra huge page, then unmap the unaligned head and tail.
  const size_t span = bytes + kHuge;
  void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t base = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = round_up(base, kHuge);
  if (aligned > base) munmap(p, aligned - base);
  const size_t tail = base + span - (aligned + bytes);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  void* a = reinterpret_cast<void*>(aligned);
  return {a, bytes, madvise(a, bytes, MADV_HUGEPAGE) == 0};
#else
  void* a = std::aligned_alloc(kHuge, bytes);
  if (a == nullptr) throw std::bad_alloc();
  return {a, bytes, false};
#endif
}

void unmap(const Mapping& m) {
#if defined(__linux__)
  munmap(m.p, m.bytes);
#else
  std::free(m.p);
#endif
}

}  // namespace

HostBuffer::HostBuffer(size_t bytes) : bytes_(bytes) {
  mapped_ = round_up(bytes > 0 ? bytes : 1, kHuge);
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    for (auto it = c.free.rbegin(); it != c.free.rend(); ++it) {  // newest first: warmest pages
      if (it->bytes != mapped_) continue;
      data_ = it->p, huge_ = it->huge, recycled_ = true;
      c.bytes -= it->bytes;
      c.free.erase(std::next(it).base());
      return;
    }
  }
  const Mapping m = map_fresh(mapped_);
  data_ = m.p, huge_ = m.huge;
}

HostBuffer::~HostBuffer() {
  const Mapping m{data_, mapped_, huge_};
  if (m.bytes > kHostBufferCacheBytes) {
    unmap(m);
    return;
  }
  std::deque<Mapping> evict;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    c.free.push_back(m);
    c.bytes += m.bytes;
    while (c.bytes > kHostBufferCacheBytes) {
      evict.push_back(c.free.front());
      c.bytes -= c.free.front().bytes;
      c.free.pop_front();
    }
  }
  for (const Mapping& e : evict) unmap(e);
}

size_t host_buffer_cached_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.bytes;
}

void release_host_buffers() {
  std::deque<Mapping> all;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    all.swap(c.free);
    c.bytes = 0;
  }
  for (const Mapping& e : all) unmap(e);
}

}  // namespace vqtok
