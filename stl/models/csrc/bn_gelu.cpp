// Fused BatchNorm (training statistics) + GELU passes over channels-last activations, fp32 or bf16, CPU.
//
// Built on first use by stl/models/cpu_kernels.py (torch.utils.cpp_extension) and registered as
// torch.ops.stl_cpu.*. Every tensor argument is a contiguous [M, C] view of a channels-last [B, C, H, W]
// activation (M = B * H * W rows of C channels), float32 or bfloat16 (all of one call alike; bf16 as
// autocast runs BatchNorm and GELU: read and written in bf16, computed in fp32); per-channel vectors are
// [C] float32.
//
// Why: torch's channels-last BatchNorm backward is far from memory speed at few channels (FAN-ViT's first stem
// layer, 24 channels at 112 x 112, batch 16: BatchNorm + GELU backward ~20 ms here against ~4-5 ms), and a
// GELU after a BatchNorm costs passes over memory that these kernels fold in. Results match torch's ops to
// float rounding; statistics are summed in fixed row blocks, so they do not depend on the thread count.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "gelu.h"
#include "vec_rows.h"

namespace {

using namespace stl_cpu;

constexpr int64_t kBlockRows = 64;  // the unit of parallel work and of the float partial sums (combined in
                                    // double in block order, so results do not depend on the thread count)

// Calls f(r) for rows r0 <= r < r1, four independent rows per step (the GELU chains are long: this lets the
// CPU overlap them).
template <typename F>
STL_INLINE void for_rows(int64_t r0, int64_t r1, const F& f) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    f(r);
    f(r + 1);
    f(r + 2);
    f(r + 3);
  }
  for (; r < r1; ++r) f(r);
}

// Runs f(block, r0, r1, c, n) over blocks of kBlockRows rows (in parallel); within a block, over chunks of
// rows and, per chunk, over the channel vectors c..c+n. Chunks span a few KB so that the rows of a chunk stream
// from memory together (for wide rows: 4 rows at a time).
template <typename F>
void for_blocks(int64_t M, int64_t C, const F& f) {
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t chunk = std::max<int64_t>(4, std::min<int64_t>(kBlockRows, 2048 / std::max<int64_t>(C, 1)));
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t end = std::min(M, (blk + 1) * kBlockRows);
      for (int64_t r0 = blk * kBlockRows; r0 < end; r0 += chunk) {
        const int64_t r1 = std::min(end, r0 + chunk);
        for_channels(C, [&](int64_t c, int64_t n) { f(blk, r0, r1, c, n); });
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name, int64_t M, int64_t C, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, name, " must be a ", dtype, " CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == C && t.is_contiguous(), name,
              " must be a contiguous [", M, ", ", C, "] tensor, got ", t.sizes(), " strides ", t.strides());
}

// Per-channel sums of a(row) and b(row) over all rows, in fixed blocks of kBlockRows rows (float), combined
// in block order in double, so the result does not depend on the thread count. body(r, c, n, a, b) sets the
// two vectors to add for row r and the channels c..c+n.
template <typename Body>
void sum_rows(int64_t M, int64_t C, std::vector<double>& out_a, std::vector<double>& out_b, const Body& body) {
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  std::vector<float> partial(static_cast<size_t>(blocks * 2 * C), 0.f);
  for_blocks(M, C, [&](int64_t blk, int64_t r0, int64_t r1, int64_t c, int64_t n) {
    float* pa = partial.data() + blk * 2 * C + c;
    Vec acc_a = load(pa, n), acc_b = load(pa + C, n);
    for_rows(r0, r1, [&](int64_t r) {
      Vec a, b;
      body(r, c, n, a, b);
      acc_a += a;
      acc_b += b;
    });
    store(acc_a, pa, n);
    store(acc_b, pa + C, n);
  });
  out_a.assign(C, 0.0);
  out_b.assign(C, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* pa = partial.data() + blk * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      out_a[c] += pa[c];
      out_b[c] += pa[C + c];
    }
  }
}

// Rows of C channels read `fold` at a time, as rows of fold * C channels: where C is not a whole number of
// vectors but 2C is (FAN-ViT's first stem layer: 24 channels, two rows are three vectors), every row would
// end in a masked partial vector (BN + GELU backward at [200704, 24] in bf16 took 4.3 ms, against 2.4 at the
// same size with 32 channels). Per-channel vectors are repeated `fold` times and sums folded back.
struct Rows {
  int64_t M, C, fold;
};

Rows paired(int64_t M, int64_t C) {
  if (C % kV != 0 && (2 * C) % kV == 0 && M % 2 == 0) return {M / 2, 2 * C, 2};
  return {M, C, 1};
}

// p[0..C) `fold` times over.
std::vector<float> repeated(const float* p, int64_t C, int64_t fold) {
  std::vector<float> out(C * fold);
  for (int64_t k = 0; k < fold; ++k) std::copy_n(p, C, out.begin() + k * C);
  return out;
}

// Sums over fold * C channels as sums over C.
std::vector<double> folded(const std::vector<double>& sums, int64_t C, int64_t fold) {
  std::vector<double> out(C, 0.0);
  for (int64_t k = 0; k < fold; ++k)
    for (int64_t c = 0; c < C; ++c) out[c] += sums[k * C + c];
  return out;
}

// y = BN(x), then y = GELU(y) when gelu_output. The row kernels below take T = float or BFloat16 rows and
// compute in float. (The FAN MLP's GELU -> BatchNorm is part of fan_dwconv.cpp's block.)

// Batch statistics of x: mean and biased variance per channel. Sums are shifted by the first row to keep
// E[x^2] - E[x]^2 accurate when the mean is large.
template <typename T>
std::tuple<at::Tensor, at::Tensor> stats_rows(const T* px, int64_t M, int64_t C) {
  const Rows rows = paired(M, C);
  std::vector<float> first(C);
  for_channels(C, [&](int64_t c, int64_t n) { store(load(px + c, n), first.data() + c, n); });
  const auto shift = repeated(first.data(), C, rows.fold);
  std::vector<double> s, q;
  sum_rows(rows.M, rows.C, s, q, [&](int64_t r, int64_t c, int64_t n, Vec& a, Vec& b) {
    a = load(px + r * rows.C + c, n) - load(shift.data() + c, n);
    b = a * a;
  });
  s = folded(s, C, rows.fold);
  q = folded(q, C, rows.fold);
  std::vector<double> mean(C), var(C);
  for (int64_t c = 0; c < C; ++c) {
    const double m = s[c] / M;
    mean[c] = shift[c] + m;
    var[c] = std::max(q[c] / M - m * m, 0.0);
  }
  return {channel_vector(mean), channel_vector(var)};
}

// y = x * scale + shift per channel (BN with its statistics folded in), then GELU when gelu_output.
template <typename T>
void apply_rows(const T* px, T* py, int64_t M, int64_t C, const float* ps, const float* pt, bool gelu_output) {
  const Rows rows = paired(M, C);
  const auto scale = repeated(ps, C, rows.fold), shift = repeated(pt, C, rows.fold);
  for_blocks(rows.M, rows.C, [&](int64_t, int64_t r0, int64_t r1, int64_t c, int64_t n) {
    const Vec s = load(scale.data() + c, n), t = load(shift.data() + c, n);
    for_rows(r0, r1, [&](int64_t r) {
      const Vec v = at::vec::fmadd(load(px + r * rows.C + c, n), s, t);
      store(gelu_output ? gelu(v) : v, py + r * rows.C + c, n);
    });
  });
}

// dL/dx for bn_apply in training mode (through the batch statistics) into po, given dL/dy (pg) and the input
// (px); pm, pi: mean and invstd of x; pw: BN's weight; ps, pt: bn_apply's scale and shift. Returns the sums
// (grad weight, grad bias).
template <typename T>
std::tuple<std::vector<double>, std::vector<double>> backward_rows(
    const T* pg, const T* px, T* po, int64_t M, int64_t C, const float* pm, const float* pi, const float* pw,
    const float* ps, const float* pt, bool gelu_output) {
  // Pass 1: gy = dL/dBN(x) (written to po when it goes through the output GELU, to be read in pass 2, and
  // summed as stored: rounded to T, as torch's GELU backward would hand it on), and the sums of gy and
  // gy * (x - mean).
  const Rows rows = paired(M, C);
  const auto mean = repeated(pm, C, rows.fold), scale = repeated(ps, C, rows.fold);
  const auto shift = repeated(pt, C, rows.fold);
  std::vector<double> sum_gy, sum_gyx;
  sum_rows(rows.M, rows.C, sum_gy, sum_gyx, [&](int64_t r, int64_t c, int64_t n, Vec& a, Vec& b) {
    const int64_t i = r * rows.C + c;
    const Vec xv = load(px + i, n);
    Vec gy = load(pg + i, n);
    if (gelu_output) {
      gy = round_to<T>(gy * gelu_grad(at::vec::fmadd(xv, load(scale.data() + c, n), load(shift.data() + c, n))));
      store(gy, po + i, n);
    }
    a = gy;
    b = gy * (xv - load(mean.data() + c, n));
  });
  sum_gy = folded(sum_gy, C, rows.fold);
  sum_gyx = folded(sum_gyx, C, rows.fold);

  // dL/dx = a * gy + b * (x - mean) + d with per-channel a = invstd * w, b = -a * sum_gyx * invstd^2 / M,
  // d = -a * sum_gy / M (centred: no cancellation for a large mean).
  std::vector<float> ca(C), cb(C), cd(C);
  std::vector<double> grad_weight(C), grad_bias(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = pi[c], a = is * pw[c];
    ca[c] = static_cast<float>(a);
    cb[c] = static_cast<float>(-a * sum_gyx[c] * is * is / M);
    cd[c] = static_cast<float>(-a * sum_gy[c] / M);
    grad_weight[c] = sum_gyx[c] * is;
    grad_bias[c] = sum_gy[c];
  }
  const T* src = gelu_output ? po : pg;
  const auto a_rows = repeated(ca.data(), C, rows.fold), b_rows = repeated(cb.data(), C, rows.fold);
  const auto d_rows = repeated(cd.data(), C, rows.fold);
  for_blocks(rows.M, rows.C, [&](int64_t, int64_t r0, int64_t r1, int64_t c, int64_t n) {
    const Vec a = load(a_rows.data() + c, n), b = load(b_rows.data() + c, n), d = load(d_rows.data() + c, n);
    const Vec m = load(mean.data() + c, n);
    for_rows(r0, r1, [&](int64_t r) {
      const int64_t i = r * rows.C + c;
      store(at::vec::fmadd(load(src + i, n), a, at::vec::fmadd(load(px + i, n) - m, b, d)), po + i, n);
    });
  });
  return {std::move(grad_weight), std::move(grad_bias)};
}

// grad * GELU'(x) written over x (rounded to T), and its column sums: the backward of GELU and of the bias
// added before it, for fc1 -> GELU -> fc2 MLPs (one pass less than torch's gelu_backward, then sum).
template <typename T>
std::vector<double> gelu_backward_rows(const T* pg, T* px, int64_t M, int64_t C) {
  std::vector<double> sums, zeros;
  sum_rows(M, C, sums, zeros, [&](int64_t r, int64_t c, int64_t n, Vec& a, Vec& b) {
    const int64_t i = r * C + c;
    a = round_to<T>(load(pg + i, n) * gelu_grad(load(px + i, n)));
    store(a, px + i, n);
    b = Vec(0.f);
  });
  return sums;
}

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0, "bn_stats: x must be [M, C] with M > 0, got ", x.sizes());
  const int64_t M = x.size(0), C = x.size(1);
  check_rows(x, "bn_stats: x", M, C, x.scalar_type());
  return dispatch(x, "bn_stats", [&](auto tag) {
    return stats_rows(x.const_data_ptr<decltype(tag)>(), M, C);
  });
}

at::Tensor bn_apply(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool gelu_output) {
  TORCH_CHECK(x.dim() == 2, "bn_apply: x must be [M, C], got ", x.sizes());
  const int64_t M = x.size(0), C = x.size(1);
  check_rows(x, "bn_apply: x", M, C, x.scalar_type());
  check_float("bn_apply", scale, "scale", {C});
  check_float("bn_apply", shift, "shift", {C});
  auto y = at::empty_like(x);
  dispatch(x, "bn_apply", [&](auto tag) {
    using T = decltype(tag);
    apply_rows(x.const_data_ptr<T>(), y.data_ptr<T>(), M, C, scale.const_data_ptr<float>(),
               shift.const_data_ptr<float>(), gelu_output);
    return 0;
  });
  return y;
}

// Gradients of bn_apply in training mode: (dL/dx, grad weight, grad bias). grad: dL/dy (x's dtype); x: the
// op's input; mean, invstd: its statistics; weight: BN's weight; scale, shift: as given to bn_apply.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift, bool gelu_output) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0, "bn_backward: x must be [M, C] with M > 0, got ", x.sizes());
  const int64_t M = x.size(0), C = x.size(1);
  check_rows(x, "bn_backward: x", M, C, x.scalar_type());
  check_rows(grad, "bn_backward: grad", M, C, x.scalar_type());
  for (auto [t, name] : {std::pair{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&scale, "scale"},
                         {&shift, "shift"}})
    check_float("bn_backward", *t, name, {C});
  auto out = at::empty_like(x);
  auto [grad_weight, grad_bias] = dispatch(x, "bn_backward", [&](auto tag) {
    using T = decltype(tag);
    return backward_rows(grad.const_data_ptr<T>(), x.const_data_ptr<T>(), out.data_ptr<T>(), M, C,
                         mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
                         weight.const_data_ptr<float>(), scale.const_data_ptr<float>(),
                         shift.const_data_ptr<float>(), gelu_output);
  });
  return {out, channel_vector(grad_weight), channel_vector(grad_bias)};
}

// dL/dx of GELU(x) given grad = dL/dGELU(x), written over x; returns its column sums (float32 [C]).
at::Tensor gelu_backward_sum_(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "gelu_backward_sum_: x must be [M, C], got ", x.sizes());
  const int64_t M = x.size(0), C = x.size(1);
  check_rows(x, "gelu_backward_sum_: x", M, C, x.scalar_type());
  check_rows(grad, "gelu_backward_sum_: grad", M, C, x.scalar_type());
  TORCH_CHECK(!grad.is_same(x), "gelu_backward_sum_: grad and x must be different tensors");
  if (M == 0) return at::zeros({C}, x.options().dtype(at::kFloat));
  return channel_vector(dispatch(x, "gelu_backward_sum_", [&](auto tag) {
    using T = decltype(tag);
    return gelu_backward_rows(grad.const_data_ptr<T>(), x.data_ptr<T>(), M, C);
  }));
}

}  // namespace

TORCH_LIBRARY(stl_cpu, m) {
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_apply(Tensor x, Tensor scale, Tensor shift, bool gelu_output) -> Tensor");
  m.def(
      "bn_backward(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor scale, Tensor shift, "
      "bool gelu_output) -> (Tensor, Tensor, Tensor)");
  m.def("gelu_backward_sum_(Tensor grad, Tensor(a!) x) -> Tensor");
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) {
  m.impl("bn_stats", bn_stats);
  m.impl("bn_apply", bn_apply);
  m.impl("bn_backward", bn_backward);
  m.impl("gelu_backward_sum_", gelu_backward_sum_);
}
