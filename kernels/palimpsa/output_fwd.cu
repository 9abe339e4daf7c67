// Forward read-out of the chunked Palimpsa op (chunk.py's _output_fwd), written with an explicit thread layout.
//
// It computes exactly what _output_fwd computes, for one (V block, chunk, head) per thread block: from the
// chunk's boundary state (M, Ibar) saved by _states_fwd, replay the chunk token by token,
//   M_t = alpha_t M_{t-1} + u_t k_t^T,   I_t = alpha_t I_{t-1} + beta_t (k_t^2)^T + (1 - alpha_t) Ip,
// and read out y_t = scale * sum_k M_t q_t / I_t (and the variance scale^2 * sum_k q_t^2 / I_t). Why not
// Triton: each token's sums over K cross the whole state tile, and Triton pays a cross-warp reduction for
// them on every token. Here each thread holds an R x 4 patch of the [V, K] state and a row lies in the lanes
// of one warp, so a token's sums finish inside the warp (the thread's 4 columns, then a butterfly across the
// row's lanes) with no barrier; each 16-token block's inputs are staged in shared memory as fp32 once and its
// outputs leave through shared memory in coalesced stores.
//
// Compile-time configuration (nvcc -D...; output_cuda.py builds one binary per configuration):
//   KP    K padded to a power of two (16..128)     BV   value rows of a block (a multiple of 32)
//   R     value rows of a thread                   C    chunk length (a multiple of 16)
//   IN_T  input dtype: 0 fp32, 1 bf16, 2 fp16      STORE_VAR  the variance is an output
//   MINB  blocks a multiprocessor should hold at once (caps the registers a thread)
#include "cuda_common.cuh"

constexpr int LR = KP / CT;  // lanes across one row of the state (a power of two, at most 32)
constexpr int RG = BV / R;   // row groups a block
constexpr int THREADS = RG * LR;
constexpr int E = R * CT;                       // state elements a thread
constexpr int NVAL = STORE_VAR ? 2 * R : R;     // sums a thread takes part in per token: y rows, then var rows
constexpr int LOG_LR = LR == 4 ? 2 : LR == 8 ? 3 : LR == 16 ? 4 : 5;
constexpr int LOG_NVAL = NVAL == 4 ? 2 : NVAL == 8 ? 3 : NVAL == 16 ? 4 : 5;
constexpr int KEPT = NVAL > LR ? NVAL / LR : 1;  // finished sums a thread holds after the butterfly
// the lanes holding the same finished sums differ in these low bits; the one with them zero writes
constexpr int COPY_BITS = LOG_NVAL >= LOG_LR ? 0 : (1 << (LOG_LR - LOG_NVAL)) - 1;
static_assert(LR >= 4 && LR <= 32 && (1 << LOG_LR) == LR, "KP is 16, 32, 64 or 128");
static_assert((1 << LOG_NVAL) == NVAL, "R a power of two");
static_assert(C % BLOCK == 0, "the chunk is a whole number of staged blocks");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "bad block shape");

// Sums of v[0..NVAL) over the LR lanes of a row. Each halving step exchanges half of the values still held
// with the partner lane (the lane whose `o` bit is set keeps the upper half), so the work halves with the
// values; once one value is left, plain butterfly steps finish it. Returns the index of the first finished
// value this lane holds (KEPT of them, in v[0..KEPT)).
__device__ __forceinline__ int row_sums(float v[NVAL], int lane) {
  int first = 0;
#pragma unroll
  for (int st = 0; st < LOG_LR; ++st) {
    const int o = LR >> (st + 1);
    const int n = NVAL >> st;  // values held before this step
    const bool upper = lane & o;
    if (n > 1) {
#pragma unroll
      for (int i = 0; i < n / 2; ++i) {
        const float send = upper ? v[i] : v[i + n / 2];
        const float keep = upper ? v[i + n / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
      }
      if (upper) first += n / 2;
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
    }
  }
  return first;
}

extern "C" __global__ void __launch_bounds__(THREADS, MINB) palimpsa_output_fwd(
    const in_t* __restrict__ q, const in_t* __restrict__ k, const in_t* __restrict__ u,
    const in_t* __restrict__ beta, const float* __restrict__ la, const float* __restrict__ om,
    const float* __restrict__ ip, const float* __restrict__ hm, const float* __restrict__ hi,
    in_t* __restrict__ y, in_t* __restrict__ var, const int* __restrict__ cu,
    const int* __restrict__ chunk_index, float scale, int H, int K, int V) {
  extern __shared__ __align__(16) float smem[];
  float* als = smem;                 // [C] alpha (1 past the chunk)
  float* cps = als + C;              // [C] (1 - alpha) Ip (0 past the chunk)
  float* sq = cps + C;               // one 16-token block's inputs as fp32: [16][KP] q, k; [16][BV] u, beta
  float* sk = sq + BLOCK * KP;
  float* su = sk + BLOCK * KP;
  float* sb = su + BLOCK * BV;
  float* so = sb + BLOCK * BV;       // its outputs: [16][BV] y, then [16][BV] var

  const int iv = blockIdx.x, ic = blockIdx.y, h = blockIdx.z;
  const int tid = threadIdx.x, rg = tid / LR, j = tid % LR, lane = tid & 31;
  int64_t t0;
  int L;
  chunk_span(cu, chunk_index, ic, C, t0, L);
  const float p = ip[h];
  const int v0 = iv * BV + rg * R;  // this thread's first value row
  const int c0 = j * CT;            // and first key column

  for (int t = tid; t < C; t += THREADS) {
    als[t] = t < L ? __expf(la[(t0 + t) * H + h]) : 1.f;
    cps[t] = t < L ? om[(t0 + t) * H + h] * p : 0.f;
  }
  float M[E], I[E];  // the state, with I = Ibar + Ip carried whole
  const int64_t sbase = ((int64_t)ic * H + h) * V * K;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const bool ok = v0 + e / CT < V && c0 + e % CT < K;
    const int64_t at = sbase + (int64_t)(v0 + e / CT) * K + c0 + e % CT;
    M[e] = ok ? hm[at] : 0.f;
    I[e] = (ok ? hi[at] : 0.f) + p;
  }
  const bool vec = rows_aligned(K, V, (uintptr_t)q | (uintptr_t)k | (uintptr_t)u | (uintptr_t)beta |
                                          (uintptr_t)y | (STORE_VAR ? (uintptr_t)var : 0));
  const float scale2 = scale * scale;

  const int nblk = (L + BLOCK - 1) / BLOCK;
  for (int b = 0; b < nblk; ++b) {
    __syncthreads();  // everyone is done with the previous block's inputs and outputs
    const int64_t first = t0 + b * BLOCK, last = t0 + L;
    stage_rows(sq, q, KP, first, last, H, h, K, 0, K, vec, tid, THREADS);
    stage_rows(sk, k, KP, first, last, H, h, K, 0, K, vec, tid, THREADS);
    stage_rows(su, u, BV, first, last, H, h, V, iv * BV, V, vec, tid, THREADS);
    stage_rows(sb, beta, BV, first, last, H, h, V, iv * BV, V, vec, tid, THREADS);
    __syncthreads();
#pragma unroll 2
    for (int s = 0; s < BLOCK; ++s) {  // (past the chunk: zero inputs, alpha 1, the state stays as it is)
      const float a = als[b * BLOCK + s], c = cps[b * BLOCK + s];
      float qc[CT], kc[CT], ur[R], br[R];
      lds4(sq + s * KP + c0, qc);
      lds4(sk + s * KP + c0, kc);
      lds_rows(su + s * BV + rg * R, ur);
      lds_rows(sb + s * BV + rg * R, br);
      float v[NVAL];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        float ys = 0.f, vs = 0.f;
#pragma unroll
        for (int e = 0; e < CT; ++e) {
          const int x = i * CT + e;
          M[x] = fmaf(a, M[x], ur[i] * kc[e]);
          I[x] = fmaf(a, I[x], fmaf(br[i], kc[e] * kc[e], c));
          const float r = rcp(I[x]);
          ys = fmaf(M[x] * r, qc[e], ys);
          if (STORE_VAR) vs = fmaf(r, qc[e] * qc[e], vs);
        }
        v[i] = ys;
        if (STORE_VAR) v[R + i] = vs;
      }
      const int w = row_sums(v, lane);
      if ((j & COPY_BITS) == 0) {
#pragma unroll
        for (int i = 0; i < KEPT; ++i) {
          const int x = w + i;  // y of row x, or var of row x - R
          if (x < R) {
            so[s * BV + rg * R + x] = v[i] * scale;
          } else {
            so[(BLOCK + s) * BV + rg * R + x - R] = v[i] * scale2;
          }
        }
      }
    }
    __syncthreads();
    // the block's outputs, coalesced along V
    constexpr int GROUPS = BV / VEC;
    for (int x = tid; x < (STORE_VAR ? 2 : 1) * BLOCK * GROUPS; x += THREADS) {
      const int which = x / (BLOCK * GROUPS), t = (x / GROUPS) % BLOCK, cv = (x % GROUPS) * VEC;
      const int64_t tok = first + t;
      const int col = iv * BV + cv;
      if (tok >= last) continue;
      in_t* row = (which ? var : y) + (tok * H + h) * V;
      const float* src = so + (which * BLOCK + t) * BV + cv;
      if (vec && col + VEC <= V) {
        store_vec(row + col, src);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          if (col + i < V) put(row + col + i, src[i]);
      }
    }
  }
}
