// Vector helpers shared by this project's CPU kernels (the .cpp files beside it): float vectors of ATen's
// instruction set (the CPU_CAPABILITY the build defines), loaded from and stored to rows of float or bf16.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

// The vector helpers must inline into the loops (a call would spill every live vector register around it).
#define STL_INLINE inline __attribute__((always_inline))

namespace stl_cpu {

using Vec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<at::BFloat16>;
using at::BFloat16;
constexpr int64_t kV = Vec::size();

// n (<= kV) values of a row as one float vector, and back.
STL_INLINE Vec load(const float* p, int64_t n) { return n == kV ? Vec::loadu(p) : Vec::loadu(p, n); }
STL_INLINE void store(const Vec& v, float* p, int64_t n) {
  if (n == kV) v.store(p);
  else v.store(p, n);
}
STL_INLINE Vec load(const BFloat16* p, int64_t n) {
  if (n == kV) {
    Vec v;
    at::vec::load_fp32_from_bf16(p, v);
    return v;
  }
  return std::get<0>(at::vec::convert_bfloat16_float(BVec::loadu(p, n)));
}
#if defined(CPU_CAPABILITY_AVX512)
// One vector rounded to bf16 (to nearest even; ATen's generic conversion takes two): one instruction where the
// build targets AVX512-BF16 (cpu_kernels.py adds -mavx512bf16 where the CPU has it; it reads float denormals,
// below 1.2e-38, as 0), else ATen's integer emulation.
STL_INLINE __m256i bf16_bits(const __m512& v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  return at::vec::cvtfp32_bf16(v);
#endif
}
#endif

STL_INLINE void store(const Vec& v, BFloat16* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if (n == kV) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
#elif defined(CPU_CAPABILITY_AVX2)
  if (n == kV) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
#endif
  at::vec::convert_float_bfloat16(v, v).store(p, n);  // the first n lanes: v's
}
// v rounded to T, as a value stored in T and read back
template <typename T>
STL_INLINE Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 out;
    at::vec::cvtbf16_fp32(bf16_bits(v), out);
    return out;
#else
    return std::get<0>(at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v)));
#endif
  }
}

// Stores v rounded to the element type (n lanes) and returns the stored values as floats: one conversion
// where storing and round_to would take two.
STL_INLINE Vec store_rounded(const Vec& v, float* p, int64_t n) {
  store(v, p, n);
  return v;
}
STL_INLINE Vec store_rounded(const Vec& v, BFloat16* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if (n == kV) {
    const __m256i b = bf16_bits(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
    __m512 out;
    at::vec::cvtbf16_fp32(b, out);
    return out;
  }
#endif
  store(v, p, n);
  return round_to<BFloat16>(v);
}

// The sum of a vector's lanes.
STL_INLINE float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

// Calls f(c, n) for channel offsets c in vector steps; n < kV only for the tail.
template <typename F>
STL_INLINE void for_channels(int64_t C, const F& f) {
  int64_t c = 0;
  for (; c + kV <= C; c += kV) f(c, kV);
  if (c < C) f(c, C - c);
}

// Calls f(T{}) with T the element type of x (named `name` in the error): float or BFloat16.
template <typename F>
auto dispatch(const at::Tensor& x, const char* op, const F& f, const char* name = "x") {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", x.scalar_type());
  return x.scalar_type() == at::kBFloat16 ? f(BFloat16{}) : f(float{});
}

// Checks that t is a contiguous CPU tensor of these sizes (its dtype is checked where it is dispatched on).
inline void check_contiguous(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu() && t.sizes() == sizes && t.is_contiguous(), op, ": ", name,
              " must be a contiguous ", sizes, " CPU tensor, got ", t.sizes(), " strides ", t.strides(), " on ",
              t.device());
}

// Checks that C channels split into `heads` heads.
inline void check_heads(const char* op, int64_t C, int64_t heads) {
  TORCH_CHECK(heads > 0 && C % heads == 0, op, ": ", C, " channels do not split into ", heads, " heads");
}

// Checks that t (weights, statistics, per-channel vectors) is a contiguous float32 CPU tensor of these sizes.
inline void check_float(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.sizes() == sizes && t.is_contiguous(),
              op, ": ", name, " must be a contiguous float32 ", sizes, " CPU tensor, got ", t.sizes(), " ",
              t.scalar_type());
}

// A float32 [n] tensor of double values.
inline at::Tensor channel_vector(const std::vector<double>& v) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kFloat);
  float* p = t.data_ptr<float>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<float>(v[i]);
  return t;
}

// Per-image float partial sums [B, n] added up in image order in double: the kernels' sums then do not depend
// on how images were spread over threads.
inline std::vector<double> sum_in_image_order(const std::vector<float>& part, int64_t B, int64_t n) {
  std::vector<double> out(n, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) out[i] += part[b * n + i];
  return out;
}

// Row r of sums laid out [rows, stride], its first C entries, as a float32 [C] tensor.
inline at::Tensor sums_row(const std::vector<double>& sums, int64_t stride, int64_t r, int64_t C) {
  const auto first = sums.begin() + r * stride;
  return channel_vector(std::vector<double>(first, first + C));
}

// A depthwise conv's weight gradient [C, 1, kh, kw] from tap-major sums [kh * kw, stride] (rows 0..kh*kw-1).
inline at::Tensor depthwise_weight(const std::vector<double>& sums, int64_t stride, int64_t C, int64_t kh,
                                   int64_t kw) {
  const int64_t T = kh * kw;
  std::vector<double> w(C * T);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < T; ++t) w[c * T + t] = sums[t * stride + c];
  return channel_vector(w).view({C, 1, kh, kw});
}

}  // namespace stl_cpu
