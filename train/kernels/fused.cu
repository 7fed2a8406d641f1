// CUDA kernels of cpt's fused ops (train/src/model/fused/cuda.rs launches them). Each kernel exists
// for float and bf16 storage (suffix _f32, _bf16) and computes in float. Rows are independent: one
// block per row for the reductions, a grid-stride loop for elementwise work. Reductions run in a
// fixed order, so a step computes the same bits every time it runs (exact resume on GPUs too).
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Sum (or max) of one value per thread over the block; every thread gets the result. blockDim.x is a
// multiple of 32, at most 1024.
template <bool MAX> __device__ float block_reduce(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) {
    float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, other) : v + other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // the previous call's readers are done with `partial` and `total`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? partial[lane] : (MAX ? -CUDART_INF_F : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
      float other = __shfl_xor_sync(0xffffffffu, v, o);
      v = MAX ? fmaxf(v, other) : v + other;
    }
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

// ---- RMSNorm: y = x · r · w with r = 1/sqrt(mean(x²) + eps); one block per row of h.
template <typename T> __device__ float inv_rms(const T* x, int h, float eps) {
  float ss = 0.0f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = to_float(x[j]); ss += v * v; }
  return rsqrtf(block_sum(ss) / h + eps);
}

template <typename T> __device__ void rms_norm_fwd(const T* x, const T* w, T* y, int h, float eps) {
  x += (int64_t)blockIdx.x * h; y += (int64_t)blockIdx.x * h;
  const float r = inv_rms(x, h, eps);
  for (int j = threadIdx.x; j < h; j += blockDim.x) y[j] = from_float<T>(to_float(x[j]) * r * to_float(w[j]));
}

// dx = r · (w·g − x̂ · mean(w·g·x̂)), x̂ = r·x.
template <typename T> __device__ void rms_norm_bwd_x(const T* x, const T* w, const T* g, T* dx, int h, float eps) {
  const int64_t row = (int64_t)blockIdx.x * h;
  x += row; g += row; dx += row;
  const float r = inv_rms(x, h, eps);
  float dot = 0.0f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) dot += to_float(w[j]) * to_float(g[j]) * to_float(x[j]) * r;
  dot = block_sum(dot) / h;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const float v = to_float(x[j]);
    dx[j] = from_float<T>(r * (to_float(w[j]) * to_float(g[j]) - v * r * dot));
  }
}

// dw partial sums: block c adds rows [c·rows_per_block, …) into partial[c·h + j] (float).
template <typename T> __device__ void rms_norm_bwd_w(const T* x, const T* g, float* partial, int rows, int h, float eps, int rows_per_block) {
  partial += (int64_t)blockIdx.x * h;
  for (int j = threadIdx.x; j < h; j += blockDim.x) partial[j] = 0.0f;
  const int end = min(rows, (blockIdx.x + 1) * rows_per_block);
  for (int r = blockIdx.x * rows_per_block; r < end; ++r) {
    const T* xr = x + (int64_t)r * h; const T* gr = g + (int64_t)r * h;
    const float inv = inv_rms(xr, h, eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) partial[j] += to_float(gr[j]) * to_float(xr[j]) * inv;
  }
}

// out[j] = Σ_c partial[c·h + j], in order of c.
template <typename T> __device__ void column_sum(const float* partial, T* out, int chunks, int h) {
  GRID_STRIDE(j, h) {
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(int64_t)c * h + j];
    out[j] = from_float<T>(s);
  }
}

// ---- SwiGLU on packed rows [gate | up] of 2·inter: y = silu(gate) · up.
template <typename T> __device__ void swiglu_fwd(const T* x, T* y, int64_t n, int inter) {
  GRID_STRIDE(i, n) {
    const int64_t r = i / inter, j = i % inter;
    const float g = to_float(x[r * 2 * inter + j]), u = to_float(x[r * 2 * inter + inter + j]);
    y[i] = from_float<T>(g / (1.0f + __expf(-g)) * u);
  }
}

template <typename T> __device__ void swiglu_bwd(const T* x, const T* dy, T* dx, int64_t n, int inter) {
  GRID_STRIDE(i, n) {
    const int64_t r = i / inter, j = i % inter;
    const float g = to_float(x[r * 2 * inter + j]), u = to_float(x[r * 2 * inter + inter + j]);
    const float s = 1.0f / (1.0f + __expf(-g)), d = to_float(dy[i]);
    dx[r * 2 * inter + j] = from_float<T>(d * u * s * (1.0f + g * (1.0f - s)));
    dx[r * 2 * inter + inter + j] = from_float<T>(d * g * s);
  }
}

// ---- Rotary embedding, HF's half-split layout, of rows of d at position row % seq; `transposed`
// applies the inverse rotation (the backward pass).
template <typename T> __device__ void rope(const T* x, const T* cos, const T* sin, T* y, int64_t rows, int seq, int d, int transposed) {
  const int half = d / 2;
  GRID_STRIDE(i, rows * half) {
    const int64_t row = i / half; const int k = i % half; const int64_t p = (row % seq) * d;
    const float x1 = to_float(x[row * d + k]), x2 = to_float(x[row * d + k + half]);
    const float c1 = to_float(cos[p + k]), c2 = to_float(cos[p + k + half]);
    const float s1 = to_float(sin[p + k]), s2 = to_float(sin[p + k + half]);
    if (transposed) {
      y[row * d + k] = from_float<T>(x1 * c1 + x2 * s2);
      y[row * d + k + half] = from_float<T>(x2 * c2 - x1 * s1);
    } else {
      y[row * d + k] = from_float<T>(x1 * c1 - x2 * s1);
      y[row * d + k + half] = from_float<T>(x2 * c2 + x1 * s2);
    }
  }
}

// ---- Causal softmax of scaled scores, rows of s keys; query i = row % s sees keys
// [max(0, i + 1 − window), i]. One block per row; hidden keys get probability 0.
template <typename T> __device__ void causal_softmax_fwd(const T* scores, T* probs, int s, float scale, int window) {
  const int64_t row = (int64_t)blockIdx.x * s;
  const int i = blockIdx.x % s, lo = max(0, i + 1 - window);
  float m = -CUDART_INF_F;
  for (int j = lo + threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, to_float(scores[row + j]) * scale);
  m = block_max(m);
  float sum = 0.0f;
  for (int j = lo + threadIdx.x; j <= i; j += blockDim.x) sum += __expf(to_float(scores[row + j]) * scale - m);
  const float inv = 1.0f / block_sum(sum);
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    const bool seen = j >= lo && j <= i;
    probs[row + j] = from_float<T>(seen ? __expf(to_float(scores[row + j]) * scale - m) * inv : 0.0f);
  }
}

// d scores = scale · p ∘ (g − Σ g·p).
template <typename T> __device__ void causal_softmax_bwd(const T* probs, const T* g, T* ds, int s, float scale, int window) {
  const int64_t row = (int64_t)blockIdx.x * s;
  const int i = blockIdx.x % s, lo = max(0, i + 1 - window);
  float dot = 0.0f;
  for (int j = lo + threadIdx.x; j <= i; j += blockDim.x) dot += to_float(g[row + j]) * to_float(probs[row + j]);
  dot = block_sum(dot);
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    const bool seen = j >= lo && j <= i;
    const float p = to_float(probs[row + j]);
    ds[row + j] = from_float<T>(seen ? scale * p * (to_float(g[row + j]) - dot) : 0.0f);
  }
}

// ---- Cross-entropy over rows of `vocab` logits: out[2r] = nll, out[2r + 1] = log-sum-exp (float).
// A target outside the vocabulary gives NaN (the CPU kernel refuses it with an error).
template <typename T> __device__ void token_nll_fwd(const T* logits, const uint32_t* targets, float* out, int vocab) {
  const int64_t row = (int64_t)blockIdx.x * vocab;
  float m = -CUDART_INF_F;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, to_float(logits[row + j]));
  m = block_max(m);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += __expf(to_float(logits[row + j]) - m);
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    const uint32_t t = targets[blockIdx.x];
    const float lse = m + logf(sum);
    out[2 * blockIdx.x] = t < (uint32_t)vocab ? lse - to_float(logits[row + t]) : CUDART_NAN_F;
    out[2 * blockIdx.x + 1] = lse;
  }
}

// d logits = g · (softmax − one_hot(target)), from rows of [g, lse].
template <typename T> __device__ void token_nll_bwd(const T* logits, const uint32_t* targets, const float* g_lse, T* dlogits, int vocab) {
  const int64_t row = (int64_t)blockIdx.x * vocab;
  const float g = g_lse[2 * blockIdx.x], lse = g_lse[2 * blockIdx.x + 1];
  const uint32_t t = targets[blockIdx.x];
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float d = g * __expf(to_float(logits[row + j]) - lse) - (j == (int)t ? g : 0.0f);
    dlogits[row + j] = from_float<T>(d);
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                                   \
  extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y, int h, float eps) {             \
    rms_norm_fwd(x, w, y, h, eps);                                                                               \
  }                                                                                                              \
  extern "C" __global__ void rms_norm_bwd_x_##SUFFIX(const T* x, const T* w, const T* g, T* dx, int h, float eps) { \
    rms_norm_bwd_x(x, w, g, dx, h, eps);                                                                         \
  }                                                                                                              \
  extern "C" __global__ void rms_norm_bwd_w_##SUFFIX(const T* x, const T* g, float* partial, int rows, int h,    \
                                                     float eps, int rows_per_block) {                            \
    rms_norm_bwd_w(x, g, partial, rows, h, eps, rows_per_block);                                                 \
  }                                                                                                              \
  extern "C" __global__ void column_sum_##SUFFIX(const float* partial, T* out, int chunks, int h) {              \
    column_sum(partial, out, chunks, h);                                                                         \
  }                                                                                                              \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* x, T* y, int64_t n, int inter) { swiglu_fwd(x, y, n, inter); } \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* x, const T* dy, T* dx, int64_t n, int inter) {         \
    swiglu_bwd(x, dy, dx, n, inter);                                                                             \
  }                                                                                                              \
  extern "C" __global__ void rope_##SUFFIX(const T* x, const T* cos, const T* sin, T* y, int64_t rows, int seq,  \
                                           int d, int transposed) {                                              \
    rope(x, cos, sin, y, rows, seq, d, transposed);                                                              \
  }                                                                                                              \
  extern "C" __global__ void causal_softmax_fwd_##SUFFIX(const T* scores, T* probs, int s, float scale, int window) { \
    causal_softmax_fwd(scores, probs, s, scale, window);                                                         \
  }                                                                                                              \
  extern "C" __global__ void causal_softmax_bwd_##SUFFIX(const T* probs, const T* g, T* ds, int s, float scale,  \
                                                         int window) {                                           \
    causal_softmax_bwd(probs, g, ds, s, scale, window);                                                          \
  }                                                                                                              \
  extern "C" __global__ void token_nll_fwd_##SUFFIX(const T* logits, const uint32_t* targets, float* out, int vocab) { \
    token_nll_fwd(logits, targets, out, vocab);                                                                  \
  }                                                                                                              \
  extern "C" __global__ void token_nll_bwd_##SUFFIX(const T* logits, const uint32_t* targets, const float* g_lse, \
                                                    T* dlogits, int vocab) {                                     \
    token_nll_bwd(logits, targets, g_lse, dlogits, vocab);                                                       \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
