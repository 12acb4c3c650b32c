// FAN's multi-head self-attention (TokenMixing) in training, forward and backward, CPU:
//
//   out[b, n, h*d + i] = sum_m softmax_m(q_h k_h^T / sqrt(d))[n, m] v_h[m, i]
//
// (stl/models/layers.py, TokenMixing). q is the q linear's output [B, N, C] and kv the kv linear's [B, N, 2C]
// (k its first C channels, v the rest), both contiguous float32, or bf16 under autocast; the heads split C
// into blocks of d channels. out is [B, N, C], what the output projection reads, and the gradients come back
// as [B, N, C] and [B, N, 2C]: no head split or merge is copied either way. Built with bn_gelu.cpp (see there)
// and registered as torch.ops.stl_cpu.attention / attention_backward.
//
// Why: torch runs this as batched matmuls and a softmax over a stored [B, heads, N, N] matrix, with copies
// for the head split and merge; SDPA's flash kernel is no faster in fp32 and 3x slower in bf16 backward. Here
// one (image, head) at a time stays in L2 through all its matmuls, which go through ATen's batch-reduce GEMM
// (oneDNN's brgemm ukernel; with AMX tiles for bf16 where the CPU has them), and the attention matrix is
// recomputed in backward from two saved statistics per row (the row max, 1 / the sum of exponentials), which
// reproduce the forward's probabilities. Per block at FAN-ViT-T's [16, 196, 192], 4 heads, 2 threads,
// forward + backward: fp32 7.3-8.3 ms against 9.7-11.2 for SDPA's flash kernel, bf16 3.9-4.4 against 6.3-10.2
// for torch's matmuls and softmax.
//
// Numerics: scores, softmax and every matmul's accumulation are fp32. In bf16 the probabilities P (the
// forward's unnormalised: the output rows are divided by their sums) and their gradient dS are rounded to
// bf16 as matmul inputs and the outputs to bf16 (torch's ops store those in bf16 too, and its scores as
// well). Each (image, head) is computed by one thread: results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_rows.h"

namespace {

using namespace stl_cpu;
namespace blas = at::native::cpublas;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether bf16 matmuls run on AMX tiles, B packed in VNNI pairs (otherwise brgemm falls back to ATen's gemm).
// Asked per call: oneDNN can be switched off at run time (torch.backends.mkldnn).
bool packs_bf16() { return blas::could_pack(at::kBFloat16); }

// The matmuls of one thread: C[M, N] = A[M, K] @ B[K, N], A and B row-major in T, C in float. With packing
// (bf16 on AMX) K must be even (the callers pad with zeros) and C's rows must have room for N rounded up to
// 16 columns (the columns past N get undefined values).
template <typename T>
class Gemm {
 public:
  Gemm(int64_t max_k, int64_t d)
      : vnni_(std::is_same_v<T, BFloat16> && d % 2 == 0 && packs_bf16()),
        packed_(vnni_ ? round_up(max_k, 2) * kBlock : 0) {}
  ~Gemm() { blas::brgemm_release(vnni_); }  // the thread's AMX tile configuration
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  bool vnni() const { return vnni_; }

  void operator()(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C,
                  int64_t ldc) {
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      const int64_t w = std::min(kBlock, N - n0);
      if (vnni_) {
        const int64_t wp = round_up(w, 16);
        blas::pack(K, w, ldb, wp, at::kBFloat16, at::kBFloat16, B + n0, packed_.data());
        blas::brgemm(M, wp, K, lda, wp, ldc, false, A, packed_.data(), C + n0, true);
      } else {
        blas::brgemm(M, w, K, lda, ldb, ldc, false, A, B + n0, C + n0, false);
      }
    }
  }

 private:
  static constexpr int64_t kBlock = 64;  // the widest B block brgemm's packing takes
  bool vnni_;
  std::vector<T> packed_;
};

// dst[c, r] = src[r, c] for r < rows, c < cols: ATen's vectorized transposes, in the blocks they take.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 32;  // the largest bf16 block (float takes any size)
  for (int64_t r = 0; r < rows; r += kTile)
    for (int64_t c = 0; c < cols; c += kTile)
      at::vec::transpose_mxn<T>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst,
                                std::min(kTile, rows - r), std::min(kTile, cols - c));
}

// rows x cols floats (row stride ld_src) times scale (and row r times row_scale[r], if given), stored to T
// rows of stride ld_dst.
template <typename T>
void store_rows(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float scale, T* dst,
                int64_t ld_dst, const float* row_scale = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    const Vec factor(row_scale == nullptr ? scale : scale * row_scale[r]);
    for_channels(cols, [&](int64_t c, int64_t n) {
      store(load(src + r * ld_src + c, n) * factor, dst + r * ld_dst + c, n);
    });
  }
}

// exp of a vector of scores: ATen's exp for fp32 (1 ulp); for bf16, whose probabilities are rounded to 8 bits,
// its faster 20-ulp one (what torch's flash attention uses).
template <typename T>
STL_INLINE Vec exp_for(const Vec& x) {
  if constexpr (std::is_same_v<T, float>) return x.exp();
  else return x.exp_u20();
}

// One thread's buffers for one (image, head) at a time; zero-filled once, so the K padding of bf16 matmuls
// (row and column N of P and dS, columns N.. of the transposed operands, row N of staged ones) stays zero.
template <typename T>
struct Workspace {
  int64_t N, d, Kp, ld;  // tokens, head size, tokens padded for the K of a packed matmul, row stride
  std::vector<float> S;  // [max(N, d), ld]: scores, then transposed gradients
  std::vector<float> S2; // [N, ld]: dP
  std::vector<float> O;  // [N, round_up(d, 16)]: a matmul's [N, d] result
  std::vector<T> P, dS;  // [Kp, ld]
  std::vector<T> t;      // [d, ld]: a transposed [N, d] operand
  std::vector<T> rows;   // [Kp, d]: an [N, d] operand with a zero row for K padding
  std::vector<float> inv_sum;  // [N]: the forward's 1 / row sums

  Workspace(int64_t N_, int64_t d_, bool vnni)
      : N(N_), d(d_), Kp(vnni ? round_up(N_, 2) : N_), ld(round_up(Kp, 16)),
        S(std::max(N_, d_) * ld, 0.f), S2(N_ * ld, 0.f), O(N_ * ldo(), 0.f), P(Kp * ld, T(0)), dS(Kp * ld, T(0)),
        t(d_ * ld, T(0)), rows(Kp * d_, T(0)), inv_sum(N_) {}

  int64_t ldo() const { return round_up(d, 16); }

  // [N, d] rows of stride ld_src as a B operand with Kp rows: themselves, or a copy with the zero row.
  std::pair<const T*, int64_t> operand_rows(const T* src, int64_t ld_src) {
    if (Kp == N) return {src, ld_src};
    for (int64_t r = 0; r < N; ++r) std::copy(src + r * ld_src, src + r * ld_src + d, rows.data() + r * d);
    return {rows.data(), d};
  }

  // The transposed [d, N] of N rows of stride ld_src (columns N.. stay zero).
  const T* transposed(const T* src, int64_t ld_src) {
    transpose(src, N, d, ld_src, t.data(), ld);
    return t.data();
  }
};

// exp(scale * (s - max)) of n (<= kV) scores; lanes past n are 0 (a partial load's zeros would give
// exp(-scale * max), which overflows for rows of very negative scores). The difference is taken before
// scaling: the max itself then gives exactly 1, however large the scores (a fused scale * s - scale * max
// would not).
template <typename T>
STL_INLINE Vec exp_shifted(const float* s, int64_t n, const Vec& mx, const Vec& scale) {
  const Vec e = exp_for<T>((load(s, n) - mx) * scale);
  return n == kV ? e : Vec::set(Vec(0.f), e, n);
}

// One row of exp(scale * (s - max s)) from the scores s (N of them), stored to p rounded to T; the row's
// statistics into stats[2]: max s and 1 / the sum of the exponentials (p / that sum is the softmax).
template <typename T>
void exp_row(const float* s, int64_t N, float scale, T* p, float* stats) {
  const float mx = at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, N);
  Vec sum(0.f);
  for_channels(N, [&](int64_t j, int64_t n) {
    const Vec e = exp_shifted<T>(s + j, n, Vec(mx), Vec(scale));
    store(e, p + j, n);
    sum += e;
  });
  stats[0] = mx;
  stats[1] = 1.f / sum_lanes(sum);
}

// The head's pointers: q rows of stride C, k and v rows of stride 2C, out rows of stride C.
template <typename T>
struct Head {
  const T *q, *k, *v;
  int64_t C;
};

// P is kept unnormalised (each row's exponentials), and the output rows are divided by the row sums.
template <typename T>
void forward_head(const Head<T>& x, T* out, float* stats, float scale, Workspace<T>& w, Gemm<T>& gemm) {
  const int64_t N = w.N, d = w.d, C = x.C, ld = w.ld;
  gemm(N, N, d, x.q, C, w.transposed(x.k, 2 * C), ld, w.S.data(), ld);
  for (int64_t i = 0; i < N; ++i) {
    exp_row(w.S.data() + i * ld, N, scale, w.P.data() + i * ld, stats + 2 * i);
    w.inv_sum[i] = stats[2 * i + 1];
  }
  const auto [v, ldv] = w.operand_rows(x.v, 2 * C);
  gemm(N, d, w.Kp, w.P.data(), ld, v, ldv, w.O.data(), w.ldo());
  store_rows(w.O.data(), N, d, w.ldo(), 1.f, out, C, w.inv_sum.data());
}

template <typename T>
void backward_head(const Head<T>& x, const T* grad, const float* stats, float scale, T* grad_q,
                   T* grad_k, T* grad_v, Workspace<T>& w, Gemm<T>& gemm) {
  const int64_t N = w.N, d = w.d, C = x.C, ld = w.ld;
  float *S = w.S.data(), *dP = w.S2.data();
  T *P = w.P.data(), *dS = w.dS.data();
  // the scores again, and dP = dO V^T
  gemm(N, N, d, x.q, C, w.transposed(x.k, 2 * C), ld, S, ld);
  gemm(N, N, d, grad, C, w.transposed(x.v, 2 * C), ld, dP, ld);
  // P = exp(scale (S - max S)) / sum, as forward computed it (stored rounded to T), then dS = P (dP - delta)
  // with the softmax backward's row terms delta = sum_j P dP (from this P: each row of dS sums to ~0, as the
  // softmax's gradient must)
  const Vec vscale(scale);
  for (int64_t r = 0; r < N; ++r) {
    const Vec mx(stats[2 * r]), inv_sum(stats[2 * r + 1]);
    Vec acc(0.f);
    for_channels(N, [&](int64_t j, int64_t n) {
      const int64_t o = r * ld + j;
      acc += store_rounded(exp_shifted<T>(S + o, n, mx, vscale) * inv_sum, P + o, n) * load(dP + o, n);
    });
    const Vec delta(sum_lanes(acc));
    for_channels(N, [&](int64_t j, int64_t n) {
      const int64_t o = r * ld + j;
      store(load(P + o, n) * (load(dP + o, n) - delta), dS + o, n);
    });
  }
  // dQ = scale dS K
  const auto [k, ldk] = w.operand_rows(x.k, 2 * C);
  gemm(N, d, w.Kp, dS, ld, k, ldk, w.O.data(), w.ldo());
  store_rows(w.O.data(), N, d, w.ldo(), scale, grad_q, C);
  // dV^T = dO^T P and dK^T = scale Q^T dS, as [d, N] matmuls (P and dS as B operands need no transposing)
  gemm(d, N, w.Kp, w.transposed(grad, C), ld, P, ld, S, ld);
  transpose(S, d, N, ld, w.O.data(), w.ldo());
  store_rows(w.O.data(), N, d, w.ldo(), 1.f, grad_v, 2 * C);
  gemm(d, N, w.Kp, w.transposed(x.q, C), ld, dS, ld, S, ld);
  transpose(S, d, N, ld, w.O.data(), w.ldo());
  store_rows(w.O.data(), N, d, w.ldo(), scale, grad_k, 2 * C);
}

void check_tensor(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef sizes,
                  const at::Tensor& like) {
  check_contiguous(op, t, name, sizes);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have q's dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
}

// Checks q and kv; returns (B, N, C, d).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_inputs(const char* op, const at::Tensor& q,
                                                            const at::Tensor& kv, int64_t heads) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.size(1) > 0 && q.is_contiguous(), op,
              ": q must be a contiguous [B, N, C] CPU tensor with N > 0, got ", q.sizes());
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2);
  check_heads(op, C, heads);
  check_tensor(op, kv, "kv", {B, N, 2 * C}, q);
  return {B, N, C, C / heads};
}

// Asks for an (image, head)'s N rows of d values (row stride ld) in cache: a head's rows are short pieces of
// rows far apart, which the transposes would otherwise read at memory latency, one at a time.
template <typename T>
void prefetch_rows(const T* p, int64_t N, int64_t d, int64_t ld) {
  for (int64_t r = 0; r < N; ++r)
    for (int64_t i = 0; i < d * static_cast<int64_t>(sizeof(T)); i += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(p + r * ld) + i, 0, 2);
}

// Runs f(b, h, unit) for the B * heads (image, head) units over ATen's threads, one workspace per thread;
// prefetch(b, h) first for the thread's next unit, so its inputs arrive while this one computes.
template <typename T, typename F, typename P>
void for_heads(int64_t B, int64_t N, int64_t d, int64_t heads, const F& f, const P& prefetch) {
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    Gemm<T> gemm(std::max(N, d), d);
    Workspace<T> w(N, d, gemm.vnni());
    for (int64_t u = begin; u < end; ++u) {
      if (u + 1 < end) prefetch((u + 1) / heads, (u + 1) % heads);
      f(u / heads, u % heads, u, w, gemm);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& kv, int64_t heads) {
  const auto [B, N, C, d] = check_inputs("attention", q, kv, heads);
  auto out = at::empty_like(q);
  auto stats = at::empty({B, heads, N, 2}, q.options().dtype(at::kFloat));
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  dispatch(q, "attention", [&](auto t) {
    using T = decltype(t);
    const T *qp = q.data_ptr<T>(), *kvp = kv.data_ptr<T>();
    T* op = out.data_ptr<T>();
    float* sp = stats.data_ptr<float>();
    const auto fetch = [&](int64_t b, int64_t h) {
      prefetch_rows(qp + b * N * C + h * d, N, d, C);
      prefetch_rows(kvp + b * N * 2 * C + h * d, N, d, 2 * C);
      prefetch_rows(kvp + b * N * 2 * C + C + h * d, N, d, 2 * C);
    };
    for_heads<T>(B, N, d, heads, [&](int64_t b, int64_t h, int64_t u, Workspace<T>& w, Gemm<T>& gemm) {
      const T* k = kvp + b * N * 2 * C + h * d;
      forward_head(Head<T>{qp + b * N * C + h * d, k, k + C, C}, op + b * N * C + h * d, sp + u * N * 2, scale, w,
                   gemm);
    }, fetch);
    return 0;
  }, "q");
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad, const at::Tensor& q,
                                                      const at::Tensor& kv, const at::Tensor& stats,
                                                      int64_t heads) {
  const auto [B, N, C, d] = check_inputs("attention_backward", q, kv, heads);
  check_tensor("attention_backward", grad, "grad", q.sizes(), q);
  check_float("attention_backward", stats, "stats", {B, heads, N, 2});
  auto grad_q = at::empty_like(q);
  auto grad_kv = at::empty_like(kv);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  dispatch(q, "attention_backward", [&](auto t) {
    using T = decltype(t);
    const T *qp = q.data_ptr<T>(), *kvp = kv.data_ptr<T>(), *gp = grad.data_ptr<T>();
    T *gq = grad_q.data_ptr<T>(), *gkv = grad_kv.data_ptr<T>();
    const float* sp = stats.data_ptr<float>();
    const auto fetch = [&](int64_t b, int64_t h) {
      prefetch_rows(qp + b * N * C + h * d, N, d, C);
      prefetch_rows(gp + b * N * C + h * d, N, d, C);
      prefetch_rows(kvp + b * N * 2 * C + h * d, N, d, 2 * C);
      prefetch_rows(kvp + b * N * 2 * C + C + h * d, N, d, 2 * C);
    };
    for_heads<T>(B, N, d, heads, [&](int64_t b, int64_t h, int64_t u, Workspace<T>& w, Gemm<T>& gemm) {
      const int64_t row = b * N * C + h * d, kv_row = b * N * 2 * C + h * d;
      backward_head(Head<T>{qp + row, kvp + kv_row, kvp + kv_row + C, C}, gp + row, sp + u * N * 2, scale,
                    gq + row, gkv + kv_row, gkv + kv_row + C, w, gemm);
    }, fetch);
    return 0;
  }, "q");
  return {grad_q, grad_kv};
}

bool attention_packs_bf16() { return packs_bf16(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(stl_cpu, m) {
  m.def("attention(Tensor q, Tensor kv, int heads) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad, Tensor q, Tensor kv, Tensor stats, int heads) "
        "-> (Tensor, Tensor)");
  m.def("attention_packs_bf16() -> bool", &attention_packs_bf16);
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) {
  m.impl("attention", attention);
  m.impl("attention_backward", attention_backward);
}
