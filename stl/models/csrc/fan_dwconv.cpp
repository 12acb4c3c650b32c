// The FAN MLP's depthwise block in training, fused, over channels-last images (fp32 or bf16), CPU:
//
//   c1 = conv1(h);  s = conv2(BN(GELU(c1))) [+ h]
//
// conv1 and conv2 are stride-1, same-padded 3x3 depthwise convs with bias, BN a BatchNorm in training mode
// (batch statistics). Built with bn_gelu.cpp (see there) and registered as torch.ops.stl_cpu.fan_dw_*;
// stl/models/layers.py (_FanMlpFunction) calls them through cpu_kernels.py. Images are contiguous
// [B, H, W, C] views of channels-last [B, C, H, W] tensors, all of one dtype (float32, or bf16 as autocast
// runs these ops: stored in bf16, computed in fp32); conv weights [C, 1, 3, 3] and per-channel vectors are
// float32.
//
// Why: every op of the block is per channel, and the block is memory-bound. Unfused, it is two oneDNN
// convs, BatchNorm statistics and normalisation, a residual add forward and, backward, two convs' input
// and weight gradients, BatchNorm and GELU backward and the residual: about twenty passes over the hidden
// activations, each at DRAM speed in a training step. Here the work splits into units of one image and 64
// channels, copied once into zero-padded float tiles that stay in cache through all the unit's steps: two
// passes forward (conv1 and the GELU with its batch statistics, storing both; BN, conv2 and the residual),
// two backward (conv2's input and weight gradients with BN's sums; then conv2's input gradient again, BN and
// GELU backward, conv1's input and weight gradients, the residual, fc1's bias gradient). BN(act) is
// recomputed, not stored; act = GELU(c1) is stored, as the exact GELU is the block's costliest arithmetic
// (computed once forward instead of three times: forward + backward 8.1-8.5 against 8.7-10.7 ms at
// [16, 14, 14, 768] in bf16, alternating runs). A unit's channels are a 3 KB-strided column of 256 B pieces:
// read straight from memory, filling the tiles would wait on memory for as long as the arithmetic takes, so
// the next unit's are prefetched while the current one computes, and the forward's outputs go out as
// streaming stores (Prefetcher, flush; the backward writes dL/dh over lines it has just read).
// In a FAN-ViT-T training step (batch 16, [16, 14, 14, 768]) a block took 11.5 ms forward + backward in fp32
// and 9.5-10.5 in bf16 when the GELU was recomputed, against 14.9 and 12.2 for oneDNN's convs and the separate
// BatchNorm + GELU and weight-gradient kernels it replaces (profiler, per step: 138 vs 179 ms, 114-126 vs 146).
//
// Values are rounded to the element type where torch's ops under autocast store them (c1, the GELU's and the
// BN's output, each conv's output and input gradient, the BN + GELU backward's output, the residual sums);
// the BN's input gradient stays in fp32 inside the fused pass (torch's ops store it in bf16). Per-unit sums
// are combined in image order in double: results do not depend on the thread count.

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "gelu.h"
#include "vec_rows.h"

namespace {

using namespace stl_cpu;

constexpr int64_t kGroup = 64;  // channels per unit of work
constexpr int64_t kTaps = 9;    // 3x3 convs

struct Shape {
  int64_t B, H, W, C;

  int64_t groups() const { return (C + kGroup - 1) / kGroup; }
  int64_t padded_channels() const { return groups() * kGroup; }
  int64_t at(int64_t b, int64_t y, int64_t x) const { return ((b * H + y) * W + x) * C; }  // a pixel's offset
};

// One unit's image as zero-padded float planes [kGroup / kV, H + 2, W + 2, kV], a plane per channel vector.
// The interior is refilled for each unit (all lanes, zeros past the unit's channels), the border stays zero.
// Why planes: the work runs over one channel vector at a time, and its lanes in a pixel-major tile are 64 B
// every 256 B, which maps them to a quarter of the L1 cache's sets (a 3x3 conv's rows then miss L1);
// contiguous, they use all of it (single-thread backward ~8-10% faster at [16, 14, 14, 768], bf16).
class Tile {
 public:
  explicit Tile(const Shape& s)
      : wp_(s.W + 2), plane_((s.H + 2) * wp_ * kV), data_(plane_ * (kGroup / kV), 0.f) {}

  // Lanes v * kV.. of pixel (y, x) of the image; -1 <= y <= H and -1 <= x <= W reach into the border.
  float* at(int64_t y, int64_t x, int64_t v = 0) {
    return data_.data() + v * plane_ + ((y + 1) * wp_ + x + 1) * kV;
  }
  Vec get(int64_t y, int64_t x, int64_t v) { return Vec::loadu(at(y, x, v)); }
  void put(int64_t y, int64_t x, int64_t v, const Vec& a) { a.store(at(y, x, v)); }

 private:
  int64_t wp_, plane_;
  std::vector<float> data_;
};

constexpr int64_t kRun = 8;  // pixels along a row computed together (their sums and inputs fill the registers)

// Calls f(x0, N) for runs of N <= kRun pixels (std::integral_constant) covering a row of W pixels.
template <typename F>
STL_INLINE void for_runs(int64_t W, const F& f) {
  const int64_t runs = (W + kRun - 1) / kRun;
  for (int64_t r = 0, x0 = 0; r < runs; ++r) {
    const int64_t n = (W - x0) / (runs - r);
    switch (n) {
      case 8: f(x0, std::integral_constant<int, 8>{}); break;
      case 7: f(x0, std::integral_constant<int, 7>{}); break;
      case 6: f(x0, std::integral_constant<int, 6>{}); break;
      case 5: f(x0, std::integral_constant<int, 5>{}); break;
      case 4: f(x0, std::integral_constant<int, 4>{}); break;
      case 3: f(x0, std::integral_constant<int, 3>{}); break;
      case 2: f(x0, std::integral_constant<int, 2>{}); break;
      default: f(x0, std::integral_constant<int, 1>{}); break;
    }
    x0 += n;
  }
}

// The 3x3 taps of lanes v of a unit's channels, in registers: taps [9, Cp] from taps_of, c0 the unit's first
// channel.
struct Taps {
  Vec w[kTaps];
  Taps(const std::vector<float>& taps, int64_t Cp, int64_t c0, int64_t v) {
    for (int64_t t = 0; t < kTaps; ++t) w[t] = Vec::loadu(taps.data() + t * Cp + c0 + v * kV);
  }
};

// Lanes v of pixels x0 - 1 .. x0 + N of row y of t: a run of N pixels with its two neighbours.
template <int N>
STL_INLINE void load_run(Tile& t, int64_t y, int64_t x0, int64_t v, Vec (&in)[N + 2]) {
  const float* row = t.at(y, x0 - 1, v);
#pragma GCC unroll 10
  for (int k = 0; k < N + 2; ++k) in[k] = Vec::loadu(row + k * kV);
}

// acc[n] = bias + sum over taps (i, j) of t(y + i - 1, x0 + n + j - 1) * w[i * 3 + j], lanes v: the conv at a
// run of pixels, or with flipped taps the conv's input gradient (t holding its output gradient).
template <int N>
STL_INLINE void conv_run(Tile& t, int64_t y, int64_t x0, int64_t v, const Taps& w, const Vec& bias,
                         Vec (&acc)[N]) {
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) acc[n] = bias;
#pragma GCC unroll 3
  for (int i = 0; i < 3; ++i) {
    Vec in[N + 2];
    load_run<N>(t, y + i - 1, x0, v, in);
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) {
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) acc[n] = at::vec::fmadd(in[n + j], w.w[i * 3 + j], acc[n]);
    }
  }
}

// acc[i * 3 + j] += sum over a run of pixels of g(y, x) * in(y + i - 1, x + j - 1), acc[9] += sum of g, lanes
// v: a run's part of a conv's weight and bias gradients (g: the conv's output gradient, in: its input).
template <int N>
STL_INLINE void weight_run(Tile& g, Tile& in, int64_t y, int64_t x0, int64_t v, Vec (&acc)[10]) {
  Vec gv[N];
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) {
    gv[n] = g.get(y, x0 + n, v);
    acc[9] += gv[n];
  }
#pragma GCC unroll 3
  for (int i = 0; i < 3; ++i) {
    Vec iv[N + 2];
    load_run<N>(in, y + i - 1, x0, v, iv);
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) {
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) acc[i * 3 + j] = at::vec::fmadd(gv[n], iv[n + j], acc[i * 3 + j]);
    }
  }
}

// A unit's part of a conv's weight and bias gradients, lanes v, into out (rows of stride os: 9 taps, bias).
void weight_sums(Tile& g, Tile& in, const Shape& s, int64_t v, float* out, int64_t os) {
  Vec acc[10];
  for (int t = 0; t < 10; ++t) acc[t] = Vec(0.f);
  for (int64_t y = 0; y < s.H; ++y)
    for_runs(s.W, [&](int64_t x0, auto N) { weight_run<N()>(g, in, y, x0, v, acc); });
  for (int t = 0; t < 10; ++t) acc[t].store(out + t * os + v * kV);
}

// The vectors v of a unit holding any of its nc channels.
STL_INLINE int64_t vectors(int64_t nc) { return (nc + kV - 1) / kV; }
// Lanes of vector v that hold channels.
STL_INLINE int64_t lanes(int64_t nc, int64_t v) { return std::min(kV, nc - v * kV); }

// Orders the streaming stores of flush (below) before whatever follows (another thread reading the output).
STL_INLINE void streamed() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Reads a unit's channels of the op's input images into L2 ahead of use, a few pixels per step, the steps
// spread over the work on the unit before: its reads from memory then overlap that unit's arithmetic
// (otherwise filling the tiles waits on memory for about as long as the arithmetic takes).
class Prefetcher {
 public:
  Prefetcher(const Shape& s, std::initializer_list<std::pair<const void*, int64_t>> images)
      : s_(s), images_(images) {}

  void start(int64_t b, int64_t c0, int64_t nc) {
    b_ = b;
    c0_ = c0;
    nc_ = nc;
    pixel_ = 0;
  }
  void stop() { pixel_ = s_.H * s_.W; }
  STL_INLINE void step() {
    for (int k = 0; k < kPixelsPerStep && pixel_ < s_.H * s_.W; ++k, ++pixel_) {
      for (auto [base, size] : images_) {
        const char* p = static_cast<const char*>(base) + ((b_ * s_.H * s_.W + pixel_) * s_.C + c0_) * size;
        for (int64_t i = 0; i < nc_ * size; i += 64) __builtin_prefetch(p + i, 0, 2);
      }
    }
  }

 private:
  static constexpr int kPixelsPerStep = 2;  // an image's pixels in fewer steps than a unit takes
  Shape s_;
  std::vector<std::pair<const void*, int64_t>> images_;
  int64_t b_ = 0, c0_ = 0, nc_ = 0, pixel_ = 0;
};

// One unit of work: image b, channels c0..c0+nc; the thread's tiles, and the prefetcher of its next unit.
struct Unit {
  int64_t b, c0, nc;
  std::vector<Tile>& tiles;
  Prefetcher& next;
};

// Runs f(unit) over the units in parallel, with kTiles Tiles per thread; `images` (base pointer, element
// size) are the images the units read, prefetched a unit ahead.
template <int kTiles, typename F>
void for_units(const Shape& s, std::initializer_list<std::pair<const void*, int64_t>> images, const F& f) {
  at::parallel_for(0, s.B * s.groups(), 1, [&](int64_t u0, int64_t u1) {
    std::vector<Tile> tiles(kTiles, Tile(s));
    Prefetcher next(s, images);
    for (int64_t u = u0; u < u1; ++u) {
      const auto unit = [&](int64_t i) { return std::pair{i / s.groups(), (i % s.groups()) * kGroup}; };
      const auto [b, c0] = unit(u);
      if (u + 1 < u1) {
        const auto [nb, nc0] = unit(u + 1);
        next.start(nb, nc0, std::min(kGroup, s.C - nc0));
      } else {
        next.stop();
      }
      f(Unit{b, c0, std::min(kGroup, s.C - c0), tiles, next});
    }
    streamed();
  });
}

// Calls f(y, x0, N) for the runs of pixels of an image, row by row, with a prefetch step per run.
template <typename F>
STL_INLINE void for_pixel_runs(const Shape& s, Prefetcher& next, const F& f) {
  for (int64_t y = 0; y < s.H; ++y)
    for_runs(s.W, [&](int64_t x0, auto N) {
      next.step();
      f(y, x0, N);
    });
}

// Fills the tile's interior with channels c0..c0+nc of image b of x.
template <typename E>
void fill(Tile& t, const E* x, const Shape& s, int64_t b, int64_t c0, int64_t nc) {
  for (int64_t y = 0; y < s.H; ++y) {
    for (int64_t xx = 0; xx < s.W; ++xx) {
      const E* p = x + s.at(b, y, xx) + c0;
      for (int64_t v = 0; v < kGroup / kV; ++v) {
        const int64_t n = std::clamp<int64_t>(nc - v * kV, 0, kV);
        t.put(y, xx, v, n > 0 ? load(p + v * kV, n) : Vec(0.f));
      }
    }
  }
}

// Writes the tile's interior to channels c0..c0+nc of image b of x, a pixel's channels at a time. Whole
// cache lines go out as streaming stores on AVX-512: the outputs are fresh memory read again only in a
// later pass, and ordinary stores of scattered lines would each wait for the line to be read first (2-3x
// slower in a training step). Call streamed() before other threads read x.
template <typename E>
void flush(Tile& t, E* x, const Shape& s, int64_t b, int64_t c0, int64_t nc) {
  for (int64_t y = 0; y < s.H; ++y) {
    for (int64_t xx = 0; xx < s.W; ++xx) {
      E* p = x + s.at(b, y, xx) + c0;
      int64_t v = 0;
#if defined(CPU_CAPABILITY_AVX512)
      if (reinterpret_cast<uintptr_t>(p) % 64 == 0) {
        if constexpr (std::is_same_v<E, float>) {
          for (; (v + 1) * kV <= nc; ++v) _mm512_stream_ps(p + v * kV, __m512(t.get(y, xx, v)));
        } else {
          for (; (v + 2) * kV <= nc; v += 2)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(p + v * kV),
                                at::vec::cvtfp32_bf16(__m512(t.get(y, xx, v)), __m512(t.get(y, xx, v + 1))));
        }
      }
#endif
      for (; v * kV < nc; ++v) store(t.get(y, xx, v), p + v * kV, std::min(kV, nc - v * kV));
    }
  }
}

// A per-channel float32 vector padded with zeros to whole units.
std::vector<float> padded(const at::Tensor& t, const Shape& s) {
  std::vector<float> out(s.padded_channels(), 0.f);
  std::copy_n(t.const_data_ptr<float>(), s.C, out.begin());
  return out;
}

// A [C, 1, 3, 3] weight as taps of padded channels, [9, Cp]; flipped (tap t <- 8 - t) for the conv's input
// gradient.
std::vector<float> taps_of(const at::Tensor& w, const Shape& s, bool flip) {
  const int64_t Cp = s.padded_channels();
  std::vector<float> out(kTaps * Cp, 0.f);
  const float* pw = w.const_data_ptr<float>();
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t t = 0; t < kTaps; ++t) out[(flip ? kTaps - 1 - t : t) * Cp + c] = pw[c * kTaps + t];
  return out;
}

Shape check_images(const char* op, std::initializer_list<std::pair<const at::Tensor*, const char*>> images) {
  const auto [first, first_name] = *images.begin();
  for (auto [t, name] : images) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->is_contiguous() && t->sizes() == first->sizes() &&
                    t->scalar_type() == first->scalar_type(),
                op, ": ", name, " must be a contiguous [B, H, W, C] CPU tensor like ", first_name, " (",
                first->sizes(), " ", first->scalar_type(), "), got ", t->sizes(), " ", t->scalar_type(),
                " strides ", t->strides());
  }
  TORCH_CHECK(first->numel() > 0, op, ": the images are empty: ", first->sizes());
  return Shape{first->size(0), first->size(1), first->size(2), first->size(3)};
}

// (c1, act, mean and biased variance of act per channel) for c1 = conv1(h) = depthwise(h, w1) + b1 and
// act = GELU(c1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fan_dw_forward_stats(const at::Tensor& h,
                                                                                const at::Tensor& w1,
                                                                                const at::Tensor& b1) {
  const char* op = "fan_dw_forward_stats";
  const Shape s = check_images(op, {{&h, "h"}});
  check_float(op, w1, "w1", {s.C, 1, 3, 3});
  check_float(op, b1, "b1", {s.C});
  const int64_t Cp = s.padded_channels(), HW = s.H * s.W;
  const auto taps = taps_of(w1, s, false), bias = padded(b1, s);
  std::vector<float> part(s.B * 2 * Cp, 0.f);  // per image: the unit's mean and sum of squared deviations
  auto c1 = at::empty_like(h), act = at::empty_like(h);
  dispatch(h, op, [&](auto tag) {
    using E = decltype(tag);
    const E* ph = h.const_data_ptr<E>();
    E *pc = c1.data_ptr<E>(), *pa = act.data_ptr<E>();
    for_units<3>(s, {{ph, sizeof(E)}}, [&](const Unit& u) {
      const auto [b, c0, nc] = std::tuple{u.b, u.c0, u.nc};
      Tile &in = u.tiles[0], &out = u.tiles[1], &z = u.tiles[2];  // z: GELU(c1), kept for the sum of squares
      fill(in, ph, s, b, c0, nc);
      for (int64_t v = 0; v < vectors(nc); ++v) {
        const Taps w(taps, Cp, c0, v);
        const Vec b1v = Vec::loadu(bias.data() + c0 + v * kV);
        Vec sum(0.f);
        for_pixel_runs(s, u.next, [&](int64_t y, int64_t x0, auto N) {
          Vec a[N()];
          conv_run<N()>(in, y, x0, v, w, b1v, a);
          for (int k = 0; k < N(); ++k) {
            a[k] = round_to<E>(a[k]);
            out.put(y, x0 + k, v, a[k]);
            a[k] = round_to<E>(gelu(a[k]));
            z.put(y, x0 + k, v, a[k]);
            sum += a[k];
          }
        });
        const Vec mean = sum / Vec(static_cast<float>(HW));
        Vec m2(0.f);
        for (int64_t y = 0; y < s.H; ++y) {
          for (int64_t x = 0; x < s.W; ++x) {
            const Vec d = z.get(y, x, v) - mean;
            m2 = at::vec::fmadd(d, d, m2);
          }
        }
        mean.store(part.data() + b * 2 * Cp + c0 + v * kV);
        m2.store(part.data() + (b * 2 + 1) * Cp + c0 + v * kV);
      }
      flush(out, pc, s, b, c0, nc);
      flush(z, pa, s, b, c0, nc);
    });
    return 0;
  }, "h");
  // Chan et al.'s pairwise update, images in order, in double
  std::vector<double> mean(s.C), var(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    double n = 0.0, m = 0.0, m2 = 0.0;
    for (int64_t b = 0; b < s.B; ++b) {
      const double mb = part[b * 2 * Cp + c], m2b = part[(b * 2 + 1) * Cp + c], total = n + HW;
      const double delta = mb - m;
      m += delta * HW / total;
      m2 += m2b + delta * delta * n * HW / total;
      n = total;
    }
    mean[c] = m;
    var[c] = m2 / n;
  }
  return {c1, act, channel_vector(mean), channel_vector(var)};
}

// s = conv2(act * scale + shift) [+ h]: BN with its statistics folded into scale and shift, conv2 =
// depthwise(., w2) + b2, the residual h when given.
at::Tensor fan_dw_forward_apply(const at::Tensor& act, const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor& w2, const at::Tensor& b2, const std::optional<at::Tensor>& h) {
  const char* op = "fan_dw_forward_apply";
  const Shape s = h ? check_images(op, {{&act, "act"}, {&*h, "h"}}) : check_images(op, {{&act, "act"}});
  check_float(op, w2, "w2", {s.C, 1, 3, 3});
  for (auto [t, name] : {std::pair{&scale, "scale"}, {&shift, "shift"}, {&b2, "b2"}})
    check_float(op, *t, name, {s.C});
  const int64_t Cp = s.padded_channels();
  const auto taps = taps_of(w2, s, false), bias = padded(b2, s), sc = padded(scale, s), sh = padded(shift, s);
  auto out = at::empty_like(act);
  dispatch(act, op, [&](auto tag) {
    using E = decltype(tag);
    const E* pa = act.const_data_ptr<E>();
    const E* ph = h ? h->const_data_ptr<E>() : nullptr;
    E* po = out.data_ptr<E>();
    for_units<3>(s, {{pa, sizeof(E)}, {ph, ph ? sizeof(E) : 0}}, [&](const Unit& u) {
      const auto [b, c0, nc] = std::tuple{u.b, u.c0, u.nc};
      Tile &bn = u.tiles[0], &res = u.tiles[1], &out = u.tiles[2];
      fill(bn, pa, s, b, c0, nc);
      if (ph) fill(res, ph, s, b, c0, nc);
      for (int64_t v = 0; v < vectors(nc); ++v) {
        const Vec scv = Vec::loadu(sc.data() + c0 + v * kV), shv = Vec::loadu(sh.data() + c0 + v * kV);
        for (int64_t y = 0; y < s.H; ++y)
          for (int64_t x = 0; x < s.W; ++x)
            bn.put(y, x, v, round_to<E>(at::vec::fmadd(bn.get(y, x, v), scv, shv)));
      }
      for (int64_t v = 0; v < vectors(nc); ++v) {
        const Taps w(taps, Cp, c0, v);
        const Vec b2v = Vec::loadu(bias.data() + c0 + v * kV);
        for_pixel_runs(s, u.next, [&](int64_t y, int64_t x0, auto N) {
          Vec a[N()];
          conv_run<N()>(bn, y, x0, v, w, b2v, a);
          for (int k = 0; k < N(); ++k) {
            a[k] = round_to<E>(a[k]);
            if (ph) a[k] = round_to<E>(a[k] + res.get(y, x0 + k, v));
            out.put(y, x0 + k, v, a[k]);
          }
        });
      }
      flush(out, po, s, b, c0, nc);
    });
    return 0;
  }, "act");
  return out;
}

// Gradients of the block given grad = dL/ds: dL/dh is written over grad; returns (grad w1, grad b1, grad BN
// weight, grad BN bias, grad w2, grad b2, the column sums of dL/dh). c1, act: from fan_dw_forward_stats;
// mean, invstd: act's batch statistics; weight: BN's; scale, shift: as given to fan_dw_forward_apply.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fan_dw_backward_(
    const at::Tensor& grad, const at::Tensor& c1, const at::Tensor& act, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& w1, const at::Tensor& w2, bool residual) {
  const char* op = "fan_dw_backward_";
  const Shape s = check_images(op, {{&grad, "grad"}, {&c1, "c1"}, {&act, "act"}, {&h, "h"}});
  TORCH_CHECK(at::get_overlap_status(grad, c1) == at::MemOverlapStatus::No &&
                  at::get_overlap_status(grad, act) == at::MemOverlapStatus::No &&
                  at::get_overlap_status(grad, h) == at::MemOverlapStatus::No,
              op, ": grad (overwritten with dL/dh) must not share memory with c1, act or h");
  check_float(op, w1, "w1", {s.C, 1, 3, 3});
  check_float(op, w2, "w2", {s.C, 1, 3, 3});
  for (auto [t, name] : {std::pair{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&scale, "scale"},
                         {&shift, "shift"}})
    check_float(op, *t, name, {s.C});
  const int64_t Cp = s.padded_channels(), M = s.B * s.H * s.W;
  const auto w1f = taps_of(w1, s, true), w2f = taps_of(w2, s, true), sc = padded(scale, s),
             sh = padded(shift, s), mu = padded(mean, s);
  // Pass 1, per unit: gy = dL/dBN-output, conv2's input gradient (rounded as stored), with the sums of gy and
  // of gy * (act - mean) for BN; conv2's weight and bias gradients from the recomputed BN output.
  const int64_t rows1 = kTaps + 3;  // taps, bias, sum gy, sum gy * (x' - mean)
  std::vector<float> part1(s.B * rows1 * Cp, 0.f);
  dispatch(grad, op, [&](auto tag) {
    using E = decltype(tag);
    const E *pg = grad.const_data_ptr<E>(), *pa = act.const_data_ptr<E>();
    for_units<2>(s, {{pg, sizeof(E)}, {pa, sizeof(E)}}, [&](const Unit& u) {
      const auto [b, c0, nc] = std::tuple{u.b, u.c0, u.nc};
      Tile &g = u.tiles[0], &bn = u.tiles[1];
      fill(g, pg, s, b, c0, nc);
      fill(bn, pa, s, b, c0, nc);
      float* out = part1.data() + b * rows1 * Cp + c0;
      for (int64_t v = 0; v < vectors(nc); ++v) {
        const Taps w(w2f, Cp, c0, v);
        const Vec scv = Vec::loadu(sc.data() + c0 + v * kV), shv = Vec::loadu(sh.data() + c0 + v * kV);
        const Vec muv = Vec::loadu(mu.data() + c0 + v * kV);
        Vec sum_g(0.f), sum_gx(0.f);
        for_pixel_runs(s, u.next, [&](int64_t y, int64_t x0, auto N) {
          Vec gy[N()];
          conv_run<N()>(g, y, x0, v, w, Vec(0.f), gy);
          for (int k = 0; k < N(); ++k) {
            gy[k] = round_to<E>(gy[k]);
            const Vec z = bn.get(y, x0 + k, v);
            sum_g += gy[k];
            sum_gx = at::vec::fmadd(gy[k], z - muv, sum_gx);
            bn.put(y, x0 + k, v, round_to<E>(at::vec::fmadd(z, scv, shv)));
          }
        });
        weight_sums(g, bn, s, v, out, Cp);
        sum_g.store(out + (kTaps + 1) * Cp + v * kV);
        sum_gx.store(out + (kTaps + 2) * Cp + v * kV);
      }
    });
    return 0;
  }, "grad");
  const auto sums1 = sum_in_image_order(part1, s.B, rows1 * Cp);
  // dL/dx' = a * gy + b * (x' - mean) + d with a = invstd * w, b = -a * sum_gyx * invstd^2 / M,
  // d = -a * sum_gy / M (as bn_gelu.cpp's backward); dL/dc1 = dL/dx' * GELU'(c1)
  std::vector<float> ca(Cp, 0.f), cb(Cp, 0.f), cd(Cp, 0.f);
  std::vector<double> grad_weight(s.C), grad_bias(s.C);
  const float *pi = invstd.const_data_ptr<float>(), *pw = weight.const_data_ptr<float>();
  for (int64_t c = 0; c < s.C; ++c) {
    const double is = pi[c], a = is * pw[c];
    const double sg = sums1[(kTaps + 1) * Cp + c], sgx = sums1[(kTaps + 2) * Cp + c];
    ca[c] = static_cast<float>(a);
    cb[c] = static_cast<float>(-a * sgx * is * is / M);
    cd[c] = static_cast<float>(-a * sg / M);
    grad_weight[c] = sgx * is;
    grad_bias[c] = sg;
  }
  // Pass 2, per unit: dL/dc1 into a tile, then conv1's input gradient (+ the residual's) over grad, its
  // column sums, and conv1's weight and bias gradients.
  const int64_t rows2 = kTaps + 2;  // taps, bias, sum of dL/dh
  std::vector<float> part2(s.B * rows2 * Cp, 0.f);
  dispatch(grad, op, [&](auto tag) {
    using E = decltype(tag);
    const E *pc = c1.const_data_ptr<E>(), *ph = h.const_data_ptr<E>();
    E* pg = grad.data_ptr<E>();
    for_units<3>(s, {{pg, sizeof(E)}, {ph, sizeof(E)}, {pc, sizeof(E)}}, [&](const Unit& u) {
      const auto [b, c0, nc] = std::tuple{u.b, u.c0, u.nc};
      Tile &g = u.tiles[0], &in = u.tiles[1], &gc = u.tiles[2];
      fill(g, pg, s, b, c0, nc);
      fill(in, ph, s, b, c0, nc);
      fill(gc, pc, s, b, c0, nc);
      float* out = part2.data() + b * rows2 * Cp + c0;
      for (int64_t v = 0; v < vectors(nc); ++v) {
        const int64_t n = lanes(nc, v), c = c0 + v * kV;
        const Taps wg2(w2f, Cp, c0, v);
        const Vec a = Vec::loadu(ca.data() + c), bb = Vec::loadu(cb.data() + c), d = Vec::loadu(cd.data() + c);
        const Vec muv = Vec::loadu(mu.data() + c);
        for_pixel_runs(s, u.next, [&](int64_t y, int64_t x0, auto N) {
          Vec gy[N()];
          conv_run<N()>(g, y, x0, v, wg2, Vec(0.f), gy);
          for (int k = 0; k < N(); ++k) {
            Vec z, slope;
            gelu_and_grad(gc.get(y, x0 + k, v), z, slope);
            z = round_to<E>(z);  // act's value
            const Vec rest = at::vec::fmadd(z - muv, bb, d);
            gc.put(y, x0 + k, v, round_to<E>(at::vec::fmadd(round_to<E>(gy[k]), a, rest) * slope));
          }
        });
        const Taps wg1(w1f, Cp, c0, v);
        Vec sum_h(0.f);
        for_pixel_runs(s, u.next, [&](int64_t y, int64_t x0, auto N) {
          Vec gh[N()];
          conv_run<N()>(gc, y, x0, v, wg1, Vec(0.f), gh);
          for (int k = 0; k < N(); ++k) {
            gh[k] = round_to<E>(gh[k]);
            if (residual) gh[k] = round_to<E>(gh[k] + g.get(y, x0 + k, v));
            sum_h += gh[k];
            store(gh[k], pg + s.at(b, y, x0 + k) + c, n);
          }
        });
        weight_sums(gc, in, s, v, out, Cp);
        sum_h.store(out + (kTaps + 1) * Cp + v * kV);
      }
    });
    return 0;
  }, "grad");
  const auto sums2 = sum_in_image_order(part2, s.B, rows2 * Cp);
  return {depthwise_weight(sums2, Cp, s.C, 3, 3), sums_row(sums2, Cp, kTaps, s.C), channel_vector(grad_weight),
          channel_vector(grad_bias),              depthwise_weight(sums1, Cp, s.C, 3, 3),
          sums_row(sums1, Cp, kTaps, s.C),        sums_row(sums2, Cp, kTaps + 1, s.C)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stl_cpu, m) {
  m.def("fan_dw_forward_stats(Tensor h, Tensor w1, Tensor b1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fan_dw_forward_apply(Tensor act, Tensor scale, Tensor shift, Tensor w2, Tensor b2, Tensor? h) -> Tensor");
  m.def(
      "fan_dw_backward_(Tensor(a!) grad, Tensor c1, Tensor act, Tensor h, Tensor mean, Tensor invstd, "
      "Tensor weight, Tensor scale, Tensor shift, Tensor w1, Tensor w2, bool residual) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stl_cpu, CPU, m) {
  m.impl("fan_dw_forward_stats", fan_dw_forward_stats);
  m.impl("fan_dw_forward_apply", fan_dw_forward_apply);
  m.impl("fan_dw_backward_", fan_dw_backward_);
}
