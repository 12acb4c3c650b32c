// The channel gate of FAN's channel processing before its sigmoid, forward and backward, CPU:
//
//   gate[b, c] = sum_n softmax_n(q)[b, n, c] * k[b, n, c / d],   k[b, n, j] = mean of softmax_n(x)[b, n, :]
//                                                                 over head j's d channels
//
// (stl/models/layers.py, ChannelProcessing.channel_gate). q and x are contiguous [B, N, C] tensors, each
// float32 or bfloat16 (under bf16 autocast q is a matmul's bf16 output, x a LayerNorm's fp32 one); everything
// is computed in fp32, the gradients are stored in their input's dtype. Built with bn_gelu.cpp (see there)
// and registered as torch.ops.stl_cpu.channel_gate / channel_gate_backward.
//
// Why: torch runs this as two softmaxes over the token axis (strided: one channel per lane), a broadcast
// product and a sum, each with a backward; ~2-3 ms per FAN block and training step at [16, 196, 192]. Here
// one image at a time stays in cache through three passes forward and two backward, with the softmaxes'
// exponentials recomputed instead of stored. Each image is computed by one thread in a fixed order, so
// results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "vec_rows.h"

namespace {

using namespace stl_cpu;

// Per channel over the N rows of one image: max and sum of exp(v - max), into m[C] and z[C].
template <typename T>
void softmax_stats(const T* v, int64_t N, int64_t C, float* m, float* z) {
  for_channels(C, [&](int64_t c, int64_t n) { store(Vec(-std::numeric_limits<float>::infinity()), m + c, n); });
  for (int64_t r = 0; r < N; ++r)
    for_channels(C, [&](int64_t c, int64_t n) {
      store(at::vec::maximum(load(m + c, n), load(v + r * C + c, n)), m + c, n);
    });
  for_channels(C, [&](int64_t c, int64_t n) { store(Vec(0.f), z + c, n); });
  for (int64_t r = 0; r < N; ++r)
    for_channels(C, [&](int64_t c, int64_t n) {
      store(load(z + c, n) + (load(v + r * C + c, n) - load(m + c, n)).exp(), z + c, n);
    });
}

// softmax_n(v) of row r into out[C], given the stats and rz = 1 / z.
template <typename T>
STL_INLINE void softmax_row(const T* v, int64_t r, int64_t C, const float* m, const float* rz, float* out) {
  for_channels(C, [&](int64_t c, int64_t n) {
    store((load(v + r * C + c, n) - load(m + c, n)).exp() * load(rz + c, n), out + c, n);
  });
}

// Each of the H per-head values copied to the head's d channels of wide[H * d].
STL_INLINE void spread(const float* heads, int64_t H, int64_t d, float* wide) {
  for (int64_t j = 0; j < H; ++j)
    for (int64_t i = 0; i < d; ++i) wide[j * d + i] = heads[j];
}

// The per-head means of row[C] into heads[H], and spread back to every channel of the head in wide[C].
STL_INLINE void head_means(const float* row, int64_t H, int64_t d, float* heads, float* wide) {
  for (int64_t j = 0; j < H; ++j) {
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += row[j * d + i];
    heads[j] = s / static_cast<float>(d);
  }
  spread(heads, H, d, wide);
}

// One image: gate[C], k[N, H], stats [4, C] = (max q, sum exp q, max x, sum exp x).
template <typename Q, typename X>
void gate_image(const Q* q, const X* x, int64_t N, int64_t C, int64_t H, float* gate, float* k, float* stats) {
  const int64_t d = C / H;
  float *mq = stats, *zq = stats + C, *mx = stats + 2 * C, *zx = stats + 3 * C;
  softmax_stats(q, N, C, mq, zq);
  softmax_stats(x, N, C, mx, zx);
  std::vector<float> rzx(C), sx(C), kw(C), num(C, 0.f);
  for (int64_t c = 0; c < C; ++c) rzx[c] = 1.f / zx[c];
  for (int64_t r = 0; r < N; ++r) {
    softmax_row(x, r, C, mx, rzx.data(), sx.data());
    head_means(sx.data(), H, d, k + r * H, kw.data());
    for_channels(C, [&](int64_t c, int64_t n) {
      const Vec e = (load(q + r * C + c, n) - load(mq + c, n)).exp();
      store(at::vec::fmadd(e, load(kw.data() + c, n), load(num.data() + c, n)), num.data() + c, n);
    });
  }
  for (int64_t c = 0; c < C; ++c) gate[c] = num[c] / zq[c];
}

// One image's gradients: grad_q, grad_x [N, C] given grad_gate[C] and the forward's gate, k and stats.
template <typename Q, typename X>
void gate_image_backward(const float* grad_gate, const Q* q, const X* x, const float* gate, const float* k,
                         const float* stats, int64_t N, int64_t C, int64_t H, Q* grad_q, X* grad_x) {
  const int64_t d = C / H;
  const float *mq = stats, *zq = stats + C, *mx = stats + 2 * C, *zx = stats + 3 * C;
  std::vector<float> rzq(C), rzx(C), p(C), sx(C), kw(C), dk(N * H), dkw(C), s(C, 0.f);
  for (int64_t c = 0; c < C; ++c) {
    rzq[c] = 1.f / zq[c];
    rzx[c] = 1.f / zx[c];
  }
  // grad q = p * (k - gate) * grad_gate; grad k[j] = sum over head j of p * grad_gate, spread as grad k / d
  // over the head's channels of softmax(x); its softmax backward needs s = sum_n softmax(x) * that first.
  for (int64_t r = 0; r < N; ++r) {
    softmax_row(q, r, C, mq, rzq.data(), p.data());
    spread(k + r * H, H, d, kw.data());
    for_channels(C, [&](int64_t c, int64_t n) {
      const Vec pg = load(p.data() + c, n) * load(grad_gate + c, n);
      store(pg * (load(kw.data() + c, n) - load(gate + c, n)), grad_q + r * C + c, n);
      store(pg, p.data() + c, n);
    });
    head_means(p.data(), H, d, dk.data() + r * H, dkw.data());
    softmax_row(x, r, C, mx, rzx.data(), sx.data());
    for_channels(C, [&](int64_t c, int64_t n) {
      store(at::vec::fmadd(load(sx.data() + c, n), load(dkw.data() + c, n), load(s.data() + c, n)), s.data() + c,
            n);
    });
  }
  for (int64_t r = 0; r < N; ++r) {
    softmax_row(x, r, C, mx, rzx.data(), sx.data());
    spread(dk.data() + r * H, H, d, dkw.data());
    for_channels(C, [&](int64_t c, int64_t n) {
      store(load(sx.data() + c, n) * (load(dkw.data() + c, n) - load(s.data() + c, n)), grad_x + r * C + c, n);
    });
  }
}

void check_query(const at::Tensor& q, int64_t heads) {
  TORCH_CHECK(q.dim() == 3 && q.size(1) > 0, "channel_gate: q must be [B, N, C] with N > 0, got ", q.sizes());
  check_heads("channel_gate", q.size(2), heads);
}

// (gate [B, C], k [B, N, heads], stats [B, 4, C]), all float32; the last two are for channel_gate_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_gate(const at::Tensor& q, const at::Tensor& x,
                                                            int64_t heads) {
  check_query(q, heads);
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2);
  check_contiguous("channel_gate", q, "q", q.sizes());
  check_contiguous("channel_gate", x, "x", q.sizes());
  auto opts = q.options().dtype(at::kFloat);
  auto gate = at::empty({B, C}, opts), k = at::empty({B, N, heads}, opts), stats = at::empty({B, 4, C}, opts);
  dispatch(q, "channel_gate", [&](auto qtag) {
    return dispatch(x, "channel_gate", [&](auto xtag) {
      using Q = decltype(qtag);
      using X = decltype(xtag);
      const Q* pq = q.const_data_ptr<Q>();
      const X* px = x.const_data_ptr<X>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          gate_image(pq + b * N * C, px + b * N * C, N, C, heads, gate.data_ptr<float>() + b * C,
                     k.data_ptr<float>() + b * N * heads, stats.data_ptr<float>() + b * 4 * C);
      });
      return 0;
    });
  });
  return {gate, k, stats};
}

// (grad q, grad x) in q's and x's dtypes, given grad_gate [B, C] float32 and channel_gate's inputs and outputs.
std::tuple<at::Tensor, at::Tensor> channel_gate_backward(const at::Tensor& grad_gate, const at::Tensor& q,
                                                         const at::Tensor& x, const at::Tensor& gate,
                                                         const at::Tensor& k, const at::Tensor& stats,
                                                         int64_t heads) {
  check_query(q, heads);
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2);
  check_contiguous("channel_gate", q, "q", q.sizes());
  check_contiguous("channel_gate", x, "x", q.sizes());
  check_float("channel_gate", grad_gate, "grad_gate", {B, C});
  check_float("channel_gate", gate, "gate", {B, C});
  check_float("channel_gate", k, "k", {B, N, heads});
  check_float("channel_gate", stats, "stats", {B, 4, C});
  auto grad_q = at::empty_like(q), grad_x = at::empty_like(x);
  dispatch(q, "channel_gate_backward", [&](auto qtag) {
    return dispatch(x, "channel_gate_backward", [&](auto xtag) {
      using Q = decltype(qtag);
      using X = decltype(xtag);
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          gate_image_backward(grad_gate.const_data_ptr<float>() + b * C, q.const_data_ptr<Q>() + b * N * C,
                              x.const_data_ptr<X>() + b * N * C, gate.const_data_ptr<float>() + b * C,
                              k.const_data_ptr<float>() + b * N * heads, stats.const_data_ptr<float>() + b * 4 * C,
                              N, C, heads, grad_q.data_ptr<Q>() + b * N * C, grad_x.data_ptr<X>() + b * N * C);
      });
      return 0;
    });
  });
  return {grad_q, grad_x};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stl_cpu, m) {
  m.def("channel_gate(Tensor q, Tensor x, int heads) -> (Tensor, Tensor, Tensor)");
  m.def("channel_gate_backward(Tensor grad_gate, Tensor q, Tensor x, Tensor gate, Tensor k, Tensor stats, "
        "int heads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) {
  m.impl("channel_gate", channel_gate);
  m.impl("channel_gate_backward", channel_gate_backward);
}
