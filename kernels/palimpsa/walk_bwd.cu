// Reverse walk of the one-pass Palimpsa backward (chunk_onepass.py), written with an explicit thread layout.
//
// It computes exactly what chunk_onepass._walk_bwd computes (same inputs, outputs and buffers; the identity
// form of d log alpha), for one (V block, chunk, head) per thread block. Why a second language for one kernel:
// every token of the walk is a short chain of elementwise work followed by sums over K (du, dbeta, z) and over
// V (dk, dq). Triton lays the walk out in the tensor-core accumulator layout, keeps every thread at 255
// registers (8 warps a multiprocessor) and pays cross-warp barriers on every token. Here each thread holds an
// R x 4 patch of the [V, K] state, the per-token sums of S tokens go through shared memory together (two
// barriers per S tokens), the state before each group of S tokens is rebuilt from a checkpoint kept in
// shared memory every 16 tokens instead of by a product from the chunk's start, and each 16-token block's
// inputs are loaded into shared memory once, as fp32 (one round trip to memory a block, not one a token, and
// one conversion a value, not one for every thread that reads it).
//
// Compile-time configuration (nvcc -D...; walk_cuda.py builds one binary per configuration):
//   KP    K padded to a power of two (16..128)     BV   value rows of a block (a multiple of 32)
//   R     value rows of a thread                   S    tokens a sub-chunk (divides 16)
//   C     chunk length (64)                        IN_T input dtype: 0 fp32, 1 bf16, 2 fp16
//   HAS_DVAR  the variance has a gradient          ATOMIC  dk, dq are fp32 sums over V blocks
//   MINB  blocks a multiprocessor should hold at once (caps the registers a thread)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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
#if ATOMIC
typedef float kq_t;  // dk, dq: partial sums of one V block, added across blocks
#else
typedef in_t kq_t;
#endif

constexpr int CT = 4;                // key columns a thread
constexpr int LR = KP / CT;          // threads across one row group (one row of the state)
constexpr int RG = BV / R;           // row groups a block
constexpr int THREADS = RG * LR;
constexpr int E = R * CT;            // state elements a thread
constexpr int BLOCK = 16;            // checkpoint spacing in tokens
constexpr int NCK = C / BLOCK - 1;   // checkpoints kept in shared memory (the chunk's start is in global memory)
static_assert(BLOCK % S == 0, "S must divide 16");
static_assert(BV % 32 == 0, "a warp's row sums must belong to one token");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "bad block shape");

__device__ __forceinline__ float f32(float x) { return x; }
__device__ __forceinline__ float f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float f32(__half x) { return __half2float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void put(__half* p, float x) { *p = __float2half_rn(x); }

// four consecutive staged values (shared memory, zero-padded, 16-byte aligned)
__device__ __forceinline__ void lds4(const float* p, float o[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}

// R consecutive value rows (R a multiple of 4)
__device__ __forceinline__ void lds_rows(const float* p, float o[R]) {
#pragma unroll
  for (int i = 0; i < R; i += 4) lds4(p + i, o + i);
}

// 16 bytes of inputs (8 values of 16 bits or 4 of fp32) as fp32
constexpr int VEC = 16 / sizeof(in_t);
__device__ __forceinline__ void load_vec(const in_t* p, float o[VEC]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const in_t* x = reinterpret_cast<const in_t*>(&v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = f32(x[i]);
}

__device__ __forceinline__ float fexp(float x) {  // e^x on the special-function unit, denormals flushed
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
#else
  return expf(x);
#endif
}

__device__ __forceinline__ float rcp(float x) {  // 1 / x on the special-function unit (x > 0: a precision)
#ifdef __CUDA_ARCH__
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else  // compiled for the host (the CPU emulation the tests run)
  return 1.f / x;
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS, MINB) palimpsa_walk_bwd(
    const in_t* __restrict__ q, const in_t* __restrict__ k, const in_t* __restrict__ u,
    const in_t* __restrict__ beta, const float* __restrict__ la, const float* __restrict__ om,
    const float* __restrict__ ip, const float* __restrict__ hm, const float* __restrict__ hi,
    const in_t* __restrict__ dy, const in_t* __restrict__ dvar, kq_t* __restrict__ dq,
    kq_t* __restrict__ dk, in_t* __restrict__ du, in_t* __restrict__ db, float* __restrict__ dc,
    double* __restrict__ dip, float* __restrict__ lm, float* __restrict__ li, const int* __restrict__ cu,
    const int* __restrict__ chunk_index, float scale, int TT, int H, int K, int V, int NT) {
  static_assert(R % 4 == 0, "rows a thread come in fours");
  extern __shared__ __align__(16) float smem[];
  double* zred = reinterpret_cast<double*>(smem);           // [THREADS / 32] the Ip gradient, per warp
  float* ck = smem + 2 * 32;                                // [NCK][2][E][THREADS] checkpoints (thread-private)
  float* rowbuf = ck + NCK * 2 * E * THREADS;               // [S][LR][BV + 1][4] partial sums over K
  float* colbuf = rowbuf + S * LR * (BV + 1) * 4;           // [S][RG][KP][2] partial sums over V
  float* gcs = colbuf + S * RG * KP * 2;                    // [C] chunk-local cumulative log decay
  float* als = gcs + C;                                     // [C] alpha
  float* cps = als + C;                                     // [C] (1 - alpha) Ip
  // one 16-token block's inputs as fp32, zero past the chunk, K and V: [16][KP] q, k; [16][BV] u, beta, dy, dvar
  float* sq = cps + C;
  float* sk = sq + BLOCK * KP;
  float* su = sk + BLOCK * KP;
  float* sb = su + BLOCK * BV;
  float* sy = sb + BLOCK * BV;
  float* sw = sy + BLOCK * BV;  // (only with HAS_DVAR)

  const int iv = blockIdx.x, ic = blockIdx.y, h = blockIdx.z;
  const int tid = threadIdx.x, rg = tid / LR, j = tid % LR;
  const int seq = chunk_index[2 * ic], cin = chunk_index[2 * ic + 1];
  const int64_t t0 = (int64_t)cu[seq] + (int64_t)cin * C;
  const int L = (int)min((int64_t)C, (int64_t)cu[seq + 1] - t0);
  const float p = ip[h];
  const int v0 = iv * BV + rg * R;  // this thread's first value row
  const int c0 = j * CT;            // and first key column

  // the chunk's decays, with a warp scan for the cumulative sum (tokens past L: alpha 1, no prior pull)
  if (tid < 32) {
    float g[C / 32];
    float run = 0.f;
#pragma unroll
    for (int r = 0; r < C / 32; ++r) {
      const int t = tid * (C / 32) + r;
      const float x = t < L ? la[(t0 + t) * H + h] : 0.f;
      als[t] = __expf(x);
      cps[t] = t < L ? om[(t0 + t) * H + h] * p : 0.f;
      run += x;
      g[r] = run;
    }
    float incl = run;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, incl, o);
      if (tid >= o) incl += y;
    }
    const float excl = incl - run;
#pragma unroll
    for (int r = 0; r < C / 32; ++r) gcs[tid * (C / 32) + r] = excl + g[r];
  }
  __syncthreads();

  const int64_t sbase = ((int64_t)ic * H + h) * V * K;  // this chunk's boundary state
  auto state_index = [&](int e) -> int64_t { return sbase + (int64_t)(v0 + e / CT) * K + c0 + e % CT; };
  auto state_ok = [&](int e) -> bool { return v0 + e / CT < V && c0 + e % CT < K; };
  // 16-byte loads where every row starts on 16 bytes (else one value at a time)
  const bool vec = K % VEC == 0 && V % VEC == 0 &&
                   (((uintptr_t)q | (uintptr_t)k | (uintptr_t)u | (uintptr_t)beta | (uintptr_t)dy |
                     (HAS_DVAR ? (uintptr_t)dvar : 0)) % 16) == 0;
  // rows [16][NC] of one input from column col0 on, as fp32; zero past the chunk and past `bound` columns
  auto stage_rows = [&](float* dst, const in_t* src, int NC, int64_t width, int col0, int bound, int b) {
    const int groups = NC / VEC;
    for (int x = tid; x < BLOCK * groups; x += THREADS) {
      const int t = x / groups, cv = (x % groups) * VEC, tc = b * BLOCK + t, col = col0 + cv;
      const in_t* row = src + ((t0 + tc) * H + h) * width;
      float o[VEC];
      if (tc < L && vec && col + VEC <= bound) {
        load_vec(row + col, o);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] = tc < L && col + i < bound ? f32(row[col + i]) : 0.f;
      }
#pragma unroll
      for (int i = 0; i < VEC; i += 4)
        *reinterpret_cast<float4*>(dst + t * NC + cv + i) = make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
    }
  };
  // load block b's inputs into the stage: every thread's loads in flight at once, one round trip a block
  int staged = -1;
  auto stage_block = [&](int b) {
    if (b == staged) return;
    staged = b;
    __syncthreads();  // everyone is done with the previous block
    stage_rows(sq, q, KP, K, 0, K, b);
    stage_rows(sk, k, KP, K, 0, K, b);
    stage_rows(su, u, BV, V, iv * BV, V, b);
    stage_rows(sb, beta, BV, V, iv * BV, V, b);
    stage_rows(sy, dy, BV, V, iv * BV, V, b);
    if (HAS_DVAR) stage_rows(sw, dvar, BV, V, iv * BV, V, b);
    __syncthreads();
  };
  auto at_k = [&](const float* a, int t) { return a + (t & (BLOCK - 1)) * KP + c0; };
  auto at_v = [&](const float* a, int t) { return a + (t & (BLOCK - 1)) * BV + rg * R; };

  // state after token `end - 1` from the state X after token `start - 1` (both chunk-local), by rank-one sums:
  // X e^{G(end-1) - G(start-1)} + sum_j e^{G(end-1) - G(j)} (u_j k_j, beta_j k_j^2); every weight is <= 1
  auto advance = [&](float M[E], float Ib[E], int start, int end) {
    const float g_end = gcs[end - 1];
    const float d = fexp(g_end - (start > 0 ? gcs[start - 1] : 0.f));
#pragma unroll
    for (int e = 0; e < E; ++e) { M[e] *= d; Ib[e] *= d; }
#pragma unroll 4
    for (int t = start; t < end; ++t) {
      const float w = fexp(g_end - gcs[t]);
      float kc[CT], ur[R], br[R];
      lds4(at_k(sk, t), kc);
      lds_rows(at_v(su, t), ur);
      lds_rows(at_v(sb, t), br);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const float uw = ur[i] * w, bw = br[i] * w;
#pragma unroll
        for (int e = 0; e < CT; ++e) {
          M[i * CT + e] = fmaf(uw, kc[e], M[i * CT + e]);
          Ib[i * CT + e] = fmaf(bw, kc[e] * kc[e], Ib[i * CT + e]);
        }
      }
    }
  };
  auto load_start = [&](float M[E], float Ib[E]) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool ok = state_ok(e);
      M[e] = ok ? hm[state_index(e)] : 0.f;
      Ib[e] = ok ? hi[state_index(e)] : 0.f;
    }
  };
  auto ck_at = [&](int b, int w, int e) -> float& { return ck[((b * 2 + w) * E + e) * THREADS + tid]; };

  // checkpoints: the state before tokens 16, 32, 48 (as far as the chunk goes)
  const int nblk = (L + BLOCK - 1) / BLOCK;
  {
    float M[E], Ib[E];
    load_start(M, Ib);
    for (int b = 1; b < nblk; ++b) {
      stage_block(b - 1);
      advance(M, Ib, (b - 1) * BLOCK, b * BLOCK);
#pragma unroll
      for (int e = 0; e < E; ++e) { ck_at(b - 1, 0, e) = M[e]; ck_at(b - 1, 1, e) = Ib[e]; }
    }
  }

  float gm[E], gi[E];  // the chunk's own adjoint on (M, I), from zero at its end
#pragma unroll
  for (int e = 0; e < E; ++e) { gm[e] = 0.f; gi[e] = 0.f; }
  float a_next = 1.f;  // alpha of the token after the current one
  double zacc = 0.0;   // this thread's share of the Ip gradient
  const float scale2 = scale * scale;

  const int nsub = (L + S - 1) / S;
  for (int jj = nsub - 1; jj >= 0; --jj) {
    const int s0 = jj * S, b = s0 / BLOCK;
    stage_block(b);
    // the state before the sub-chunk, from its block's checkpoint
    float Ms[S][E], Is[S][E];
    {
      float M[E], Ib[E];
      if (b == 0) {
        load_start(M, Ib);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) { M[e] = ck_at(b - 1, 0, e); Ib[e] = ck_at(b - 1, 1, e); }
      }
      if (s0 > b * BLOCK) advance(M, Ib, b * BLOCK, s0);
      // replay the sub-chunk, keeping every token's state (I = Ibar + Ip carried whole)
#pragma unroll
      for (int e = 0; e < E; ++e) Ib[e] += p;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int t = s0 + s;
        const float a = als[t], c = cps[t];
        float kc[CT], ur[R], br[R];  // (zero past the chunk: the state stays as it is)
        lds4(at_k(sk, t), kc);
        lds_rows(at_v(su, t), ur);
        lds_rows(at_v(sb, t), br);
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int e = 0; e < CT; ++e) {
            const int x = i * CT + e;
            M[x] = fmaf(a, M[x], ur[i] * kc[e]);
            Ib[x] = fmaf(a, Ib[x], fmaf(br[i], kc[e] * kc[e], c));
            Ms[s][x] = M[x];
            Is[s][x] = Ib[x];
          }
      }
    }
    __syncthreads();  // the previous sub-chunk's sums have been read

    // walk the sub-chunk backwards; each token's partial sums go to shared memory
#pragma unroll
    for (int ss = 0; ss < S; ++ss) {
      const int s = S - 1 - ss;
      const int t = s0 + s;
      float qc[CT], kc[CT], ur[R], br[R], sdo[R], wv[R];
      lds4(at_k(sq, t), qc);
      lds4(at_k(sk, t), kc);
      lds_rows(at_v(su, t), ur);
      lds_rows(at_v(sb, t), br);
      lds_rows(at_v(sy, t), sdo);
      if (HAS_DVAR) {
        lds_rows(at_v(sw, t), wv);
      } else {
#pragma unroll
        for (int i = 0; i < R; ++i) wv[i] = 0.f;
      }
      float rsum[R][4];  // du, dbeta, z (sum of the direct I-adjoint), <dvar, var>'s share, per row
      float ca[CT], cb[CT], cq[CT];  // sum_v gm u, sum_v gi beta, dq, per column
#pragma unroll
      for (int e = 0; e < CT; ++e) { ca[e] = 0.f; cb[e] = 0.f; cq[e] = 0.f; }
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const float sd = scale * sdo[i];
        const float ws = scale2 * wv[i];
        float r_du = 0.f, r_db = 0.f, r_z = 0.f, r_v = 0.f;
#pragma unroll
        for (int e = 0; e < CT; ++e) {
          const int x = i * CT + e;
          const float rc = rcp(Is[s][x]);
          const float mu = Ms[s][x] * rc;
          const float d_m = (sd * rc) * qc[e];
          float d_i = -d_m * mu;
          cq[e] = fmaf(sd, mu, cq[e]);  // dq: sum_v sd_v mu_v (+ the variance's term)
          if (HAS_DVAR) {
            const float wr = ws * rc;
            const float x_v = wr * (qc[e] * qc[e]);
            d_i -= x_v * rc;
            cq[e] = fmaf(2.f * qc[e], wr, cq[e]);
            r_v += x_v;
          }
          gm[x] = fmaf(a_next, gm[x], d_m);
          gi[x] = fmaf(a_next, gi[x], d_i);
          r_du = fmaf(gm[x], kc[e], r_du);
          r_db = fmaf(gi[x], kc[e] * kc[e], r_db);
          r_z += d_i;
          ca[e] = fmaf(gm[x], ur[i], ca[e]);
          cb[e] = fmaf(gi[x], br[i], cb[e]);
        }
        rsum[i][0] = r_du; rsum[i][1] = r_db; rsum[i][2] = r_z; rsum[i][3] = r_v;
      }
      a_next = als[t];
#pragma unroll
      for (int i = 0; i < R; ++i)
        reinterpret_cast<float4*>(rowbuf)[(s * LR + j) * (BV + 1) + rg * R + i] =
            make_float4(rsum[i][0], rsum[i][1], rsum[i][2], rsum[i][3]);
      float4* cdst = reinterpret_cast<float4*>(colbuf + ((s * RG + rg) * KP + c0) * 2);
      cdst[0] = make_float4(fmaf(2.f * kc[0], cb[0], ca[0]), cq[0], fmaf(2.f * kc[1], cb[1], ca[1]), cq[1]);
      cdst[1] = make_float4(fmaf(2.f * kc[2], cb[2], ca[2]), cq[2], fmaf(2.f * kc[3], cb[3], ca[3]), cq[3]);
    }
    __syncthreads();

    // finish the sums: a row task per (token, value row), a column task per (token, key column)
    for (int task = tid; task < S * (BV + KP); task += THREADS) {
      if (task < S * BV) {
        const int s = task / BV, v = task % BV;
        const int t = s0 + s;
        if (t >= L) continue;  // (a warp's row tasks share their token)
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int jl = 0; jl < LR; ++jl) {
          const float4 x = reinterpret_cast<const float4*>(rowbuf)[(s * LR + jl) * (BV + 1) + v];
          acc.x += x.x; acc.y += x.y; acc.z += x.z; acc.w += x.w;
        }
        const int vg = iv * BV + v;
        float term = 0.f;
        if (vg < V) {
          const int64_t o = ((t0 + t) * H + h) * (int64_t)V + vg;
          put(du + o, acc.x);
          put(db + o, acc.y);
          // this row of dL/dc_t = -Ip z_t - <dvar_t, var_t> - <u_t, du_t> - <beta_t, dbeta_t>
          const float uo = su[(t & (BLOCK - 1)) * BV + v], bo = sb[(t & (BLOCK - 1)) * BV + v];
          term = p * acc.z + acc.w + uo * acc.x + bo * acc.y;
          zacc += (double)acc.z;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) term += __shfl_xor_sync(0xffffffffu, term, o);
        if ((tid & 31) == 0) atomicAdd(dc + ((int64_t)iv * TT + t0 + t) * H + h, -term);
      } else {
        const int ct = task - S * BV;
        const int s = ct / KP, c = ct % KP;
        const int t = s0 + s;
        if (t >= L || c >= K) continue;
        float2 acc = make_float2(0.f, 0.f);
#pragma unroll
        for (int r = 0; r < RG; ++r) {
          const float2 x = reinterpret_cast<const float2*>(colbuf)[(s * RG + r) * KP + c];
          acc.x += x.x; acc.y += x.y;
        }
        const int64_t o = ((t0 + t) * H + h) * (int64_t)K + c;
#if ATOMIC
        atomicAdd(dk + o, acc.x);
        atomicAdd(dq + o, acc.y);
#else
        put(dk + o, acc.x);
        put(dq + o, acc.y);
#endif
      }
    }
  }

  // the chunk's pull on its start state, alpha_1 dS_1^loc, and its share of the Ip gradient
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (state_ok(e)) {
      lm[state_index(e)] = a_next * gm[e];
      li[state_index(e)] = a_next * gi[e];
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) zacc += __shfl_xor_sync(0xffffffffu, zacc, o);
  if ((tid & 31) == 0) zred[tid / 32] = zacc;
  __syncthreads();
  if (tid == 0) {
    double z = 0.0;
    for (int w = 0; w < THREADS / 32; ++w) z += zred[w];
    dip[((int64_t)iv * NT + ic) * H + h] = z;
  }
}
