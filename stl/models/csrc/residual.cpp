// A FAN block's residual additions in training, forward and backward, CPU:
//
//   out = x + v * gate    (the channel branch: v the normalised values, gate [B, 1, C] the channel gate)
//   out = x + v           (the token-mixing branch, without a gate)
//
// (stl/models/layers.py, FANBlock). x and v are contiguous [B, N, C] tokens, each float32 or bf16 (under
// autocast v is a bf16 matmul or LayerNorm output, x the fp32 residual stream); gate is a float32 [B, 1, C].
// out is float32 when x or the gate is, else bf16 (the dtype torch's ops give); computed in fp32. Built with
// bn_gelu.cpp (see there) and registered as torch.ops.stl_cpu.residual / residual_backward.
//
// Why: torch's ops cast v to fp32 in a separate pass, and addcmul's backward takes six passes over the tokens
// (a multiply by its scalar value, the two products, the gate's sum and two dtype casts): ~1.4 ms per block
// and training step for FAN-ViT-T in bf16. Here the forward is one pass and the backward one pass that writes
// v's gradient and sums the gate's. Each image's sums are taken by one thread in token order: results do not
// depend on the thread count.

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

// Checks the tokens and the gate; returns (B, N, C).
std::tuple<int64_t, int64_t, int64_t> check_inputs(const char* op, const at::Tensor& x, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& gate) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), op,
              ": x must be a contiguous [B, N, C] CPU tensor, got ", x.sizes());
  check_contiguous(op, v, "v", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  if (gate) check_float(op, *gate, "gate", {B, 1, C});
  return {B, N, C};
}

at::Tensor residual(const at::Tensor& x, const at::Tensor& v, const std::optional<at::Tensor>& gate) {
  const auto [B, N, C] = check_inputs("residual", x, v, gate);
  auto dtype = at::promote_types(x.scalar_type(), v.scalar_type());  // torch's result dtype
  if (gate) dtype = at::promote_types(dtype, gate->scalar_type());
  auto out = at::empty(x.sizes(), x.options().dtype(dtype));
  const float* g = gate ? gate->data_ptr<float>() : nullptr;
  dispatch(x, "residual", [&](auto tx) {
    using X = decltype(tx);
    return dispatch(v, "residual", [&](auto tv) {
      using V = decltype(tv);
      return dispatch(out, "residual", [&](auto to) {
        using O = decltype(to);
        const X* xp = x.data_ptr<X>();
        const V* vp = v.data_ptr<V>();
        O* op = out.data_ptr<O>();
        at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const float* gr = g ? g + (r / N) * C : nullptr;
            for_channels(C, [&](int64_t c, int64_t n) {
              const Vec vv = gr ? load(vp + r * C + c, n) * load(gr + c, n) : load(vp + r * C + c, n);
              store(load(xp + r * C + c, n) + vv, op + r * C + c, n);
            });
          }
        });
        return 0;
      }, "out");
    }, "v");
  }, "x");
  return out;
}

// Gradients of residual with a gate, for v (in v's dtype) and the gate (float32 [B, 1, C]), given
// grad = dL/dout; x's gradient is grad itself (and without a gate, so is v's).
std::tuple<at::Tensor, at::Tensor> residual_backward(const at::Tensor& grad, const at::Tensor& v,
                                                     const at::Tensor& gate) {
  const auto [B, N, C] = check_inputs("residual_backward", grad, v, gate);
  auto grad_v = at::empty_like(v);
  auto grad_gate = at::empty({B, 1, C}, v.options().dtype(at::kFloat));
  const float* g = gate.data_ptr<float>();
  float* gg = grad_gate.data_ptr<float>();
  dispatch(grad, "residual_backward", [&](auto tg) {
    using G = decltype(tg);
    return dispatch(v, "residual_backward", [&](auto tv) {
      using V = decltype(tv);
      const G* gp = grad.data_ptr<G>();
      const V* vp = v.data_ptr<V>();
      V* gvp = grad_v.data_ptr<V>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> sums(C);
        for (int64_t b = begin; b < end; ++b) {
          std::fill(sums.begin(), sums.end(), 0.f);
          for (int64_t r = 0; r < N; ++r)
            for_channels(C, [&](int64_t c, int64_t n) {
              const int64_t o = (b * N + r) * C + c;
              const Vec dy = load(gp + o, n);
              store(load(sums.data() + c, n) + dy * load(vp + o, n), sums.data() + c, n);
              store(dy * load(g + b * C + c, n), gvp + o, n);
            });
          std::copy(sums.begin(), sums.end(), gg + b * C);
        }
      });
      return 0;
    }, "v");
  }, "grad");
  return {grad_v, grad_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stl_cpu, m) {
  m.def("residual(Tensor x, Tensor v, Tensor? gate) -> Tensor");
  m.def("residual_backward(Tensor grad, Tensor v, Tensor gate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) {
  m.impl("residual", residual);
  m.impl("residual_backward", residual_backward);
}
