// Large host output buffers backed by transparent huge pages, recycled (torch-free).
//
// A fresh allocation of tens of MiB comes straight from the OS (glibc maps every block above
// 32 MiB with mmap and unmaps it on free), so a kernel writing it first takes one page fault per
// 4 KiB page: ~19k faults for a 75 MiB output, costing as much as the kernel itself. A HostBuffer
// is 2 MiB aligned and marked MADV_HUGEPAGE (with THP in "madvise" or "always" mode its first
// touch faults once per 2 MiB; where THP is off it behaves like a plain mapping), and when it is
// freed its pages go to a small process-wide cache (at most kHostBufferCacheBytes, oldest
// unmapped first) from which the next buffer of the same size is served without any fault, the
// way glibc's heap already recycles smaller blocks.
#pragma once

#include <cstddef>

namespace vqtok {

constexpr size_t kHostBufferCacheBytes = size_t{256} << 20;

class HostBuffer {
 public:
  explicit HostBuffer(size_t bytes);  // throws std::bad_alloc when the OS refuses
  ~HostBuffer();                      // returns the pages to the cache (or unmaps them)
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return bytes_; }     // the size asked for
  bool huge_pages() const { return huge_; }  // madvise(MADV_HUGEPAGE) succeeded
  bool recycled() const { return recycled_; }  // served from the cache

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0, mapped_ = 0;
  bool huge_ = false, recycled_ = false;
};

// Bytes held by the cache of freed buffers, and a call that unmaps them all.
size_t host_buffer_cached_bytes();
void release_host_buffers();

}  // namespace vqtok
