// A caching CPU allocator for the enclave process (enclave_runtime/allocator.py installs it).
//
// Why: a compiled enclave stage (AOTInductor) allocates and frees a buffer per kernel output,
// and a decode step makes 121 such calls. glibc's posix_memalign, which torch's default CPU
// allocator calls for every tensor, bypasses glibc's thread cache and splits chunks; in a
// replayed SmolLM2 `slalom` decode step it was ~28 % of the samples. Here a freed block of up
// to kMaxCached bytes goes on a free list of its power-of-two size class and the next
// allocation of that class takes it back: no call into glibc.
//
// Guarantees: every pointer is 64-byte aligned (c10's alignment); an allocation of 0 bytes is
// a null pointer, as torch's own; at most kCacheLimit bytes sit on the free lists (a block
// beyond it is freed to glibc); blocks larger than kMaxCached are allocated and freed as
// before, at their own size. A reused block is not zeroed (nor is glibc's): torch.empty's
// contract. Thread-safe (one mutex; the enclave's stages run one at a time).
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

constexpr size_t kHeader = 64;                 // the size class, ahead of a 64-aligned block
constexpr int kClasses = 17;                   // 64 B << 0 .. 64 B << 16 (4 MiB)
constexpr size_t kMaxCached = size_t(64) << (kClasses - 1);
constexpr size_t kCacheLimit = size_t(64) << 20;  // 64 MiB on the free lists at most
constexpr int kUncached = -1;

// Never destroyed (leaked on purpose): tensors still alive while the process's static
// objects are destroyed at exit (torch's own globals among them) are freed through release(),
// and torch keeps calling the allocator it was given until the very end.
struct FreeLists {
  std::mutex mutex;
  std::vector<void*> blocks[kClasses];
  size_t cached = 0;
};
FreeLists& lists() {
  static FreeLists* state = new FreeLists();
  return *state;
}
std::atomic<uint64_t> g_hits{0};
std::atomic<uint64_t> g_misses{0};

int size_class(size_t n) {
  int k = 0;
  for (size_t size = 64; size < n; size <<= 1) ++k;
  return k;
}

void release(void* user) {
  if (user == nullptr) return;
  char* base = static_cast<char*>(user) - kHeader;
  int k;
  std::memcpy(&k, base, sizeof k);
  if (k >= 0 && k < kClasses) {  // else kUncached: freed at its own size
    const size_t size = size_t(64) << k;
    FreeLists& state = lists();
    std::lock_guard<std::mutex> guard(state.mutex);
    if (state.cached + size <= kCacheLimit) {
      state.blocks[k].push_back(base);
      state.cached += size;
      return;
    }
  }
  c10::free_cpu(base);
}

class CachingCpuAllocator final : public at::Allocator {
 public:
  at::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, at::Device(at::DeviceType::CPU)};
    const int k = n <= kMaxCached ? size_class(n) : kUncached;
    void* base = nullptr;
    if (k != kUncached) {
      FreeLists& state = lists();
      std::lock_guard<std::mutex> guard(state.mutex);
      auto& list = state.blocks[k];
      if (!list.empty()) {
        base = list.back();
        list.pop_back();
        state.cached -= size_t(64) << k;
      }
    }
    if (base != nullptr) {
      g_hits.fetch_add(1, std::memory_order_relaxed);
    } else {
      g_misses.fetch_add(1, std::memory_order_relaxed);
      base = c10::alloc_cpu(kHeader + (k != kUncached ? size_t(64) << k : n));
    }
    std::memcpy(base, &k, sizeof k);
    void* user = static_cast<char*>(base) + kHeader;
    return {user, user, &release, at::Device(at::DeviceType::CPU)};
  }
  at::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCpuAllocator* allocator() {
  static CachingCpuAllocator* instance = new CachingCpuAllocator();  // never destroyed
  return instance;
}

}  // namespace

// Makes it torch's CPU allocator from now on (tensors allocated before keep their deleter).
extern "C" void teesplit_cpu_allocator_install() {
  c10::SetCPUAllocator(allocator(), /*priority=*/1);
}

// Whether it is torch's CPU allocator now.
extern "C" int teesplit_cpu_allocator_active() {
  return c10::GetCPUAllocator() == allocator() ? 1 : 0;
}

// Allocations served from the free lists, allocations that called glibc, bytes cached.
extern "C" void teesplit_cpu_allocator_stats(uint64_t* hits, uint64_t* misses, uint64_t* cached) {
  *hits = g_hits.load();
  *misses = g_misses.load();
  FreeLists& state = lists();
  std::lock_guard<std::mutex> guard(state.mutex);
  *cached = state.cached;
}
