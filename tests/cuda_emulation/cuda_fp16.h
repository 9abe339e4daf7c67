// float16 for the CPU emulation (cuda_emulation.h), through the compiler's _Float16.
#pragma once

struct __half {
  _Float16 v;
};
struct __half2 {
  __half x, y;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return {_Float16(f)}; }
