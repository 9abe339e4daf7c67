// What the CUDA kernels (walk_bwd.cu, output_fwd.cu) share: the input dtype, conversions, shared-memory
// reads of staged values, the special-function-unit exp and reciprocal, and the staging of one 16-token
// block's inputs into shared memory as fp32 (one round trip to memory a block, one conversion a value).
//
// Expects the compile-time configuration of the including kernel: IN_T (0 fp32, 1 bf16, 2 fp16), R (value
// rows a thread, a multiple of 4), MINB (blocks a multiprocessor should hold; default 1).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#ifndef __CUDA_ARCH__
#include <cassert>  // the CPU emulation checks the 16-byte alignment the GPU's vector accesses need
#define ALIGNED16(p) assert(reinterpret_cast<uintptr_t>(p) % 16 == 0)
#else
#define ALIGNED16(p)
#endif

#ifndef MINB
#define MINB 1  // blocks a multiprocessor should hold (registers a thread: at most 65536 / (THREADS * MINB))
#endif

#if IN_T == 0
typedef float in_t;
#elif IN_T == 1
typedef __nv_bfloat16 in_t;
#else
typedef __half in_t;
#endif

constexpr int CT = 4;      // key columns a thread
constexpr int BLOCK = 16;  // tokens staged at once
static_assert(R % 4 == 0, "rows a thread come in fours");

__device__ __forceinline__ float f32(float x) { return x; }
__device__ __forceinline__ float f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float f32(__half x) { return __half2float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void put(__half* p, float x) { *p = __float2half_rn(x); }

// four consecutive staged values (shared memory, zero-padded, 16-byte aligned)
__device__ __forceinline__ void lds4(const float* p, float o[4]) {
  ALIGNED16(p);
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}

// R consecutive value rows
__device__ __forceinline__ void lds_rows(const float* p, float o[R]) {
#pragma unroll
  for (int i = 0; i < R; i += 4) lds4(p + i, o + i);
}

// 16 bytes of inputs (8 values of 16 bits or 4 of fp32) as fp32
constexpr int VEC = 16 / sizeof(in_t);
__device__ __forceinline__ void load_vec(const in_t* p, float o[VEC]) {
  ALIGNED16(p);
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const in_t* x = reinterpret_cast<const in_t*>(&v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = f32(x[i]);
}

// ... and VEC fp32 values stored as 16 bytes of outputs
__device__ __forceinline__ void store_vec(in_t* p, const float o[VEC]) {
  uint4 v;
  in_t* x = reinterpret_cast<in_t*>(&v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) put(x + i, o[i]);
  ALIGNED16(p);
  *reinterpret_cast<uint4*>(p) = v;
}

__device__ __forceinline__ float fexp(float x) {  // e^x on the special-function unit, denormals flushed
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
#else  // compiled for the host (the CPU emulation the tests run)
  return expf(x);
#endif
}

__device__ __forceinline__ float rcp(float x) {  // 1 / x on the special-function unit (x > 0: a precision)
#ifdef __CUDA_ARCH__
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return 1.f / x;
#endif
}

// First token and length of global chunk ic (chunk.py's _chunk_span): chunk_index holds (sequence, chunk
// within it) pairs, cu the sequences' offsets
__device__ __forceinline__ void chunk_span(const int* cu, const int* chunk_index, int ic, int chunk,
                                           int64_t& t0, int& L) {
  const int seq = chunk_index[2 * ic], cin = chunk_index[2 * ic + 1];
  t0 = (int64_t)cu[seq] + (int64_t)cin * chunk;
  L = (int)min((int64_t)chunk, (int64_t)cu[seq + 1] - t0);
}

// True where every input row starts on 16 bytes, so staging can use 16-byte loads
__device__ __forceinline__ bool rows_aligned(int K, int V, uintptr_t pointers) {
  return K % VEC == 0 && V % VEC == 0 && pointers % 16 == 0;
}

// Rows [BLOCK][NC] of one [tokens, H, width] input into shared memory as fp32: tokens first .. first + BLOCK
// of head h (zero from token `last` on), columns col0 .. col0 + NC (zero from column `bound` on).
__device__ __forceinline__ void stage_rows(float* dst, const in_t* src, int NC, int64_t first, int64_t last,
                                           int H, int h, int64_t width, int col0, int bound, bool vec,
                                           int tid, int nthreads) {
  const int groups = NC / VEC;
  for (int x = tid; x < BLOCK * groups; x += nthreads) {
    const int t = x / groups, cv = (x % groups) * VEC, col = col0 + cv;
    const int64_t tok = first + t;
    const in_t* row = src + (tok * H + h) * width;
    float o[VEC];
    if (tok < last && vec && col + VEC <= bound) {
      load_vec(row + col, o);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = tok < last && col + i < bound ? f32(row[col + i]) : 0.f;
    }
    ALIGNED16(dst + t * NC + cv);
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      *reinterpret_cast<float4*>(dst + t * NC + cv + i) = make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
  }
}
