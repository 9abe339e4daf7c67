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
//
// The pulls lm, li may be written over the boundary states hm, hi (walk_cuda.py's in_place): each thread reads
// its own elements of the boundary state before it writes its pull to them, so those four pointers carry no
// __restrict__.
#include "cuda_common.cuh"

#if ATOMIC
typedef float kq_t;  // dk, dq: partial sums of one V block, added across blocks
#else
typedef in_t kq_t;
#endif

constexpr int LR = KP / CT;          // threads across one row group (one row of the state)
constexpr int RG = BV / R;           // row groups a block
constexpr int THREADS = RG * LR;
constexpr int E = R * CT;            // state elements a thread
static_assert(BLOCK == 16, "checkpoints every 16 tokens: one staged block");
constexpr int NCK = C / BLOCK - 1;   // checkpoints kept in shared memory (the chunk's start is in global memory)
static_assert(BLOCK % S == 0, "S must divide 16");
static_assert(BV % 32 == 0, "a warp's row sums must belong to one token");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "bad block shape");
static_assert(THREADS <= 512, "the block's two sums per warp must fit the 32 doubles of zred");

extern "C" __global__ void __launch_bounds__(THREADS, MINB) palimpsa_walk_bwd(
    const in_t* __restrict__ q, const in_t* __restrict__ k, const in_t* __restrict__ u,
    const in_t* __restrict__ beta, const float* __restrict__ la, const float* __restrict__ om,
    const float* __restrict__ ip, const float* hm, const float* hi,
    const in_t* __restrict__ dy, const in_t* __restrict__ dvar, kq_t* __restrict__ dq,
    kq_t* __restrict__ dk, in_t* __restrict__ du, in_t* __restrict__ db, float* __restrict__ dc,
    double* __restrict__ dip, double* __restrict__ ps, float* lm, float* li, const int* __restrict__ cu,
    const int* __restrict__ chunk_index, float scale, int TT, int H, int K, int V, int NT) {
  extern __shared__ __align__(16) float smem[];
  double* zred = reinterpret_cast<double*>(smem);           // [2][THREADS / 32] the block's two sums, per warp
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
  int64_t t0;
  int L;
  chunk_span(cu, chunk_index, ic, C, t0, L);
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
  const bool vec = rows_aligned(K, V, (uintptr_t)q | (uintptr_t)k | (uintptr_t)u | (uintptr_t)beta |
                                           (uintptr_t)dy | (HAS_DVAR ? (uintptr_t)dvar : 0));
  // load block b's inputs into the stage: every thread's loads in flight at once, one round trip a block
  int staged = -1;
  auto stage_block = [&](int b) {
    if (b == staged) return;
    staged = b;
    __syncthreads();  // everyone is done with the previous block
    const int64_t first = t0 + b * BLOCK, last = t0 + L;
    stage_rows(sq, q, KP, first, last, H, h, K, 0, K, vec, tid, THREADS);
    stage_rows(sk, k, KP, first, last, H, h, K, 0, K, vec, tid, THREADS);
    stage_rows(su, u, BV, first, last, H, h, V, iv * BV, V, vec, tid, THREADS);
    stage_rows(sb, beta, BV, first, last, H, h, V, iv * BV, V, vec, tid, THREADS);
    stage_rows(sy, dy, BV, first, last, H, h, V, iv * BV, V, vec, tid, THREADS);
    if (HAS_DVAR) stage_rows(sw, dvar, BV, first, last, H, h, V, iv * BV, V, vec, tid, THREADS);
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

  // the chunk's pull on its start state, alpha_1 dS_1^loc, and <pull, start state> (the chunk's sum of the
  // dS^loc part of dL/dc_t); the start state is read before the pull may overwrite it
  float pacc = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (state_ok(e)) {
      const int64_t o = state_index(e);
      const float pm = a_next * gm[e], pi = a_next * gi[e];
      pacc = fmaf(pm, hm[o], fmaf(pi, hi[o], pacc));
      lm[o] = pm;
      li[o] = pi;
    }
  // the block's sums: the Ip gradient and <pull, start state>
  double pz = pacc;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    zacc += __shfl_xor_sync(0xffffffffu, zacc, o);
    pz += __shfl_xor_sync(0xffffffffu, pz, o);
  }
  if ((tid & 31) == 0) { zred[tid / 32] = zacc; zred[THREADS / 32 + tid / 32] = pz; }
  __syncthreads();
  if (tid == 0) {
    double z = 0.0, pt = 0.0;
    for (int w = 0; w < THREADS / 32; ++w) { z += zred[w]; pt += zred[THREADS / 32 + w]; }
    dip[((int64_t)iv * NT + ic) * H + h] = z;
    ps[((int64_t)iv * NT + ic) * H + h] = pt;
  }
}
