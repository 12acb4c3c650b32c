// The exact (erf) GELU and its derivative on float vectors, shared by this project's CPU kernels
// (bn_gelu.cpp, fan_dwconv.cpp).
#pragma once

#include "vec_rows.h"

namespace stl_cpu {

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, the formula of ATen's vectorized erf) with
// e = exp(-x^2) given, so that GELU's derivative computes the exponential once.
STL_INLINE Vec erf_with(const Vec& x, const Vec& e) {
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f), x.abs(), Vec(1.f));
  Vec p = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  p = at::vec::fmadd(p, t, Vec(1.421413741f));
  p = at::vec::fmadd(p, t, Vec(-0.284496736f));
  p = at::vec::fmadd(p, t, Vec(0.254829592f));
  const Vec r = Vec(1.f) - p * t * e;  // erf(|x|)
  return Vec::blendv(r, Vec(0.f) - r, x < Vec(0.f));
}

// The exact (erf) GELU, z * Phi(z), and its derivative Phi(z) + z * phi(z).
STL_INLINE Vec gelu(const Vec& z) {
  const Vec u = z * Vec(kSqrtHalf);
  return z * Vec(0.5f) * (Vec(1.f) + erf_with(u, (Vec(0.f) - u * u).exp_u20()));
}
STL_INLINE void gelu_and_grad(const Vec& z, Vec& value, Vec& slope) {
  const Vec u = z * Vec(kSqrtHalf);
  const Vec e = (Vec(0.f) - u * u).exp_u20();
  const Vec cdf = Vec(0.5f) * (Vec(1.f) + erf_with(u, e));
  value = z * cdf;
  slope = at::vec::fmadd(z * e, Vec(kInvSqrt2Pi), cdf);
}
STL_INLINE Vec gelu_grad(const Vec& z) {
  Vec value, slope;  // value is dead code after inlining
  gelu_and_grad(z, value, slope);
  return slope;
}

}  // namespace stl_cpu
