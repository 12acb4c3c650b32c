// A FAN block's LayerNorms in training, fused with what surrounds them, CPU. Each is
//
//   y = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps)   (biased variance, per row)
//
// over the last dim of [..., C] tokens:
//
// - layer_norm_cast: norm1 and norm2 under bf16 autocast, over float32 x. y is stored as `copies` bf16
//   tensors (one per matmul that reads it) and, when keep_float, as float32 (for ops that autocast runs in
//   fp32). Backward: the copies' gradients (bf16) and the float one summed in fp32, then LayerNorm's backward.
//   Why: torch's LayerNorm writes y in fp32 and each linear after it casts y to bf16 in a pass of its own; in
//   backward each cast's gradient is converted back to fp32 and summed in more passes. A copy per matmul (not
//   one bf16 tensor shared by them) keeps autocast's numbers: autograd sums the gradients of one tensor in its
//   dtype, so a shared bf16 y would round their sum to bf16.
// - layer_norm_residual: the channel branch's norm_v with the residual add after it, out = x + LN(m) * gate
//   (x float32, m the branch's MLP output, float32 or bf16, gate [B, 1, C]); LN(m) and its gradient are
//   rounded to m's dtype where torch's ops store them. Why: torch's ops take a LayerNorm pass, the add's, and
//   backward two more, writing and reading LN(m) and its gradient in between.
//
// Built with bn_gelu.cpp (see there) and registered as torch.ops.stl_cpu.layer_norm_cast(_backward) and
// layer_norm_residual(_backward); stl/models/layers.py (FANBlock) calls them through cpu_kernels.py. Each way
// is one pass per row, a row staying in L1 between its reads. Row statistics follow torch's formulas, in fp32;
// the weight and bias gradients are summed in fp32 per block of rows (per image for layer_norm_residual, with
// the gate's) and the blocks added in order in double, so results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "vec_rows.h"

namespace {

using namespace stl_cpu;

constexpr int64_t kBlock = 32;  // rows per block of the weight and bias gradients' partial sums

// Checks x [..., C] and a float32 [C] weight; returns (rows, C).
std::pair<int64_t, int64_t> check_rows(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.is_contiguous(), op,
              ": x must be a contiguous float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0, op, ": x has no channels, got ", x.sizes());
  check_float(op, weight, "weight", {C});
  return {x.numel() / C, C};
}

// (mean, rstd) of row x of C values, as torch's LayerNorm takes them (biased variance, fp32). Two passes,
// the mean corrected by the deviations' sum (exact for a constant row, whose normalised values are then 0:
// its deviations are scaled by 1 / sqrt(eps)).
template <typename X>
STL_INLINE std::pair<float, float> row_moments(const X* x, int64_t C, double eps) {
  Vec acc(0.f);
  for_channels(C, [&](int64_t c, int64_t n) { acc += load(x + c, n); });
  float mean = sum_lanes(acc) / static_cast<float>(C);
  Vec sum(0.f), sq(0.f);
  for_channels(C, [&](int64_t c, int64_t n) {
    Vec d = load(x + c, n) - Vec(mean);
    if (n < kV) d = Vec::set(Vec(0.f), d, n);  // the tail's zero lanes: -mean
    sum += d;
    sq = at::vec::fmadd(d, d, sq);
  });
  const float shift = sum_lanes(sum) / static_cast<float>(C);
  mean += shift;
  const float var = std::max(sum_lanes(sq) / static_cast<float>(C) - shift * shift, 0.f);
  return {mean, 1.f / std::sqrt(var + static_cast<float>(eps))};
}

// (x - mean) * rstd: the normalised values (0 where x equals the mean, as torch's).
STL_INLINE Vec normalise(const Vec& x, float mean, float rstd) { return (x - Vec(mean)) * Vec(rstd); }

// The LayerNorm's output as torch's stores it (rounded to X), lanes c.. (n) of row x with statistics (mean,
// rstd).
template <typename X>
STL_INLINE Vec normalized(const X* x, const float* w, const float* b, float mean, float rstd, int64_t c,
                          int64_t n) {
  return round_to<X>(at::vec::fmadd(normalise(load(x + c, n), mean, rstd), load(w + c, n), load(b + c, n)));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> layer_norm_cast(const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& bias, double eps,
                                                                            int64_t copies, bool keep_float) {
  const char* op = "layer_norm_cast";
  const auto [R, C] = check_rows(op, x, weight);
  check_float(op, bias, "bias", {C});
  TORCH_CHECK(copies >= 0 && (copies > 0 || keep_float), op, ": asked for no output (copies ", copies,
              ", keep_float false)");
  auto y = keep_float ? at::empty_like(x) : at::empty({0}, x.options());
  std::vector<at::Tensor> low;
  for (int64_t k = 0; k < copies; ++k) low.push_back(at::empty_like(x, x.options().dtype(at::kBFloat16)));
  auto stats = at::empty({R, 2}, x.options());  // mean, rstd
  const float *xp = x.const_data_ptr<float>(), *w = weight.const_data_ptr<float>(),
              *b = bias.const_data_ptr<float>();
  float* yp = keep_float ? y.data_ptr<float>() : nullptr;
  std::vector<BFloat16*> lp;
  for (auto& t : low) lp.push_back(t.data_ptr<BFloat16>());
  float* sp = stats.data_ptr<float>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      const auto [mean, rstd] = row_moments(xr, C, eps);
      sp[2 * r] = mean;
      sp[2 * r + 1] = rstd;
      for_channels(C, [&](int64_t c, int64_t n) {
        const Vec v = normalized(xr, w, b, mean, rstd, c, n);
        if (yp) store(v, yp + r * C + c, n);
        for (BFloat16* p : lp) store(v, p + r * C + c, n);
      });
    }
  });
  return {y, low, stats};
}

// One row's LayerNorm backward given g, the gradient of its output (C floats): dx (rounded to X) and the
// weight's and bias's gradients accumulated into dw and db (C floats each).
template <typename X>
STL_INLINE void row_backward(const float* g, const X* x, const float* w, float mean, float rstd, int64_t C, X* dx,
                             float* dw, float* db) {
  Vec ds(0.f), dsum(0.f);
  for_channels(C, [&](int64_t c, int64_t n) {
    const Vec gv = load(g + c, n), xv = load(x + c, n), wg = gv * load(w + c, n);
    ds = at::vec::fmadd(wg, xv, ds);
    dsum += wg;
    store(at::vec::fmadd(gv, normalise(xv, mean, rstd), load(dw + c, n)), dw + c, n);  // dweight += g * xhat
    store(load(db + c, n) + gv, db + c, n);                                             // dbias += g
  });
  // torch's formulas: dx = rstd * w * g + a * x + b, a = (sum(w g) mean - sum(w g x)) rstd^3 / C,
  // b = -a * mean - sum(w g) * rstd / C
  const float s = sum_lanes(ds), d = sum_lanes(dsum);
  const float a = (d * mean - s) * rstd * rstd * rstd / static_cast<float>(C);
  const float b = -a * mean - d * rstd / static_cast<float>(C);
  for_channels(C, [&](int64_t c, int64_t n) {
    const Vec wg = load(g + c, n) * load(w + c, n);
    store(at::vec::fmadd(wg, Vec(rstd), at::vec::fmadd(load(x + c, n), Vec(a), Vec(b))), dx + c, n);
  });
}

// Gradients (x, weight, bias) of layer_norm_cast given its outputs' gradients: `grads` of the bf16 copies,
// grad_float of the float32 output (when kept).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cast_backward(
    at::TensorList grads, const std::optional<at::Tensor>& grad_float, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& stats) {
  const char* op = "layer_norm_cast_backward";
  const auto [R, C] = check_rows(op, x, weight);
  check_float(op, stats, "stats", {R, 2});
  TORCH_CHECK(!grads.empty() || grad_float, op, ": no gradient given");
  std::vector<const BFloat16*> gp;
  for (const auto& g : grads) {
    check_contiguous(op, g, "grads[i]", x.sizes());
    TORCH_CHECK(g.scalar_type() == at::kBFloat16, op, ": grads must be bfloat16, got ", g.scalar_type());
    gp.push_back(g.const_data_ptr<BFloat16>());
  }
  const float* gf = nullptr;
  if (grad_float) {
    check_float(op, *grad_float, "grad_float", x.sizes());
    gf = grad_float->const_data_ptr<float>();
  }
  auto grad_x = at::empty_like(x);
  const float *xp = x.const_data_ptr<float>(), *w = weight.const_data_ptr<float>(),
              *sp = stats.const_data_ptr<float>();
  float* dxp = grad_x.data_ptr<float>();
  const int64_t blocks = (R + kBlock - 1) / kBlock;
  std::vector<float> part(blocks * 2 * C, 0.f);  // per block of rows: the weight's, then the bias's gradient
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> g(C);  // the row's gradient: the outputs' summed
    for (int64_t k = k0; k < k1; ++k) {
      float* dw = part.data() + k * 2 * C;
      for (int64_t r = k * kBlock; r < std::min(R, (k + 1) * kBlock); ++r) {
        for_channels(C, [&](int64_t c, int64_t n) {
          Vec gv = gf ? load(gf + r * C + c, n) : Vec(0.f);
          for (const BFloat16* p : gp) gv += load(p + r * C + c, n);
          store(gv, g.data() + c, n);
        });
        row_backward(g.data(), xp + r * C, w, sp[2 * r], sp[2 * r + 1], C, dxp + r * C, dw, dw + C);
      }
    }
  });
  const auto sums = sum_in_image_order(part, blocks, 2 * C);
  return {grad_x, sums_row(sums, C, 0, C), sums_row(sums, C, 1, C)};
}

// Checks the tokens x (float32) and m, the LayerNorm's parameters and the gate of layer_norm_residual(_backward);
// returns (B, N, C).
std::tuple<int64_t, int64_t, int64_t> check_residual(const char* op, const at::Tensor& x, const at::Tensor& m,
                                                     const at::Tensor& weight, const at::Tensor& bias,
                                                     const at::Tensor& gate) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous() &&
                  x.size(2) > 0, op, ": x must be a contiguous float32 [B, N, C] CPU tensor with C > 0, got ",
              x.sizes(), " ", x.scalar_type());
  check_contiguous(op, m, "m", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_float(op, weight, "weight", {C});
  check_float(op, bias, "bias", {C});
  check_float(op, gate, "gate", {B, 1, C});
  return {B, N, C};
}

// out = x + LN(m) * gate: a FAN block's channel branch added to the residual stream x, m the branch's MLP
// output before its LayerNorm, gate [B, 1, C] the channel gate. Returns (out, float32; stats [B * N, 2]).
std::tuple<at::Tensor, at::Tensor> layer_norm_residual(const at::Tensor& x, const at::Tensor& m,
                                                       const at::Tensor& weight, const at::Tensor& bias,
                                                       const at::Tensor& gate, double eps) {
  const char* op = "layer_norm_residual";
  const auto [B, N, C] = check_residual(op, x, m, weight, bias, gate);
  auto out = at::empty_like(x);
  auto stats = at::empty({B * N, 2}, x.options());
  const float *xp = x.const_data_ptr<float>(), *w = weight.const_data_ptr<float>(),
              *b = bias.const_data_ptr<float>(), *gp = gate.const_data_ptr<float>();
  float *outp = out.data_ptr<float>(), *sp = stats.data_ptr<float>();
  dispatch(m, op, [&](auto tag) {
    using X = decltype(tag);
    const X* mp = m.const_data_ptr<X>();
    at::parallel_for(0, B * N, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const X* mr = mp + r * C;
        const auto [mean, rstd] = row_moments(mr, C, eps);
        sp[2 * r] = mean;
        sp[2 * r + 1] = rstd;
        const float* g = gp + (r / N) * C;
        for_channels(C, [&](int64_t c, int64_t n) {
          const Vec v = normalized(mr, w, b, mean, rstd, c, n);
          store(at::vec::fmadd(v, load(g + c, n), load(xp + r * C + c, n)), outp + r * C + c, n);
        });
      }
    });
    return 0;
  }, "m");
  return {out, stats};
}

// Gradients of layer_norm_residual given grad = dL/dout (float32), for m (in its dtype), the LayerNorm's
// weight and bias and the gate; x's is grad itself. As torch's ops: the LayerNorm's output gradient is
// grad * gate rounded to m's dtype, the gate's is the sum over tokens of grad * LN(m). Each image's sums are
// taken by one thread in token order and added in image order in double.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_backward(
    const at::Tensor& grad, const at::Tensor& m, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& gate, const at::Tensor& stats) {
  const char* op = "layer_norm_residual_backward";
  const auto [B, N, C] = check_residual(op, grad, m, weight, bias, gate);
  check_float(op, stats, "stats", {B * N, 2});
  auto grad_m = at::empty_like(m);
  auto grad_gate = at::empty({B, 1, C}, grad.options());
  const float *gp = grad.const_data_ptr<float>(), *w = weight.const_data_ptr<float>(),
              *b = bias.const_data_ptr<float>(), *gate_p = gate.const_data_ptr<float>(),
              *sp = stats.const_data_ptr<float>();
  float* ggp = grad_gate.data_ptr<float>();
  std::vector<float> part(B * 2 * C, 0.f);  // per image: the weight's, then the bias's gradient
  dispatch(m, op, [&](auto tag) {
    using X = decltype(tag);
    const X* mp = m.const_data_ptr<X>();
    X* dmp = grad_m.data_ptr<X>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> g(C);  // a row's LayerNorm output gradient
      for (int64_t i = b0; i < b1; ++i) {
        float *gg = ggp + i * C, *dw = part.data() + i * 2 * C;
        std::fill(gg, gg + C, 0.f);
        const float* gate_i = gate_p + i * C;
        for (int64_t r = i * N; r < (i + 1) * N; ++r) {
          const float mean = sp[2 * r], rstd = sp[2 * r + 1];
          const X* mr = mp + r * C;
          for_channels(C, [&](int64_t c, int64_t n) {
            const Vec dy = load(gp + r * C + c, n);
            store(at::vec::fmadd(dy, normalized(mr, w, b, mean, rstd, c, n), load(gg + c, n)), gg + c, n);
            store(round_to<X>(dy * load(gate_i + c, n)), g.data() + c, n);
          });
          row_backward(g.data(), mr, w, mean, rstd, C, dmp + r * C, dw, dw + C);
        }
      }
    });
    return 0;
  }, "m");
  const auto sums = sum_in_image_order(part, B, 2 * C);
  return {grad_m, sums_row(sums, C, 0, C), sums_row(sums, C, 1, C), grad_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stl_cpu, m) {
  m.def("layer_norm_cast(Tensor x, Tensor weight, Tensor bias, float eps, int copies, bool keep_float) "
        "-> (Tensor, Tensor[], Tensor)");
  m.def("layer_norm_cast_backward(Tensor[] grads, Tensor? grad_float, Tensor x, Tensor weight, Tensor stats) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_residual(Tensor x, Tensor m, Tensor weight, Tensor bias, Tensor gate, float eps) "
        "-> (Tensor, Tensor)");
  m.def("layer_norm_residual_backward(Tensor grad, Tensor m, Tensor weight, Tensor bias, Tensor gate, "
        "Tensor stats) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) {
  m.impl("layer_norm_cast", layer_norm_cast);
  m.impl("layer_norm_cast_backward", layer_norm_cast_backward);
  m.impl("layer_norm_residual", layer_norm_residual);
  m.impl("layer_norm_residual_backward", layer_norm_residual_backward);
}
