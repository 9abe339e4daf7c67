// Just enough of CUDA to run a kernel's source on the CPU: one std::thread per CUDA thread, one block at a
// time, __syncthreads and warp shuffles as barriers. For tests of indexing and arithmetic, not of speed.
// Force-included (g++ -include) before the kernel; cuda_bf16.h and cuda_fp16.h here stand in for CUDA's.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

using std::max;
using std::min;

struct emu_dim3 {
  unsigned x, y, z;
};
extern thread_local emu_dim3 emu_thread_idx, emu_block_idx;
#define threadIdx emu_thread_idx
#define blockIdx emu_block_idx

struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

inline float __expf(float x) { return std::exp(x); }

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int offset);
double __shfl_xor_sync(unsigned mask, double v, int offset);
float __shfl_up_sync(unsigned mask, float v, unsigned offset);
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
