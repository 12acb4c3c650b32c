// Weight and bias gradients of a stride-1, same-padded depthwise conv over channels-last images (fp32 or
// bf16, summed in fp32), CPU.
//
// Built with bn_gelu.cpp (see there) and registered as torch.ops.stl_cpu.depthwise_weight_grad. The images
// are contiguous [B, H, W, C] views of channels-last [B, C, H, W] tensors.
//
// Why: oneDNN's depthwise weight gradient is slow for kernels wider than 3 columns (the ConvNeXt stem's 7x7:
// ~35-54 ms at [16, 128, 56, 56]); the column slices that stl/models/convnext_stem.py otherwise asks it for
// take ~19 ms with their padding and copies, this ~8.5 ms. (It is faster for 3x3 too: ~0.7 against oneDNN's
// ~1.1 ms at [16, 768, 14, 14], fp32; the FAN MLPs' 3x3 convs are part of fan_dwconv.cpp's fused block.)
// Per image, channel vector and kernel tap, one run along an image row with the sums in registers; per-image
// sums are combined in image order in double, so results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "vec_rows.h"

namespace {

using namespace stl_cpu;

constexpr int64_t kChunk = 4;  // channel vectors per run: 4 x 64 B per pixel, two image rows stay in L1

// acc[v] += sum over w0 <= w < w1 of g[w][v] * x[w + dx][v] for NV channel vectors (the last n_last wide);
// g and x are image rows of C channels.
template <int NV, typename E>
STL_INLINE void tap_row(const E* g, const E* x, float* acc, int64_t C, int64_t w0, int64_t w1,
                        int64_t dx, int64_t n_last) {
  Vec a[NV];
  for (int v = 0; v < NV; ++v) a[v] = load(acc + v * kV, v == NV - 1 ? n_last : kV);
  for (int64_t w = w0; w < w1; ++w) {
    const E* gw = g + w * C;
    const E* xw = x + (w + dx) * C;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t n = v == NV - 1 ? n_last : kV;
      a[v] = at::vec::fmadd(load(gw + v * kV, n), load(xw + v * kV, n), a[v]);
    }
  }
  for (int v = 0; v < NV; ++v) store(a[v], acc + v * kV, v == NV - 1 ? n_last : kV);
}

// The kh x kw taps and the bias of one image into acc ([kh * kw + 1, C] floats, zeroed).
template <typename E>
void image_sums(const E* g, const E* x, float* acc, int64_t H, int64_t W, int64_t C, int64_t kh,
                int64_t kw) {
  const int64_t T = kh * kw;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk * kV) {
    const int64_t nvec = std::min<int64_t>(kChunk, (C - c0 + kV - 1) / kV);
    const int64_t n_last = std::min<int64_t>(kV, C - c0 - (nvec - 1) * kV);
    for (int64_t h = 0; h < H; ++h) {
      const E* grow = g + h * W * C + c0;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hx = h + i - kh / 2;
        if (hx < 0 || hx >= H) continue;
        const E* xrow = x + hx * W * C + c0;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t dx = j - kw / 2, w0 = std::max<int64_t>(0, -dx), w1 = std::min<int64_t>(W, W - dx);
          float* a = acc + (i * kw + j) * C + c0;
          switch (nvec) {
            case 4: tap_row<4>(grow, xrow, a, C, w0, w1, dx, n_last); break;
            case 3: tap_row<3>(grow, xrow, a, C, w0, w1, dx, n_last); break;
            case 2: tap_row<2>(grow, xrow, a, C, w0, w1, dx, n_last); break;
            default: tap_row<1>(grow, xrow, a, C, w0, w1, dx, n_last); break;
          }
        }
      }
      float* ab = acc + T * C + c0;  // the bias: the gradient's own sum
      for (int64_t v = 0; v < nvec; ++v) {
        const int64_t n = v == nvec - 1 ? n_last : kV;
        Vec s = load(ab + v * kV, n);
        for (int64_t w = 0; w < W; ++w) s += load(grow + w * C + v * kV, n);
        store(s, ab + v * kV, n);
      }
    }
  }
}

// (grad weight [C, 1, kh, kw], grad bias [C]) of y = depthwise_conv(x, weight) with stride 1 and padding
// (kh / 2, kw / 2), given grad = dL/dy; grad and x: contiguous [B, H, W, C], both fp32 or both bf16. The
// gradients are fp32.
std::tuple<at::Tensor, at::Tensor> depthwise_weight_grad(const at::Tensor& grad, const at::Tensor& x, int64_t kh,
                                                         int64_t kw) {
  TORCH_CHECK(kh > 0 && kw > 0 && kh % 2 == 1 && kw % 2 == 1, "depthwise_weight_grad: the kernel must have odd ",
              "sides, got ", kh, "x", kw);
  for (auto [t, name] : {std::pair{&x, "x"}, {&grad, "grad"}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type() && t->dim() == 4 && t->is_contiguous(),
                "depthwise_weight_grad: ", name, " must be a contiguous [B, H, W, C] CPU tensor of x's dtype, got ",
                t->scalar_type(), " ", t->sizes(), " strides ", t->strides());
  }
  TORCH_CHECK(grad.sizes() == x.sizes(), "depthwise_weight_grad: grad ", grad.sizes(), " and x ", x.sizes(),
              " differ");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), T = kh * kw;
  std::vector<float> partial(static_cast<size_t>(B * (T + 1) * C), 0.f);
  dispatch(x, "depthwise_weight_grad", [&](auto tag) {
    using E = decltype(tag);
    const E *pg = grad.const_data_ptr<E>(), *px = x.const_data_ptr<E>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        image_sums(pg + b * H * W * C, px + b * H * W * C, partial.data() + b * (T + 1) * C, H, W, C, kh, kw);
    });
    return 0;
  });
  const auto sums = sum_in_image_order(partial, B, (T + 1) * C);  // [T + 1, C]
  return {depthwise_weight(sums, C, C, kh, kw), sums_row(sums, C, T, C)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stl_cpu, m) {
  m.def("depthwise_weight_grad(Tensor grad, Tensor x, int kh, int kw) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) { m.impl("depthwise_weight_grad", depthwise_weight_grad); }
