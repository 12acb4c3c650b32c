// The weight and bias gradients of a bf16 linear y = x @ W^T + b, in float32, CPU: grad_W = grad^T @ x over
// the rows (tokens) and grad_b = the column sums of grad. Registered as torch.ops.stl_cpu.linear_weight_grad;
// stl/models/cpu_kernels.py calls it for the linears it runs under bf16 autocast (cpu_kernels.linear, the FAN
// MLP's fc1 and fc2), whose fp32 weights then get float gradients with nothing to convert.
//
// Why: under autocast, grad_W is a bf16 matmul whose output is rounded to bf16 and converted to float for the
// fp32 weight, and grad_b a bf16 sum (torch's took ~80 us for 3136 x 192), converted likewise. The matmul is
// the backward's slowest shape: both operands hold the reduction (the tokens) in their rows, and oneDNN runs
// it at about half the rate of the forward's and the input gradient's matmuls. MKL's bf16 x bf16 -> float
// GEMM (cblas_gemm_bf16bf16f32, part of torch's x86 builds, looked up at run time) writes the float result
// directly and is faster at most of FAN-ViT-T's shapes (2 threads, cold caches, against torch's matmul and
// conversion): fc1's [768 x 192] 0.74-0.86 against 1.10-1.12 ms, the q projection's [192 x 192] 0.29-0.39
// against 0.46-0.52. In a bf16 training step the weight and bias gradients with their conversions took ~78
// instead of ~86 ms (profiler, alternating runs). Without MKL the op uses torch's matmul and converts its result.
//
// Results: grad_W and grad_b are not rounded to bf16 (relative error ~1e-7 against float64 of the same bf16
// operands, where autocast's are off by ~2e-3). grad_W depends on MKL's blocking of the reduction, which may
// change with the thread count as oneDNN's does; grad_b does not.

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "vec_rows.h"

namespace {

using namespace stl_cpu;

// MKL's CBLAS, LP64 (the interface torch links): C = alpha * op(A) op(B) + beta * C, bf16 inputs, float C.
using GemmBf16F32 = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                             const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// The function in libtorch_cpu (torch's MKL, LP64), not the first of that name in the process: another MKL
// loaded globally before it could have 64-bit integer arguments. nullptr where torch's build has none.
GemmBf16F32 mkl_gemm() {
  static const GemmBf16F32 gemm = [] {
    Dl_info info;
    const auto in_torch_cpu = reinterpret_cast<void*>(&at::native::cpublas::could_pack);
    if (dladdr(in_torch_cpu, &info) == 0 || info.dli_fname == nullptr) return GemmBf16F32{nullptr};
    void* torch_cpu = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);  // (loaded: only a reference is taken)
    if (torch_cpu == nullptr) return GemmBf16F32{nullptr};
    const auto found = reinterpret_cast<GemmBf16F32>(dlsym(torch_cpu, "cblas_gemm_bf16bf16f32"));
    dlclose(torch_cpu);
    return found;
  }();
  return gemm;
}

bool has_mkl_bf16_gemm() { return mkl_gemm() != nullptr; }

// grad^T @ x as float [O, I]: grad [R, O], x [R, I], bf16 rows. With fewer output rows than columns (fc2's
// [192 x 768]), MKL is faster at the transposed product, x^T @ grad, which is then transposed (0.96 against
// 1.05 ms, cold caches). There it is ~5% slower than torch's bf16 matmul and conversion (0.87 + ~0.05 ms); it
// is kept so that every weight gradient is float, whatever the shape.
at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& x) {
  const int64_t R = grad.size(0), O = grad.size(1), I = x.size(1);
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  const auto gemm = mkl_gemm();
  if (gemm == nullptr || R > kMax || O > kMax || I > kMax) return at::mm(grad.t(), x).to(at::kFloat);
  const bool transposed = O < I;
  const auto [a, b, m, n] = transposed ? std::tuple{&x, &grad, I, O} : std::tuple{&grad, &x, O, I};
  auto out = at::empty({m, n}, grad.options().dtype(at::kFloat));
  if (R == 0 || m == 0 || n == 0) out.zero_();  // (MKL refuses a leading dimension of 0)
  else gemm(kRowMajor, kTrans, kNoTrans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(R), 1.f,
            reinterpret_cast<const uint16_t*>(a->const_data_ptr<BFloat16>()), static_cast<int>(m),
            reinterpret_cast<const uint16_t*>(b->const_data_ptr<BFloat16>()), static_cast<int>(n), 0.f,
            out.data_ptr<float>(), static_cast<int>(n));
  return transposed ? out.t().contiguous() : out;
}

// The column sums of grad [R, O] (bf16) as float [O]: blocks of kBlock rows summed in float, row by row, the
// blocks' sums added in double in block order: the same result on any number of threads.
at::Tensor column_sums(const at::Tensor& grad) {
  constexpr int64_t kBlock = 64;
  const int64_t R = grad.size(0), O = grad.size(1), blocks = (R + kBlock - 1) / kBlock;
  std::vector<float> part(blocks * O);
  const BFloat16* pg = grad.const_data_ptr<BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* out = part.data() + b * O;  // the block's sums, in L1 while its rows stream by
      std::fill_n(out, O, 0.f);
      for (int64_t r = b * kBlock; r < std::min(R, (b + 1) * kBlock); ++r)
        for_channels(O, [&](int64_t c, int64_t n) {
          store(load(out + c, n) + load(pg + r * O + c, n), out + c, n);
        });
    }
  });
  return channel_vector(sum_in_image_order(part, blocks, O));
}

// (grad_W [O, I], grad_b [O] or an empty tensor) in float32, for grad [R, O] and x [R, I] contiguous bf16.
std::tuple<at::Tensor, at::Tensor> linear_weight_grad(const at::Tensor& grad, const at::Tensor& x, bool bias) {
  for (auto [t, name] : {std::pair{&grad, "grad"}, {&x, "x"}}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->is_contiguous() && t->scalar_type() == at::kBFloat16,
                "linear_weight_grad: ", name, " must be a contiguous 2-d bfloat16 CPU tensor, got ", t->sizes(),
                " ", t->scalar_type(), " strides ", t->strides());
  }
  TORCH_CHECK(grad.size(0) == x.size(0), "linear_weight_grad: grad and x must have as many rows, got ",
              grad.sizes(), " and ", x.sizes());
  return {weight_grad(grad, x), bias ? column_sums(grad) : at::empty({0}, grad.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stl_cpu, m) {
  m.def("linear_weight_grad(Tensor grad, Tensor x, bool bias) -> (Tensor, Tensor)");
  m.def("has_mkl_bf16_gemm() -> bool", &has_mkl_bf16_gemm);
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) { m.impl("linear_weight_grad", linear_weight_grad); }
