// Runs one of the op's CUDA kernels on the CPU: every block in turn, each with one thread per CUDA thread.
// The kernel's source and name come as -DKERNEL_SOURCE="..." -DKERNEL=...; emu_launch takes its parameters
// as cuLaunchKernel does: an array of pointers to the argument values, in the kernel's order.
#include <barrier>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include KERNEL_SOURCE

alignas(16) float smem[64 * 1024];  // the running block's shared memory (256 KB)
thread_local emu_dim3 emu_thread_idx, emu_block_idx;

namespace {
std::unique_ptr<std::barrier<>> block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
double exchange[32][32];  // [warp][lane]

template <class T>
T from_lane(T v, int src) {
  const int tid = int(emu_thread_idx.x), w = tid / 32, lane = tid % 32;
  std::memcpy(&exchange[w][lane], &v, sizeof(T));
  warp_barriers[w]->arrive_and_wait();
  T out;
  std::memcpy(&out, &exchange[w][src], sizeof(T));
  warp_barriers[w]->arrive_and_wait();
  return out;
}
}  // namespace

void __syncthreads() { block_barrier->arrive_and_wait(); }
float __shfl_xor_sync(unsigned, float v, int o) { return from_lane(v, (int(emu_thread_idx.x) % 32) ^ o); }
double __shfl_xor_sync(unsigned, double v, int o) { return from_lane(v, (int(emu_thread_idx.x) % 32) ^ o); }
float __shfl_up_sync(unsigned, float v, unsigned o) {
  const int lane = int(emu_thread_idx.x) % 32;
  return from_lane(v, lane >= int(o) ? lane - int(o) : lane);
}

// calls f with the argument values behind args[0..n), typed as f's parameters
template <class... A, size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <class... A>
void call(void (*f)(A...), void** args) {
  call(f, args, std::index_sequence_for<A...>{});
}

extern "C" int emu_threads() { return THREADS; }

extern "C" void emu_launch(void** a, int gx, int gy, int gz) {
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x) {
        std::memset(smem, 0xff, sizeof(smem));  // NaN everywhere: a read before a write shows
        block_barrier = std::make_unique<std::barrier<>>(THREADS);
        warp_barriers.clear();
        for (int w = 0; w < THREADS / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        for (int t = 0; t < THREADS; ++t)
          threads.emplace_back([=] {
            emu_thread_idx = {unsigned(t), 0, 0};
            emu_block_idx = {unsigned(x), unsigned(y), unsigned(z)};
            call(KERNEL, a);
          });
        for (auto& th : threads) th.join();
      }
}
