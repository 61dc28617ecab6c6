// One DNC memory-access step, forward and backward, per batch element over raw pointers; and a
// whole DNC step (the LSTM controller's recurrent part and the interface vector, then the access
// step; see "the controller's recurrent part" below), which DNCCore.forward runs on the CPU.
//
// Graves et al. 2016, "Hybrid computing using a neural network with dynamic external memory",
// Nature 538, Methods ("Memory addressing"): usage and retention, allocation, write weighting,
// erase and write, temporal link and precedence, directional and content read weightings, read.
// The equations, their order and the EPSILON handling are those of
// memagents/cores/dnc_access.py (DNCAccessStep, the torch reference) and addressing.py; that
// file is the specification and the tests compare both in float64. Where the paper leaves details
// open they follow DeepMind's release (deepmind/dnc): the cosine's denominator |k||M| + EPSILON,
// free slots ranked by 1 - u' descending with ties to the lowest slot, sequential allocation over
// write heads, and (DNCSequence) optionally no usage gradient to the previous write weights.
//
// Shapes (per batch element; B elements, each input with its own batch stride, inner dimensions
// contiguous): N slots, W word size, R read heads, H write heads, K = 1 + 2H read modes.
//
//   inputs  (16): memory0 [N,W], usage0 [N], link0 [H,N,N], prec0 [H,N], read0 [R,N],
//                 write0 [H,N], read_keys [R,W], read_strengths [R], write_keys [H,W],
//                 write_strengths [H], write_vectors [H,W], erase [H,W], free_gates [R],
//                 alloc_gates [H], write_gates [H], read_modes [R,K]
//   raw           (optional) the interface vector ξ before its activations [X], laid out as
//                 read keys R*W | write keys H*W | write vectors H*W | read strengths R |
//                 write strengths H | erase H*W | free gates R | alloc gates H | write gates H |
//                 read modes R*K (DNCCore's layout); when given, inputs 6..15 are ignored and
//                 the kernel applies oneplus, sigmoid and softmax itself (Methods, "Interface
//                 parameters"), and the backward returns the gradient of ξ instead of theirs.
//   outputs  (8): memory [N,W], usage [N], link [H,N,N], precedence [H,N], read [R,N],
//                 write [H,N], read_vectors [R,W], allocation [H,N]   (contiguous; the
//                 backward reads memory, read, write and allocation only)
//   grads    (7): of the first seven outputs; a null pointer means zero
//   results (16): gradients of the inputs (contiguous); a null g_link0 or g_write0 is not
//                 computed
//   g_raw        [X] gradient of ξ (raw mode only)
//
// The forward writes a workspace (Work below) and the allocation sort order, which the backward
// reads instead of recomputing softmaxes, norms and sorts. Inside, memory is kept transposed
// ([W, N]) so that every reduction over slots is a vectorised loop. The link pass is the only
// N x N work: the forward reads L_{t-1} once and writes L_t once (computing f and b from each
// fresh row while it is in cache); the backward reads dL_t and L_{t-1} once (rebuilding each row
// of L_t, cheaper than reading it) and writes dL_{t-1} once, one row at a time.
//
// Denormals are flushed to zero while a kernel runs (the allocation's cumulative products reach
// them within a few dozen slots, where each operation would cost ~100 cycles): results differ
// from torch's only below the smallest normal number (1e-38 in float, 1e-308 in double).
//
// native.py builds with -march=native where the compiler allows it; the explicit vectors below
// are then 32 bytes wide (AVX) or 16 (SSE2) otherwise.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#ifdef __AVX__
#define DNC_VEC_BYTES 32
#else
#define DNC_VEC_BYTES 16
#endif

namespace {

constexpr double kEpsilon = 1e-6;      // addressing.EPSILON
constexpr double kSoftplusLimit = 20;  // torch.nn.functional.softplus's threshold

struct Dims {
  long B, N, W, R, H;
};

// Flush-to-zero and denormals-are-zero for the lifetime of the object (restored after).
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// -- SIMD helpers: GCC vector extensions, DNC_VEC_BYTES wide -------------------------------------
// Reductions add in a fixed order (lanes, then the lane sums in index order): deterministic, and
// different from torch's order by rounding only.
template <class T>
struct Simd {
  typedef T vec __attribute__((vector_size(DNC_VEC_BYTES)));
  static constexpr long L = DNC_VEC_BYTES / sizeof(T);  // lanes
  static inline vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static inline void store(T* p, vec v) { std::memcpy(p, &v, sizeof v); }
  static inline vec splat(T x) { return vec{} + x; }
  static inline T total(vec v) {
    T s = v[0];
    for (long k = 1; k < L; ++k) s += v[k];
    return s;
  }
};

// -- vectorised exp, expm1, sigmoid, tanh ---------------------------------------------------------
// exp(x) = 2^k e^r with k = round(x / ln 2), r = x - k ln 2 (ln 2 in two parts, Cody & Waite 1980)
// and e^r - 1 from its Taylor series on |r| <= ln(2)/2 (degree 7 in float, 13 in double: the
// truncation error is below one ulp), 2^k assembled in the exponent bits. Inputs are clamped to
// the range where 2^k is a normal number (results below ~1e-38 / 1e-308 come out slightly
// larger than exact, never NaN). Their one-ulp-level differences from libm are far below the
// tests' tolerances.
template <class T>
struct VecMath;

template <>
struct VecMath<float> {
  using S = Simd<float>;
  using V = S::vec;
  typedef int32_t IV __attribute__((vector_size(DNC_VEC_BYTES)));
  static constexpr float lo = -87.0f, hi = 88.0f;
  static inline V expm1_reduced(V r) {  // e^r - 1 on |r| <= ln(2)/2
    V p = S::splat(1.0f / 5040);
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    return (p * r + 1.0f) * r;
  }
  static inline void reduce(V x, V& k, V& r) {
    const V shifter = S::splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    k = (x * 1.44269504088896341f + shifter) - shifter;
    r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  }
  static inline V pow2(V k) {  // 2^k for integral k in the normal range
    const IV bits = (__builtin_convertvector(k, IV) + 127) << 23;
    V out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
};

template <>
struct VecMath<double> {
  using S = Simd<double>;
  using V = S::vec;
  typedef int64_t IV __attribute__((vector_size(DNC_VEC_BYTES)));
  static constexpr double lo = -708.0, hi = 709.0;
  static inline V expm1_reduced(V r) {
    V p = S::splat(1.0 / 6227020800.0);  // 1/13!
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    return (p * r + 1.0) * r;
  }
  static inline void reduce(V x, V& k, V& r) {
    const V shifter = S::splat(6755399441055744.0);  // 1.5 * 2^52
    k = (x * 1.44269504088896338700 + shifter) - shifter;
    r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  }
  static inline V pow2(V k) {
    const IV bits = (__builtin_convertvector(k, IV) + 1023) << 52;
    V out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
};

template <class T>
inline typename Simd<T>::vec vclamp(typename Simd<T>::vec x, T lo, T hi) {
  x = x < lo ? Simd<T>::splat(lo) : x;
  return x > hi ? Simd<T>::splat(hi) : x;
}

template <class T>
inline typename Simd<T>::vec vexp(typename Simd<T>::vec x) {
  using M = VecMath<T>;
  typename Simd<T>::vec k, r;
  M::reduce(vclamp<T>(x, M::lo, M::hi), k, r);
  return M::pow2(k) * (M::expm1_reduced(r) + T(1));
}

template <class T>
inline typename Simd<T>::vec vexpm1(typename Simd<T>::vec x) {  // e^x - 1, relative near 0
  using M = VecMath<T>;
  typename Simd<T>::vec k, r;
  M::reduce(vclamp<T>(x, M::lo, M::hi), k, r);
  const typename Simd<T>::vec scale = M::pow2(k);
  return scale * M::expm1_reduced(r) + (scale - T(1));
}

template <class T>
inline typename Simd<T>::vec vsigmoid(typename Simd<T>::vec x) {  // 1 / (1 + e^-x), as torch
  return T(1) / (T(1) + vexp<T>(-x));
}

// tanh(x) = sign(x) t / (2 - t) with t = -expm1(-2|x|): no cancellation near 0.
template <class T>
inline typename Simd<T>::vec vtanh(typename Simd<T>::vec x) {
  using V = typename Simd<T>::vec;
  const V a = x < T(0) ? -x : x;
  const V t = -vexpm1<T>(T(-2) * a);
  const V y = t / (T(2) - t);
  return x < T(0) ? -y : y;
}

// y[j] = f(x[j]) for j < n (y may be x); the last partial vector goes through a padded copy,
// so every element gets the same vector arithmetic.
template <class T, class F>
inline void vmap(T* y, const T* x, long n, F f) {
  using S = Simd<T>;
  long j = 0;
  for (; j + S::L <= n; j += S::L) S::store(y + j, f(S::load(x + j)));
  if (j < n) {
    T buf[S::L] = {};
    std::copy(x + j, x + n, buf);
    S::store(buf, f(S::load(buf)));
    std::copy(buf, buf + (n - j), y + j);
  }
}

// A vector that is zero in lane i - j (if 0 <= i - j < L) and v elsewhere: the diagonal of a
// link row, without taking the vector through memory.
template <class T>
inline typename Simd<T>::vec zero_lane(typename Simd<T>::vec v, long i, long j) {
  using S = Simd<T>;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I IV __attribute__((vector_size(DNC_VEC_BYTES)));
  IV lane;
  for (long k = 0; k < S::L; ++k) lane[k] = I(k);
  return lane == I(i - j) ? typename S::vec{} : v;
}

// sum_j a[j] b[j]
template <class T>
inline T dot(const T* a, const T* b, long n) {
  using S = Simd<T>;
  constexpr long L = S::L;
  typename S::vec acc0{}, acc1{}, acc2{}, acc3{};
  long j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {  // four chains hide the latency of the adds
    acc0 += S::load(a + j) * S::load(b + j);
    acc1 += S::load(a + j + L) * S::load(b + j + L);
    acc2 += S::load(a + j + 2 * L) * S::load(b + j + 2 * L);
    acc3 += S::load(a + j + 3 * L) * S::load(b + j + 3 * L);
  }
  for (; j + L <= n; j += L) acc0 += S::load(a + j) * S::load(b + j);
  T s = S::total((acc0 + acc1) + (acc2 + acc3));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// sum_j a[j]
template <class T>
inline T sum(const T* a, long n) {
  using S = Simd<T>;
  typename S::vec acc{};
  long j = 0;
  for (; j + S::L <= n; j += S::L) acc += S::load(a + j);
  T s = S::total(acc);
  for (; j < n; ++j) s += a[j];
  return s;
}

// y += a x
template <class T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, long n) {
  for (long j = 0; j < n; ++j) y[j] += a * x[j];
}

#if DNC_VEC_BYTES == 32
// The 8 x 8 float block at in (row stride is) transposed to out (row stride os), in registers:
// three rounds of two-source shuffles (pairs of rows, pairs of pairs, halves).
inline void transpose8x8(const float* in, long is, float* out, long os) {
  using V = Simd<float>::vec;
  typedef int32_t I __attribute__((vector_size(32)));
  V r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = Simd<float>::load(in + k * is);
  const I lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
  const I lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const I lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], lo1);
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], hi1);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shuffle(t[k], t[k + 2], lo2);
    u[k + 1] = __builtin_shuffle(t[k], t[k + 2], hi2);
    u[k + 2] = __builtin_shuffle(t[k + 1], t[k + 3], lo2);
    u[k + 3] = __builtin_shuffle(t[k + 1], t[k + 3], hi2);
  }
  for (int k = 0; k < 4; ++k) {  // u[k] holds columns k and k + 4 of rows 0-3, u[k + 4] of 4-7
    Simd<float>::store(out + k * os, __builtin_shuffle(u[k], u[k + 4], lo3));
    Simd<float>::store(out + (k + 4) * os, __builtin_shuffle(u[k], u[k + 4], hi3));
  }
}
#endif

// out [cols, rows] = in [rows, cols] transposed (float with AVX: 8 x 8 blocks in registers;
// otherwise eight source rows at a time, so the writes stay contiguous).
template <class T>
inline void transpose(const T* __restrict in, long rows, long cols, T* __restrict out) {
  long r0 = 0;
#if DNC_VEC_BYTES == 32
  if constexpr (std::is_same_v<T, float>) {
    for (; r0 + 8 <= rows; r0 += 8) {
      long c0 = 0;
      for (; c0 + 8 <= cols; c0 += 8)
        transpose8x8(in + r0 * cols + c0, cols, out + c0 * rows + r0, rows);
      for (; c0 < cols; ++c0)
        for (long k = 0; k < 8; ++k) out[c0 * rows + r0 + k] = in[(r0 + k) * cols + c0];
    }
  }
#endif
  for (; r0 + 8 <= rows; r0 += 8)
    for (long c = 0; c < cols; ++c)
      for (long k = 0; k < 8; ++k) out[c * rows + r0 + k] = in[(r0 + k) * cols + c];
  for (; r0 < rows; ++r0)
    for (long c = 0; c < cols; ++c) out[c * rows + r0] = in[r0 * cols + c];
}

// For C rows a[c] (C <= 4): dots[c] = sum_j x[j] a[c][j] and y[c][j] += coef[c] x[j], one pass
// over x. The forward's f and b from a link row, the backward's read-weight gradients.
template <class T, int C>
inline void dots_axpys(const T* x, long n, const T* const* a, T* const* y, const T* coef,
                       T* dots) {
  using S = Simd<T>;
  constexpr long L = S::L;
  typename S::vec acc[C] = {}, k[C];
  for (int c = 0; c < C; ++c) k[c] = S::splat(coef[c]);
  long j = 0;
  for (; j + L <= n; j += L) {
    const typename S::vec xv = S::load(x + j);
    for (int c = 0; c < C; ++c) {
      acc[c] += xv * S::load(a[c] + j);
      S::store(y[c] + j, S::load(y[c] + j) + k[c] * xv);
    }
  }
  for (int c = 0; c < C; ++c) {
    T s = S::total(acc[c]);
    for (long i = j; i < n; ++i) {
      s += x[i] * a[c][i];
      y[c][i] += coef[c] * x[i];
    }
    dots[c] = s;
  }
}

// dots_axpys over R rows a = a0 + r * n, y = y0 + r * n, in chunks of at most four.
template <class T>
void dots_axpys_rows(const T* x, long n, long R, const T* a0, T* y0, const T* coef, T* dots) {
  for (long r = 0; r < R; r += 4) {
    const T* a[4];
    T* y[4];
    const long C = std::min<long>(4, R - r);
    for (long c = 0; c < C; ++c) a[c] = a0 + (r + c) * n, y[c] = y0 + (r + c) * n;
    switch (C) {
      case 4: dots_axpys<T, 4>(x, n, a, y, coef + r, dots + r); break;
      case 3: dots_axpys<T, 3>(x, n, a, y, coef + r, dots + r); break;
      case 2: dots_axpys<T, 2>(x, n, a, y, coef + r, dots + r); break;
      default: dots_axpys<T, 1>(x, n, a, y, coef + r, dots + r); break;
    }
  }
}

// row[j] = base[j] + sum_c (c1[c] x1[c][j] + c2[c] x2[c][j]) for C <= 4 (base may be row).
template <class T, int C>
inline void rank_update(T* row, const T* base, long n, const T* const* x1, const T* c1,
                        const T* const* x2, const T* c2) {
  using S = Simd<T>;
  constexpr long L = S::L;
  typename S::vec k1[C], k2[C];
  for (int c = 0; c < C; ++c) k1[c] = S::splat(c1[c]), k2[c] = S::splat(c2[c]);
  long j = 0;
  for (; j + L <= n; j += L) {
    typename S::vec v = S::load(base + j);
    for (int c = 0; c < C; ++c) v += k1[c] * S::load(x1[c] + j) + k2[c] * S::load(x2[c] + j);
    S::store(row + j, v);
  }
  for (; j < n; ++j) {
    T v = base[j];
    for (int c = 0; c < C; ++c) v += c1[c] * x1[c][j] + c2[c] * x2[c][j];
    row[j] = v;
  }
}

// row = base + sum_r (c1[r] x1[r] + c2[r] x2[r]) over R rows x1 = x10 + r * n, x2 = x20 + r * n;
// a null base is zero.
template <class T>
void rank_update_rows(T* row, const T* base, long n, long R, const T* x10, const T* c1,
                      const T* x20, const T* c2) {
  if (base == nullptr) {
    std::fill(row, row + n, T(0));
    base = row;
  }
  for (long r = 0; r < R; r += 4) {
    const T* x1[4];
    const T* x2[4];
    const long C = std::min<long>(4, R - r);
    for (long c = 0; c < C; ++c) x1[c] = x10 + (r + c) * n, x2[c] = x20 + (r + c) * n;
    switch (C) {
      case 4: rank_update<T, 4>(row, base, n, x1, c1 + r, x2, c2 + r); break;
      case 3: rank_update<T, 3>(row, base, n, x1, c1 + r, x2, c2 + r); break;
      case 2: rank_update<T, 2>(row, base, n, x1, c1 + r, x2, c2 + r); break;
      default: rank_update<T, 1>(row, base, n, x1, c1 + r, x2, c2 + r); break;
    }
    base = row;
  }
}

// Row i of the link update: out[j] = (1 - w[i] - w[j]) l0[j] + w[i] p0[j], out[i] = 0
// (DNC Methods, "Temporal memory linkage"; as addressing._link_step_forward).
template <class T>
inline void link_row(T* out, const T* l0, const T* w, const T* p0, long i, long n) {
  using S = Simd<T>;
  const T wi = w[i], keep = T(1) - wi;
  const typename S::vec vk = S::splat(keep), vw = S::splat(wi);
  long j = 0;
  for (; j + S::L <= n; j += S::L)
    S::store(out + j, (vk - S::load(w + j)) * S::load(l0 + j) + vw * S::load(p0 + j));
  for (; j < n; ++j) out[j] = (keep - w[j]) * l0[j] + wi * p0[j];
  out[i] = 0;
}

// Backward of row i of the link update given G = g (that row of the total gradient of L_t):
// gp0[j] += G[j] w[i], gcol[j] += G[j] l0[j], gl0[j] = G[j] (1 - w[i] - w[j]) (if gl0), and
// returns sum_j G[j] (p0[j] - l0[j]) (the row part of d/dw[i]).
template <class T>
inline T link_row_backward(const T* g, const T* l0, const T* w, const T* p0, long i, long n,
                           T* gp0, T* gcol, T* gl0) {
  using S = Simd<T>;
  constexpr long L = S::L;
  const T wi = w[i], keep = T(1) - wi;
  const typename S::vec vk = S::splat(keep), vw = S::splat(wi);
  typename S::vec acc0{}, acc1{};
  long j = 0;
  if (gl0) {
    for (; j + L <= n; j += L) {
      const typename S::vec gv = S::load(g + j), l0v = S::load(l0 + j);
      S::store(gp0 + j, S::load(gp0 + j) + vw * gv);
      acc0 += gv * S::load(p0 + j);
      acc1 += gv * l0v;
      S::store(gcol + j, S::load(gcol + j) + gv * l0v);
      S::store(gl0 + j, gv * (vk - S::load(w + j)));
    }
  } else {
    for (; j + L <= n; j += L) {
      const typename S::vec gv = S::load(g + j), l0v = S::load(l0 + j);
      S::store(gp0 + j, S::load(gp0 + j) + vw * gv);
      acc0 += gv * S::load(p0 + j);
      acc1 += gv * l0v;
      S::store(gcol + j, S::load(gcol + j) + gv * l0v);
    }
  }
  T s = S::total(acc0) - S::total(acc1);
  for (; j < n; ++j) {
    gp0[j] += wi * g[j];
    s += g[j] * (p0[j] - l0[j]);
    gcol[j] += g[j] * l0[j];
    if (gl0) gl0[j] = g[j] * (keep - w[j]);
  }
  return s;
}

// Row i of the link update fused with the first C (<= 4) read heads' f and b:
// out[j] = (1 - w[i] - w[j]) l0[j] + w[i] p0[j] (0 at j = i), dots[c] = sum_j out[j] rd[c][j],
// y[c][j] += coef[c] out[j], in one pass (rd, y: rows of length n).
template <class T, int C>
inline void link_row_forward(T* out, const T* l0, const T* w, const T* p0, long i, long n,
                             const T* rd0, T* y0, const T* coef, T* dots) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr long L = S::L;
  const T wi = w[i], keep = T(1) - wi;
  const V vk = S::splat(keep), vw = S::splat(wi);
  V acc[C] = {}, k[C];
  const T* a[C];
  T* y[C];
  for (int c = 0; c < C; ++c) a[c] = rd0 + c * n, y[c] = y0 + c * n, k[c] = S::splat(coef[c]);
  long j = 0;
  for (; j + L <= n; j += L) {
    const V v = zero_lane<T>((vk - S::load(w + j)) * S::load(l0 + j) + vw * S::load(p0 + j), i, j);
    S::store(out + j, v);
    for (int c = 0; c < C; ++c) {
      acc[c] += v * S::load(a[c] + j);
      S::store(y[c] + j, S::load(y[c] + j) + k[c] * v);
    }
  }
  T sums[C];
  for (int c = 0; c < C; ++c) sums[c] = S::total(acc[c]);
  for (; j < n; ++j) {
    const T v = j == i ? T(0) : (keep - w[j]) * l0[j] + wi * p0[j];
    out[j] = v;
    for (int c = 0; c < C; ++c) {
      sums[c] += v * a[c][j];
      y[c][j] += coef[c] * v;
    }
  }
  for (int c = 0; c < C; ++c) dots[c] = sums[c];
}

// The backward of row i of the link step for C = R <= 4 read heads, in one pass:
// G[j] = dl[j] + sum_c (c1[c] rd[c][j] + c2[c] gb[c][j]) (0 at j = i; dl null: 0), then
// gp0[j] += w[i] G[j], gcol[j] += G[j] l0[j], gl0[j] = G[j] (1 - w[i] - w[j]) (if gl0), and with
// L[j] the rebuilt row of L_t: gr[c][j] += c1[c] L[j], dots[c] = sum_j gb[c][j] L[j]. Returns
// sum_j G[j] (p0[j] - l0[j]). (The multi-pass equivalent: rank_update_rows, link_row_backward,
// link_row, dots_axpys_rows.)
template <class T, int C, bool HasDL, bool HasGL0>
inline T link_row_backward_fused(const T* dl, const T* l0, const T* w, const T* p0, long i,
                                 long n, const T* rd0, const T* gb0, const T* c1, const T* c2,
                                 T* gp0, T* gcol, T* gl0, T* gr0, T* dots) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr long L = S::L;
  const T wi = w[i], keep = T(1) - wi;
  const V vk = S::splat(keep), vw = S::splat(wi);
  V k1[C], k2[C], dacc[C] = {}, acc0{}, acc1{};
  const T* rd[C];
  const T* gb[C];
  T* gr[C];
  for (int c = 0; c < C; ++c) {
    rd[c] = rd0 + c * n, gb[c] = gb0 + c * n, gr[c] = gr0 + c * n;
    k1[c] = S::splat(c1[c]), k2[c] = S::splat(c2[c]);
  }
  long j = 0;
  for (; j + L <= n; j += L) {
    V g = HasDL ? S::load(dl + j) : V{};
    for (int c = 0; c < C; ++c) g += k1[c] * S::load(rd[c] + j) + k2[c] * S::load(gb[c] + j);
    g = zero_lane<T>(g, i, j);
    const V wv = S::load(w + j), l0v = S::load(l0 + j), pv = S::load(p0 + j);
    const V l = zero_lane<T>((vk - wv) * l0v + vw * pv, i, j);
    S::store(gp0 + j, S::load(gp0 + j) + vw * g);
    acc0 += g * pv;
    acc1 += g * l0v;
    S::store(gcol + j, S::load(gcol + j) + g * l0v);
    if (HasGL0) S::store(gl0 + j, g * (vk - wv));
    for (int c = 0; c < C; ++c) {
      S::store(gr[c] + j, S::load(gr[c] + j) + k1[c] * l);
      dacc[c] += S::load(gb[c] + j) * l;
    }
  }
  T s = S::total(acc0) - S::total(acc1);
  T sums[C];
  for (int c = 0; c < C; ++c) sums[c] = S::total(dacc[c]);
  for (; j < n; ++j) {
    T g = HasDL ? dl[j] : T(0);
    for (int c = 0; c < C; ++c) g += c1[c] * rd[c][j] + c2[c] * gb[c][j];
    T l = (keep - w[j]) * l0[j] + wi * p0[j];
    if (j == i) g = 0, l = 0;
    gp0[j] += wi * g;
    s += g * (p0[j] - l0[j]);
    gcol[j] += g * l0[j];
    if (HasGL0) gl0[j] = g * (keep - w[j]);
    for (int c = 0; c < C; ++c) {
      gr[c][j] += c1[c] * l;
      sums[c] += gb[c][j] * l;
    }
  }
  for (int c = 0; c < C; ++c) dots[c] = sums[c];
  return s;
}

template <class T, int C>
inline T link_row_backward_c(const T* dl, const T* l0, const T* w, const T* p0, long i, long n,
                             const T* rd0, const T* gb0, const T* c1, const T* c2, T* gp0,
                             T* gcol, T* gl0, T* gr0, T* dots) {
  if (dl && gl0)
    return link_row_backward_fused<T, C, true, true>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0,
                                                     gcol, gl0, gr0, dots);
  if (dl)
    return link_row_backward_fused<T, C, true, false>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0,
                                                      gcol, gl0, gr0, dots);
  if (gl0)
    return link_row_backward_fused<T, C, false, true>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0,
                                                      gcol, gl0, gr0, dots);
  return link_row_backward_fused<T, C, false, false>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0,
                                                     gcol, gl0, gr0, dots);
}

// link_row_forward for C = 1..4 chosen at run time.
template <class T>
inline void link_row_forward_any(T* out, const T* l0, const T* w, const T* p0, long i, long n,
                                 long C, const T* rd0, T* y0, const T* coef, T* dots) {
  switch (C) {
    case 4: return link_row_forward<T, 4>(out, l0, w, p0, i, n, rd0, y0, coef, dots);
    case 3: return link_row_forward<T, 3>(out, l0, w, p0, i, n, rd0, y0, coef, dots);
    case 2: return link_row_forward<T, 2>(out, l0, w, p0, i, n, rd0, y0, coef, dots);
    default: return link_row_forward<T, 1>(out, l0, w, p0, i, n, rd0, y0, coef, dots);
  }
}

// link_row_backward_c for C = 1..4 chosen at run time.
template <class T>
inline T link_row_backward_any(const T* dl, const T* l0, const T* w, const T* p0, long i, long n,
                               long C, const T* rd0, const T* gb0, const T* c1, const T* c2,
                               T* gp0, T* gcol, T* gl0, T* gr0, T* dots) {
  switch (C) {
    case 4:
      return link_row_backward_c<T, 4>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0, gcol, gl0,
                                       gr0, dots);
    case 3:
      return link_row_backward_c<T, 3>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0, gcol, gl0,
                                       gr0, dots);
    case 2:
      return link_row_backward_c<T, 2>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0, gcol, gl0,
                                       gr0, dots);
    default:
      return link_row_backward_c<T, 1>(dl, l0, w, p0, i, n, rd0, gb0, c1, c2, gp0, gcol, gl0,
                                       gr0, dots);
  }
}

// out[k][n] = prod_{j != k} x[j][n] for K rows of length n (prefix times suffix, no division;
// as addressing.others_product). out must not alias x.
template <class T>
inline void others_product_rows(const T* x, long K, long n, T* out, T* pre) {
  std::fill(pre, pre + n, T(1));
  for (long k = 0; k < K; ++k) {
    T* o = out + k * n;
    const T* xk = x + k * n;
    for (long j = 0; j < n; ++j) {
      o[j] = pre[j];
      pre[j] *= xk[j];
    }
  }
  std::fill(pre, pre + n, T(1));
  for (long k = K - 1; k >= 0; --k) {
    T* o = out + k * n;
    const T* xk = x + k * n;
    for (long j = 0; j < n; ++j) {
      o[j] *= pre[j];
      pre[j] *= xk[j];
    }
  }
}

// -- layout of the interface vector and of the workspace ------------------------------------------
struct Layout {  // offsets into ξ (see the header); X = total
  long kr, kw, v, br, bw, erase, free, ga, gw, modes, X;
  explicit Layout(const Dims& d) {
    const long R = d.R, H = d.H, W = d.W;
    kr = 0, kw = kr + R * W, v = kw + H * W, br = v + H * W, bw = br + R, erase = bw + H;
    free = erase + H * W, ga = free + R, gw = ga + H, modes = gw + H, X = modes + R * (1 + 2 * H);
  }
};

// The intermediates the forward saves for the backward, per batch element.
template <class T>
struct Work {
  T *psi, *written, *u1;  // [N] retention ψ, combined previous write, usage before retention
  T *cw, *simw;           // [H, N] write content weights and cosine similarities (on M_{t-1})
  T *mnorm0, *knw;        // [N] |M_{t-1}[n]|, [H] |k^w|
  T *usages;              // [H, N] usage each write head allocates from
  T *sorted_u, *excl, *sorted_a;  // [H, N] sorted usage, exclusive cumprod, sorted allocation
  T* mix;                 // [H, N] g^a a + (1 - g^a) c^w
  T *wc, *simr;           // [R, N] read content weights and similarities (on M_t)
  T *mnorm1, *knr;        // [N] |M_t[n]|, [R] |k^r|
  T *fwd, *bwd;           // [H, R, N] forward f = L w^r and backward b = L^T w^r weightings
  T* act;                 // [X] the activated interface (raw mode)

  static long size(const Dims& d) {
    const long N = d.N, R = d.R, H = d.H;
    return 3 * N + 2 * H * N + N + H + H * N + 3 * H * N + H * N + 2 * R * N + N + R +
           2 * H * R * N + Layout(d).X;
  }

  Work(T* p, const Dims& d) {
    const long N = d.N, R = d.R, H = d.H;
    auto take = [&p](long n) {
      T* q = p;
      p += n;
      return q;
    };
    psi = take(N), written = take(N), u1 = take(N);
    cw = take(H * N), simw = take(H * N), mnorm0 = take(N), knw = take(H);
    usages = take(H * N), sorted_u = take(H * N), excl = take(H * N), sorted_a = take(H * N);
    mix = take(H * N);
    wc = take(R * N), simr = take(R * N), mnorm1 = take(N), knr = take(R);
    fwd = take(H * R * N), bwd = take(H * R * N);
    act = take(Layout(d).X);
  }
};

template <class T>
struct In {  // the 16 inputs of one batch element (the interface possibly in the workspace)
  const T *memory0, *usage0, *link0, *prec0, *read0, *write0, *kr, *br, *kw, *bw, *v, *erase,
      *free_gates, *ga, *gw, *modes;
  In(const void* const* p, const long* stride, long b, const T* act, const Layout& lay) {
    const T** f[16] = {&memory0, &usage0, &link0, &prec0, &read0,      &write0, &kr, &br,
                       &kw,      &bw,     &v,     &erase, &free_gates, &ga,     &gw, &modes};
    for (int i = 0; i < (act ? 6 : 16); ++i)
      *f[i] = static_cast<const T*>(p[i]) + b * stride[i];
    if (act) {
      kr = act + lay.kr, br = act + lay.br, kw = act + lay.kw, bw = act + lay.bw;
      v = act + lay.v, erase = act + lay.erase, free_gates = act + lay.free, ga = act + lay.ga;
      gw = act + lay.gw, modes = act + lay.modes;
    }
  }
};

// -- the interface activations (Methods, "Interface parameters") ----------------------------------
// keys and write vectors as they are; strengths oneplus(x) = 1 + softplus(x) (softplus as torch:
// x above 20 passes through); erase and gates sigmoid; read modes softmax over K per head.
template <class T>
void activate(const T* raw, const Layout& lay, long R, long K, T* act) {
  std::copy(raw, raw + lay.br, act);
  for (long j = lay.br; j < lay.erase; ++j)
    act[j] = T(1) + (raw[j] > T(kSoftplusLimit) ? raw[j] : std::log1p(std::exp(raw[j])));
  vmap(act + lay.erase, raw + lay.erase, lay.modes - lay.erase,
       [](typename Simd<T>::vec v) { return vsigmoid<T>(v); });
  for (long r = 0; r < R; ++r) {
    const T* x = raw + lay.modes + r * K;
    T* y = act + lay.modes + r * K;
    T top = x[0];
    for (long k = 1; k < K; ++k) top = std::max(top, x[k]);
    T total = 0;
    for (long k = 0; k < K; ++k) total += (y[k] = std::exp(x[k] - top));
    for (long k = 0; k < K; ++k) y[k] /= total;
  }
}

// g_raw from the gradient g_act of the activated interface.
template <class T>
void activate_backward(const T* raw, const T* act, const T* g_act, const Layout& lay, long R,
                       long K, T* g_raw) {
  std::copy(g_act, g_act + lay.br, g_raw);
  for (long j = lay.br; j < lay.erase; ++j) {  // d softplus = e^x / (e^x + 1) below 20
    if (raw[j] > T(kSoftplusLimit)) {
      g_raw[j] = g_act[j];
    } else {
      const T z = std::exp(raw[j]);
      g_raw[j] = g_act[j] * z / (z + T(1));
    }
  }
  for (long j = lay.erase; j < lay.modes; ++j)
    g_raw[j] = g_act[j] * (T(1) - act[j]) * act[j];
  for (long r = 0; r < R; ++r) {
    const T* y = act + lay.modes + r * K;
    const T* g = g_act + lay.modes + r * K;
    T* out = g_raw + lay.modes + r * K;
    T gy = 0;
    for (long k = 0; k < K; ++k) gy += g[k] * y[k];
    for (long k = 0; k < K; ++k) out[k] = y[k] * (g[k] - gy);
  }
}

// -- content weights C(M, k, β) = softmax_n(β cos(k, M[n])) -------------------------------------
// DNC Methods, "Content-based addressing"; cos = k·M / (|k| |M| + EPSILON) with norms
// sqrt(sum x^2 + EPSILON), as DeepMind's CosineWeights (addressing.cosine_similarity with
// denominator_eps = EPSILON). mt [W, N] (memory transposed), keys [K, W], beta [K] ->
// wts [K, N]; also sim [K, N], mnorm [N], knorm [K].
template <class T>
void content_forward(const T* mt, const T* keys, const T* beta, long K, long N, long W, T* wts,
                     T* sim, T* mnorm, T* knorm) {
  const T eps = T(kEpsilon);
  std::fill(mnorm, mnorm + N, T(0));
  for (long w = 0; w < W; ++w) {
    const T* m = mt + w * N;
    for (long n = 0; n < N; ++n) mnorm[n] += m[n] * m[n];
  }
  for (long n = 0; n < N; ++n) mnorm[n] = std::sqrt(mnorm[n] + eps);
  for (long k = 0; k < K; ++k) {
    const T* key = keys + k * W;
    knorm[k] = std::sqrt(dot(key, key, W) + eps);
    T* s = sim + k * N;
    T* z = wts + k * N;
    std::fill(s, s + N, T(0));
    for (long w = 0; w < W; ++w) axpy(s, key[w], mt + w * N, N);
    T top = -INFINITY;
    for (long n = 0; n < N; ++n) {
      s[n] /= knorm[k] * mnorm[n] + eps;
      z[n] = s[n] * beta[k];
      top = std::max(top, z[n]);
    }
    vmap(z, z, N, [top](typename Simd<T>::vec v) { return vexp<T>(v - top); });
    const T inv = T(1) / sum(z, N);
    for (long n = 0; n < N; ++n) z[n] *= inv;
  }
}

// Backward of content_forward given grad [K, N] of the weights: gmt [W, N] += ..., g_keys [K, W]
// and g_beta [K] written. gd and gss: [N] scratch.
template <class T>
void content_backward(const T* grad, const T* mt, const T* keys, const T* beta, long K, long N,
                      long W, const T* wts, const T* sim, const T* mnorm, const T* knorm, T* gmt,
                      T* g_keys, T* g_beta, T* gd, T* gss) {
  const T eps = T(kEpsilon);
  std::fill(gss, gss + N, T(0));
  for (long k = 0; k < K; ++k) {
    const T* g = grad + k * N;
    const T* w = wts + k * N;
    const T* s = sim + k * N;
    const T gw = dot(g, w, N);
    for (long n = 0; n < N; ++n) gd[n] = w[n] * (g[n] - gw);  // softmax
    g_beta[k] = dot(gd, s, N);
    const T b = beta[k], kn = knorm[k];
    T scale = 0;  // sum_n q[n] |M[n]| / |k|, q = g_sim sim / D (the gradient of -D)
    for (long n = 0; n < N; ++n) {  // sim = dot / D, D = |k| |M| + eps
      const T gdot = gd[n] * b / (kn * mnorm[n] + eps);
      const T q = gdot * s[n];
      gss[n] += q * kn;
      scale += q * mnorm[n];
      gd[n] = gdot;
    }
    scale /= kn;
    const T* key = keys + k * W;
    T* gk = g_keys + k * W;
    for (long w2 = 0; w2 < W; ++w2) {
      gk[w2] = dot(gd, mt + w2 * N, N) - key[w2] * scale;
      axpy(gmt + w2 * N, key[w2], gd, N);
    }
  }
  for (long n = 0; n < N; ++n) gss[n] /= mnorm[n];  // d|M[n]|/dM[n] = M[n] / |M[n]|
  for (long w = 0; w < W; ++w) {
    T* g = gmt + w * N;
    const T* m = mt + w * N;
    for (long n = 0; n < N; ++n) g[n] -= m[n] * gss[n];
  }
}

// -- allocation a[φ_j] = (1 - u[φ_j]) prod_{i<j} u[φ_i] -------------------------------------------
// on u' = EPSILON + (1 - EPSILON) u (DNC Methods, "Dynamic memory allocation";
// addressing.allocation_weights), as DeepMind's Freeness: φ ranks the free amounts n = 1 - u'
// in descending order, equal values in slot order (tf.nn.top_k; torch.sort(descending=True,
// stable=True)), and a[φ_j] = n[φ_j] prod_{i<j} (1 - n[φ_i]). NaN sorts first, as in torch.
// sorted_u holds 1 - n (the factors of the product), sorted_a the sorted allocation.
template <class T>
void allocation_forward(const T* usage, long N, T* alloc, int32_t* order, T* sorted_u, T* excl,
                        T* sorted_a, std::pair<T, int32_t>* pairs) {
  const T eps = T(kEpsilon);
  const T scale = T(1.0 - kEpsilon);
  bool plain = true;  // no NaN: compare values, then slots
  for (long n = 0; n < N; ++n) {
    const T u = eps + scale * usage[n];
    const T free = T(1) - u;
    pairs[n] = {free, int32_t(n)};
    plain = plain && !std::isnan(free);
  }
  if (plain) {
    std::sort(pairs, pairs + N, [](const std::pair<T, int32_t>& a, const std::pair<T, int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
  } else {
    std::sort(pairs, pairs + N, [](const std::pair<T, int32_t>& a, const std::pair<T, int32_t>& b) {
      const bool na = std::isnan(a.first), nb = std::isnan(b.first);
      if (na != nb) return na;
      if (!na && a.first != b.first) return a.first > b.first;
      return a.second < b.second;
    });
  }
  T prod = 1;
  for (long k = 0; k < N; ++k) {
    const T free = pairs[k].first;
    order[k] = pairs[k].second;
    sorted_u[k] = T(1) - free;
    excl[k] = prod;
    prod *= sorted_u[k];
    sorted_a[k] = free * excl[k];
    alloc[order[k]] = sorted_a[k];
  }
}

// d a_j / d s_k = -P_k [j = k] + a_j / s_k [j > k] (s = 1 - n sorted, P its exclusive product);
// the permutation carries no gradient. grad [N] by slot -> out [N] by slot.
template <class T>
void allocation_backward(const T* grad, long N, const int32_t* order, const T* sorted_u,
                         const T* excl, const T* sorted_a, T* out) {
  const T scale = T(1.0 - kEpsilon);
  T later = 0;  // sum over j > k of g_j a_j
  for (long k = N - 1; k >= 0; --k) {
    const T g = grad[order[k]];
    out[order[k]] = (later / sorted_u[k] - g * excl[k]) * scale;
    later += g * sorted_a[k];
  }
}

// -- the forward ----------------------------------------------------------------------------------
template <class T>
void forward(const Dims& d, const void* const* in_p, const long* in_stride, const T* raw_all,
             long raw_stride, void* const* out_p, void* work_p, int32_t* order_all) {
  FlushDenormals flush;
  const long N = d.N, W = d.W, R = d.R, H = d.H, K = 1 + 2 * H;
  const Layout lay(d);
  const long S = Work<T>::size(d);
  std::vector<T> scratch(2 * R + N + 2 * W * N);
  T* coef = scratch.data();
  T* dots = coef + R;
  T* tmp = dots + R;
  T* m0t = tmp + N;  // [W, N] M_{t-1} transposed
  T* m1t = m0t + W * N;  // [W, N] M_t transposed
  std::vector<std::pair<T, int32_t>> pairs(N);
  for (long b = 0; b < d.B; ++b) {
    Work<T> ws(static_cast<T*>(work_p) + b * S, d);
    if (raw_all) activate(raw_all + b * raw_stride, lay, R, K, ws.act);
    const In<T> x(in_p, in_stride, b, raw_all ? ws.act : nullptr, lay);
    T* memory = static_cast<T*>(out_p[0]) + b * N * W;
    T* usage = static_cast<T*>(out_p[1]) + b * N;
    T* link = static_cast<T*>(out_p[2]) + b * H * N * N;
    T* prec = static_cast<T*>(out_p[3]) + b * H * N;
    T* read = static_cast<T*>(out_p[4]) + b * R * N;
    T* write = static_cast<T*>(out_p[5]) + b * H * N;
    T* rv = static_cast<T*>(out_p[6]) + b * R * W;
    T* alloc = static_cast<T*>(out_p[7]) + b * H * N;
    int32_t* order = order_all + b * H * N;

    // 1. usage u = (u0 + c - u0 c) ψ, ψ = prod_r (1 - f_r w^r_{t-1}), c the previous write
    std::fill(ws.psi, ws.psi + N, T(1));
    for (long r = 0; r < R; ++r) {
      const T f = x.free_gates[r];
      const T* rd = x.read0 + r * N;
      for (long n = 0; n < N; ++n) ws.psi[n] *= T(1) - f * rd[n];
    }
    if (H == 1) {
      std::copy(x.write0, x.write0 + N, ws.written);
    } else {  // 1 - prod_h (1 - w_h)
      std::fill(tmp, tmp + N, T(1));
      for (long h = 0; h < H; ++h)
        for (long n = 0; n < N; ++n) tmp[n] *= T(1) - x.write0[h * N + n];
      for (long n = 0; n < N; ++n) ws.written[n] = T(1) - tmp[n];
    }
    for (long n = 0; n < N; ++n) {
      const T u0 = x.usage0[n], c = ws.written[n];
      ws.u1[n] = u0 + c - u0 * c;
      usage[n] = ws.u1[n] * ws.psi[n];
    }

    // 2. write weighting: content on M_{t-1}, allocation head after head, then the gates
    transpose(x.memory0, N, W, m0t);
    content_forward(m0t, x.kw, x.bw, H, N, W, ws.cw, ws.simw, ws.mnorm0, ws.knw);
    std::copy(usage, usage + N, ws.usages);
    for (long h = 0; h < H; ++h) {
      T* a = alloc + h * N;
      const T* u = ws.usages + h * N;
      allocation_forward(u, N, a, order + h * N, ws.sorted_u + h * N, ws.excl + h * N,
                         ws.sorted_a + h * N, pairs.data());
      if (h + 1 < H) {  // u <- u + (1 - u) g^a g^w a
        const T gate = x.ga[h] * x.gw[h];
        T* next = ws.usages + (h + 1) * N;
        for (long n = 0; n < N; ++n) next[n] = u[n] + (T(1) - u[n]) * gate * a[n];
      }
      const T g = x.ga[h], gate_w = x.gw[h];
      const T* c = ws.cw + h * N;
      T* mix = ws.mix + h * N;
      T* wr = write + h * N;
      if (g < T(0.5)) {  // torch.lerp(c, a, g), both of its branches
        for (long n = 0; n < N; ++n) mix[n] = c[n] + g * (a[n] - c[n]);
      } else {
        for (long n = 0; n < N; ++n) mix[n] = a[n] - (a[n] - c[n]) * (T(1) - g);
      }
      for (long n = 0; n < N; ++n) wr[n] = gate_w * mix[n];
    }

    // 3. erase and write M = M0 ∘ prod_h (1 - w_h e_h^T) + sum_h w_h v_h^T, on [W, N] rows
    for (long w = 0; w < W; ++w) {
      T* m = m1t + w * N;
      const T* m0 = m0t + w * N;
      std::fill(m, m + N, T(1));
      for (long h = 0; h < H; ++h) {
        const T e = x.erase[h * W + w];
        const T* wr = write + h * N;
        for (long n = 0; n < N; ++n) m[n] *= T(1) - wr[n] * e;
      }
      for (long n = 0; n < N; ++n) m[n] *= m0[n];
      for (long h = 0; h < H; ++h) axpy(m, x.v[h * W + w], write + h * N, N);
    }
    transpose(m1t, W, N, memory);

    // 4. link L[i,j] = (1 - w[i] - w[j]) L0[i,j] + w[i] p0[j], L[i,i] = 0; f and b from each row
    //    while it is in cache; precedence p = (1 - sum w) p0 + w
    for (long h = 0; h < H; ++h) {
      const T* w = write + h * N;
      const T* p0 = x.prec0 + h * N;
      const T* l0 = x.link0 + h * N * N;
      T* l = link + h * N * N;
      T* fwd = ws.fwd + h * R * N;
      T* bwd = ws.bwd + h * R * N;
      std::fill(bwd, bwd + R * N, T(0));
      for (long i = 0; i < N; ++i) {
        T* row = l + i * N;
        for (long r = 0; r < R; ++r) coef[r] = x.read0[r * N + i];
        // L[i, :], with f[r, i] = sum_j L[i, j] w^r[j] and b[r, j] += w^r[i] L[i, j] for the
        // first four read heads in the same pass, the others from the stored row
        link_row_forward_any(row, l0 + i * N, w, p0, i, N, std::min<long>(R, 4), x.read0, bwd,
                             coef, dots);
        if (R > 4)
          dots_axpys_rows(row, N, R - 4, x.read0 + 4 * N, bwd + 4 * N, coef + 4, dots + 4);
        for (long r = 0; r < R; ++r) fwd[r * N + i] = dots[r];
      }
      const T total = sum(w, N);
      for (long n = 0; n < N; ++n) prec[h * N + n] = (T(1) - total) * p0[n] + w[n];
    }

    // 5. read weighting w^r = π b_1..b_H + π c^r + π f_1..f_H, read vectors r = w^r M
    content_forward(m1t, x.kr, x.br, R, N, W, ws.wc, ws.simr, ws.mnorm1, ws.knr);
    for (long r = 0; r < R; ++r) {
      const T* pi = x.modes + r * K;
      T* out = read + r * N;
      std::fill(out, out + N, T(0));
      for (long h = 0; h < H; ++h) axpy(out, pi[h], ws.bwd + (h * R + r) * N, N);
      axpy(out, pi[H], ws.wc + r * N, N);
      for (long h = 0; h < H; ++h) axpy(out, pi[H + 1 + h], ws.fwd + (h * R + r) * N, N);
      for (long w = 0; w < W; ++w) rv[r * W + w] = dot(out, m1t + w * N, N);
    }
  }
}

// -- the backward ---------------------------------------------------------------------------------
// usage_gradient false: the usage passes no gradient to the previous write weights (DeepMind's
// tf.stop_gradient in Freeness); g_write0, if wanted, is then zero.
template <class T>
void backward(const Dims& d, const void* const* grad_p, const long* grad_stride,
              const void* const* in_p, const long* in_stride, const T* raw_all, long raw_stride,
              const void* const* out_p, const void* work_p, const int32_t* order_all,
              void* const* res_p, T* g_raw_all, bool usage_gradient = true) {
  FlushDenormals flush;
  const long N = d.N, W = d.W, R = d.R, H = d.H, K = 1 + 2 * H;
  const Layout lay(d);
  const long S = Work<T>::size(d);
  // scratch, reused across the batch
  const long RH = std::max(R, H);
  std::vector<T> buf(3 * R * N + 4 * W * N + H * N + 5 * N + 2 * H * N + 2 * RH * N + 3 * R +
                     lay.X);
  T* p = buf.data();
  auto take = [&p](long n) {
    T* q = p;
    p += n;
    return q;
  };
  T* gR = take(R * N);    // total gradient of the read weighting w^r_t
  T* gf = take(R * N);    // gradient of f (one write head at a time); of the read content
  T* gb = take(R * N);    // gradient of b
  T* gMT = take(W * N);   // total gradient of M_t, transposed
  T* gM0T = take(W * N);  // gradient of M_{t-1}, transposed
  T* m0t = take(W * N);   // M_{t-1} transposed
  T* m1t = take(W * N);   // M_t transposed
  T* gW = take(H * N);    // total gradient of the write weighting w^w_t
  T* gd = take(N);        // content_backward scratch
  T* gss = take(N);
  T* row = take(N);   // one row of the total gradient of L_t
  T* lrow = take(N);  // one row of L_t
  T* gcol = take(N);  // column sums of G ∘ L_{t-1}
  T* gA = take(2 * H * N);  // gradient of the allocations [H, N], then room for gCW below
  T* fac = take(RH * N);    // per-head factors (1 - w e, 1 - w0, 1 - f w^r)
  T* oth = take(RH * N);    // products of the other heads' factors
  T* c1 = take(R);          // g_f[:, i]
  T* c2 = take(R);          // w^r[:, i]
  T* dots = take(R);
  T* g_act = take(lay.X);  // gradient of the activated interface (raw mode)
  T* gU = row;  // allocation_backward output (row is free by then)
  // gradient of the write content weights [H, N]: in gf (free after the link) or, with more
  // write heads than read heads, in the second half of gA (unused otherwise)
  T* gCW = H <= R ? gf : gA + H * N;

  for (long b = 0; b < d.B; ++b) {
    Work<T> ws(const_cast<T*>(static_cast<const T*>(work_p)) + b * S, d);
    const In<T> x(in_p, in_stride, b, raw_all ? ws.act : nullptr, lay);
    auto grad = [&](int i) -> const T* {
      return grad_p[i] ? static_cast<const T*>(grad_p[i]) + b * grad_stride[i] : nullptr;
    };
    const T *g_memory = grad(0), *g_usage = grad(1), *g_link = grad(2), *g_prec = grad(3),
            *g_read = grad(4), *g_write = grad(5), *g_rv = grad(6);
    const T* memory = static_cast<const T*>(out_p[0]) + b * N * W;
    const T* read = static_cast<const T*>(out_p[4]) + b * R * N;
    const T* write = static_cast<const T*>(out_p[5]) + b * H * N;
    const T* alloc = static_cast<const T*>(out_p[7]) + b * H * N;
    const int32_t* order = order_all + b * H * N;
    auto res = [&](int i, long size) -> T* {
      return res_p[i] ? static_cast<T*>(res_p[i]) + b * size : nullptr;
    };
    T* g_memory0 = res(0, N * W);
    T* g_usage0 = res(1, N);
    T* g_link0 = res(2, H * N * N);
    T* g_prec0 = res(3, H * N);
    T* g_read0 = res(4, R * N);
    T* g_write0 = res(5, H * N);
    // the interface: into g_act (raw mode) or the results
    auto ires = [&](int i, long offset, long size) -> T* {
      return raw_all ? g_act + offset : res(i, size);
    };
    T* g_kr = ires(6, lay.kr, R * W);
    T* g_br = ires(7, lay.br, R);
    T* g_kw = ires(8, lay.kw, H * W);
    T* g_bw = ires(9, lay.bw, H);
    T* g_v = ires(10, lay.v, H * W);
    T* g_erase = ires(11, lay.erase, H * W);
    T* g_free = ires(12, lay.free, R);
    T* g_ga = ires(13, lay.ga, H);
    T* g_gw = ires(14, lay.gw, H);
    T* g_modes = ires(15, lay.modes, R * K);

    transpose(x.memory0, N, W, m0t);
    transpose(memory, N, W, m1t);

    // 5. read vectors r = w^r M (M as [W, N]), then the mode mixture and the read content
    for (long r = 0; r < R; ++r) {
      T* g = gR + r * N;
      if (g_read)
        std::copy(g_read + r * N, g_read + (r + 1) * N, g);
      else
        std::fill(g, g + N, T(0));
      if (g_rv)
        for (long w = 0; w < W; ++w) axpy(g, g_rv[r * W + w], m1t + w * N, N);
    }
    if (g_memory)
      transpose(g_memory, N, W, gMT);
    else
      std::fill(gMT, gMT + W * N, T(0));
    if (g_rv)
      for (long w = 0; w < W; ++w)
        for (long r = 0; r < R; ++r) axpy(gMT + w * N, g_rv[r * W + w], read + r * N, N);
    for (long r = 0; r < R; ++r) {
      const T* g = gR + r * N;
      for (long h = 0; h < H; ++h) {
        g_modes[r * K + h] = dot(ws.bwd + (h * R + r) * N, g, N);
        g_modes[r * K + H + 1 + h] = dot(ws.fwd + (h * R + r) * N, g, N);
      }
      g_modes[r * K + H] = dot(ws.wc + r * N, g, N);
      const T pi = x.modes[r * K + H];
      for (long n = 0; n < N; ++n) gf[r * N + n] = pi * g[n];
    }
    content_backward(gf, m1t, x.kr, x.br, R, N, W, ws.wc, ws.simr, ws.mnorm1, ws.knr, gMT, g_kr,
                     g_br, gd, gss);

    // 4. precedence p = (1 - sum w) p0 + w
    for (long h = 0; h < H; ++h) {
      const T* w = write + h * N;
      const T total = sum(w, N);
      const T* gp = g_prec ? g_prec + h * N : nullptr;
      const T gp_p0 = gp ? dot(gp, x.prec0 + h * N, N) : T(0);
      T* gw = gW + h * N;
      T* gp0 = g_prec0 + h * N;
      if (gp) {
        for (long n = 0; n < N; ++n) gp0[n] = (T(1) - total) * gp[n];
        if (g_write)
          for (long n = 0; n < N; ++n) gw[n] = g_write[h * N + n] + gp[n] - gp_p0;
        else
          for (long n = 0; n < N; ++n) gw[n] = gp[n] - gp_p0;
      } else {
        std::fill(gp0, gp0 + N, T(0));
        if (g_write)
          std::copy(g_write + h * N, g_write + (h + 1) * N, gw);
        else
          std::fill(gw, gw + N, T(0));
      }
    }
    // ... and the link: G = dL + g_f^T w^r + w^rT g_b (zero diagonal), row by row
    std::fill(g_read0, g_read0 + R * N, T(0));
    for (long h = 0; h < H; ++h) {
      const T* w = write + h * N;
      const T* p0 = x.prec0 + h * N;
      const T* l0 = x.link0 + h * N * N;
      const T* gl = g_link ? g_link + h * N * N : nullptr;
      T* gl0 = g_link0 ? g_link0 + h * N * N : nullptr;
      T* gp0 = g_prec0 + h * N;
      for (long r = 0; r < R; ++r) {
        const T pb = x.modes[r * K + h], pf = x.modes[r * K + H + 1 + h];
        for (long n = 0; n < N; ++n) {
          gb[r * N + n] = pb * gR[r * N + n];
          gf[r * N + n] = pf * gR[r * N + n];
        }
      }
      std::fill(gcol, gcol + N, T(0));
      for (long i = 0; i < N; ++i) {
        for (long r = 0; r < R; ++r) c1[r] = gf[r * N + i], c2[r] = x.read0[r * N + i];
        if (R <= 4) {  // all of the below in one pass over the row
          const T* dl = gl ? gl + i * N : nullptr;
          T* out = gl0 ? gl0 + i * N : nullptr;
          const T* l0i = l0 + i * N;
          const T s = link_row_backward_any(dl, l0i, w, p0, i, N, R, x.read0, gb, c1, c2, gp0,
                                            gcol, out, g_read0, dots);
          gW[h * N + i] += s;
          for (long r = 0; r < R; ++r) g_read0[r * N + i] += dots[r];
          continue;
        }
        // G[i, :] = dL[i, :] + sum_r g_f[r, i] w^r + w^r[i] g_b[r], zero on the diagonal
        rank_update_rows(row, gl ? gl + i * N : nullptr, N, R, x.read0, c1, gb, c2);
        row[i] = 0;
        // d/dp0, d/dw (row i and column sums), d/dL0 (when wanted)
        gW[h * N + i] += link_row_backward(row, l0 + i * N, w, p0, i, N, gp0, gcol,
                                           gl0 ? gl0 + i * N : nullptr);
        // w^r was used against L_t (rebuilt from L0: one N x N read less):
        // d/dw^r[j] += g_f[r, i] L[i, j],  d/dw^r[i] += sum_j g_b[r, j] L[i, j]
        link_row(lrow, l0 + i * N, w, p0, i, N);
        dots_axpys_rows(lrow, N, R, gb, g_read0, c1, dots);
        for (long r = 0; r < R; ++r) g_read0[r * N + i] += dots[r];
      }
      for (long n = 0; n < N; ++n) gW[h * N + n] -= gcol[n];
    }

    // 3. erase and write: M = M0 ∘ prod_h (1 - w_h e_h^T) + sum_h w_h v_h^T, on [W, N] rows
    for (long w = 0; w < W; ++w) {
      const T* gm = gMT + w * N;
      const T* m0 = m0t + w * N;
      T* gm0 = gM0T + w * N;
      for (long h = 0; h < H; ++h) {
        const T* wr = write + h * N;
        const T e = x.erase[h * W + w];
        for (long n = 0; n < N; ++n) fac[h * N + n] = T(1) - wr[n] * e;
        axpy(gW + h * N, x.v[h * W + w], gm, N);  // d/dw[n] += v[w] g_M[n, w]
        g_v[h * W + w] = dot(wr, gm, N);
      }
      std::copy(fac, fac + N, gm0);  // keep = prod_h (1 - w_h e_h), then d/dM0 = g_M keep
      for (long h = 1; h < H; ++h)
        for (long n = 0; n < N; ++n) gm0[n] *= fac[h * N + n];
      for (long n = 0; n < N; ++n) gm0[n] *= gm[n];
      // d/d(w_h e_h)[n] = -g_M[n] M0[n] prod_{h' != h} (1 - w_h' e_h')
      T* g_keep = lrow;
      for (long n = 0; n < N; ++n) g_keep[n] = -(gm[n] * m0[n]);
      if (H > 1) {
        others_product_rows(fac, H, N, oth, row);
        for (long h = 0; h < H; ++h)
          for (long n = 0; n < N; ++n) oth[h * N + n] *= g_keep[n];
      }
      for (long h = 0; h < H; ++h) {
        const T* g_we = H > 1 ? oth + h * N : g_keep;
        axpy(gW + h * N, x.erase[h * W + w], g_we, N);
        g_erase[h * W + w] = dot(write + h * N, g_we, N);
      }
    }

    // 2. write weighting w = g^w lerp(c^w, a, g^a), allocation head after head in reverse
    for (long h = 0; h < H; ++h) {
      const T* g = gW + h * N;
      const T* a = alloc + h * N;
      const T* c = ws.cw + h * N;
      const T gate_w = x.gw[h], gate_a = x.ga[h];
      g_gw[h] = dot(g, ws.mix + h * N, N);
      T* g_a = gA + h * N;
      T* g_c = gCW + h * N;
      for (long n = 0; n < N; ++n) {
        const T g_mix = g[n] * gate_w;
        g_c[n] = g_mix * (a[n] - c[n]);  // (summed below, then overwritten)
        g_a[n] = g_mix * gate_a;
      }
      g_ga[h] = sum(g_c, N);
      for (long n = 0; n < N; ++n) g_c[n] = g[n] * gate_w * (T(1) - gate_a);
    }
    T* g_next = nullptr;  // gradient of the usage head h + 1 allocated from
    for (long h = H - 1; h >= 0; --h) {
      T* g_ah = gA + h * N;
      T* g_uh = fac + (h % 2) * N;  // alternate two buffers: g_next is read while g_uh is written
      if (g_next) {  // u_{h+1} = u_h + (1 - u_h) s_h a_h
        const T* u = ws.usages + h * N;
        const T* a = alloc + h * N;
        const T s = x.ga[h] * x.gw[h];
        for (long n = 0; n < N; ++n) {
          const T t = g_next[n] * (T(1) - u[n]);
          g_ah[n] += t * s;
          oth[n] = t * a[n];
          g_uh[n] = g_next[n] * (T(1) - s * a[n]);
        }
        const T g_s = sum(oth, N);
        g_ga[h] += g_s * x.gw[h];
        g_gw[h] += g_s * x.ga[h];
      }
      allocation_backward(g_ah, N, order + h * N, ws.sorted_u + h * N, ws.excl + h * N,
                          ws.sorted_a + h * N, gU);
      if (g_next)
        for (long n = 0; n < N; ++n) g_uh[n] += gU[n];
      else
        std::copy(gU, gU + N, g_uh);
      g_next = g_uh;
    }
    content_backward(gCW, m0t, x.kw, x.bw, H, N, W, ws.cw, ws.simw, ws.mnorm0, ws.knw, gM0T,
                     g_kw, g_bw, gd, gss);
    transpose(gM0T, W, N, g_memory0);

    // 1. usage u = (u0 + c - u0 c) ψ
    T* g_psi = gd;
    T* g_c = gss;
    for (long n = 0; n < N; ++n) {
      const T g_un = (g_usage ? g_usage[n] : T(0)) + g_next[n];
      const T g_u1 = g_un * ws.psi[n];
      g_psi[n] = g_un * ws.u1[n];
      g_usage0[n] = g_u1 * (T(1) - ws.written[n]);
      g_c[n] = g_u1 * (T(1) - x.usage0[n]);
    }
    if (!g_write0) {  // not wanted (detached w^w_{t-1})
    } else if (!usage_gradient) {
      std::fill(g_write0, g_write0 + H * N, T(0));
    } else if (H == 1) {
      std::copy(g_c, g_c + N, g_write0);
    } else {
      for (long h = 0; h < H; ++h)
        for (long n = 0; n < N; ++n) fac[h * N + n] = T(1) - x.write0[h * N + n];
      others_product_rows(fac, H, N, oth, row);
      for (long h = 0; h < H; ++h)
        for (long n = 0; n < N; ++n) g_write0[h * N + n] = g_c[n] * oth[h * N + n];
    }
    for (long r = 0; r < R; ++r) {
      const T f = x.free_gates[r];
      for (long n = 0; n < N; ++n) fac[r * N + n] = T(1) - f * x.read0[r * N + n];
    }
    others_product_rows(fac, R, N, oth, row);
    for (long r = 0; r < R; ++r) {
      T* g_keep = oth + r * N;
      for (long n = 0; n < N; ++n) g_keep[n] *= g_psi[n];
      g_free[r] = -dot(g_keep, x.read0 + r * N, N);
      axpy(g_read0 + r * N, -x.free_gates[r], g_keep, N);
    }

    if (raw_all)
      activate_backward(raw_all + b * raw_stride, ws.act, g_act, lay, R, K,
                        g_raw_all + b * lay.X);
  }
}

// -- the controller's recurrent part (DNCCore's fused sequence path) ------------------------------
// The LSTM controller (Hochreiter & Schmidhuber 1997; nn.LSTMCell's gate order i, f, g, o) with
// the input's share of its gates computed outside for all steps at once (or, with a null W_rh,
// the whole gates computed outside):
//   gates = gates_x + [r_{t-1}; h_{t-1}] W_rh,  c = σ(f) c_{t-1} + σ(i) tanh(g),
//   h = σ(o) tanh(c),  ξ = b + h W_ξ  (the interface vector, then the access step on ξ).
// ctrl (7): gates_x [4Hd], h0 [Hd], c0 [Hd], r0 [R*W] (batch strides in ctrl_stride), then
//           W_rh [R*W + Hd, 4Hd], W_ξ [Hd, X], b [X] (contiguous, shared by the batch).
// Controller workspace per batch element (Sc = 5 Hd + X): σ(i), σ(f), tanh(g), σ(o), tanh(c),
// ξ.
struct Ctrl {
  long B, Hd, RW, X;
  long G() const { return 4 * Hd; }
  long K() const { return RW + Hd; }  // rows of W_rh
  long size() const { return 5 * Hd + X; }
  long xi() const { return 5 * Hd; }  // offset of ξ in the workspace
};

// The value of row k of the gates' right factor [r0; h0] for batch element b.
template <class T>
inline T ctrl_in(const Ctrl& cd, const void* const* ctrl, const long* ctrl_stride, long b,
                 long k) {
  return k < cd.RW ? static_cast<const T*>(ctrl[3])[b * ctrl_stride[3] + k]
                   : static_cast<const T*>(ctrl[1])[b * ctrl_stride[1] + k - cd.RW];
}

// The small matrix products below run weight-row-outer, batch-inner: each row of W_rh / W_ξ is
// read once per step and stays in cache while the batch uses it.
template <class T>
void controller_forward(const Ctrl& cd, const void* const* ctrl, const long* ctrl_stride,
                        T* h_out, T* c_out, T* cwork) {
  FlushDenormals flush;
  const long B = cd.B, Hd = cd.Hd, X = cd.X, G = cd.G(), K = cd.K(), Sc = cd.size();
  const T* w_rh = static_cast<const T*>(ctrl[4]);
  const T* w_xi = static_cast<const T*>(ctrl[5]);
  const T* bias = static_cast<const T*>(ctrl[6]);
  // gates = gates_x + [r0; h0] W_rh, in each element's workspace
  for (long b = 0; b < B; ++b) {
    const T* gx = static_cast<const T*>(ctrl[0]) + b * ctrl_stride[0];
    std::copy(gx, gx + G, cwork + b * Sc);
  }
  if (w_rh)  // (null: gates_x holds the whole gates; DNCSequence forms them with one GEMM)
    for (long k = 0; k < K; ++k)
      for (long b = 0; b < B; ++b)
        axpy(cwork + b * Sc, ctrl_in<T>(cd, ctrl, ctrl_stride, b, k), w_rh + k * G, G);
  auto vs = [](typename Simd<T>::vec v) { return vsigmoid<T>(v); };
  auto vt = [](typename Simd<T>::vec v) { return vtanh<T>(v); };
  for (long b = 0; b < B; ++b) {
    const T* c0 = static_cast<const T*>(ctrl[2]) + b * ctrl_stride[2];
    T* act = cwork + b * Sc;  // the gates, then their activations
    T* tc = act + G;
    T* h = h_out + b * Hd;
    T* c = c_out + b * Hd;
    vmap(act, act, 2 * Hd, vs);  // σ(i), σ(f)
    vmap(act + 2 * Hd, act + 2 * Hd, Hd, vt);  // tanh(g)
    vmap(act + 3 * Hd, act + 3 * Hd, Hd, vs);  // σ(o)
    for (long k = 0; k < Hd; ++k) c[k] = act[Hd + k] * c0[k] + act[k] * act[2 * Hd + k];
    vmap(tc, c, Hd, vt);
    for (long k = 0; k < Hd; ++k) h[k] = act[3 * Hd + k] * tc[k];
    std::copy(bias, bias + X, act + cd.xi());
  }
  // ξ = b + h W_ξ
  for (long k = 0; k < Hd; ++k)
    for (long b = 0; b < B; ++b) axpy(cwork + b * Sc + cd.xi(), h_out[b * Hd + k], w_xi + k * X, X);
}

// Given g_h, g_c (null: zero; batch strides) and g_ξ [B, X] (from the access step): res (7) =
// g_gates_x [B, 4Hd], g_h0 [B, Hd], g_c0 [B, Hd], g_r0 [B, R*W] and the parameters' gradients
// summed over the batch, g_W_rh [R*W + Hd, 4Hd], g_W_ξ [Hd, X], g_b [X] (all contiguous). A null
// g_W_rh skips the three parameter gradients (DNCSequence forms them once over all steps).
template <class T>
void controller_backward(const Ctrl& cd, const void* const* ctrl, const long* ctrl_stride,
                         const T* g_h_all, long g_h_stride, const T* g_c_all, long g_c_stride,
                         const T* g_xi_all, const T* h_all, const T* cwork, void* const* res) {
  FlushDenormals flush;
  const long B = cd.B, Hd = cd.Hd, RW = cd.RW, X = cd.X, G = cd.G(), K = cd.K(), Sc = cd.size();
  const T* w_rh = static_cast<const T*>(ctrl[4]);
  const T* w_xi = static_cast<const T*>(ctrl[5]);
  T* g_gates_all = static_cast<T*>(res[0]);
  T* g_h0_all = static_cast<T*>(res[1]);
  T* g_c0_all = static_cast<T*>(res[2]);
  T* g_r0_all = static_cast<T*>(res[3]);
  T* g_w_rh = static_cast<T*>(res[4]);
  T* g_w_xi = static_cast<T*>(res[5]);
  T* g_bias = static_cast<T*>(res[6]);
  // ξ = b + h W_ξ: the gradient of h (into g_h0_all as scratch), of W_ξ and of b
  for (long k = 0; k < Hd; ++k)
    for (long b = 0; b < B; ++b)
      g_h0_all[b * Hd + k] = (g_h_all ? g_h_all[b * g_h_stride + k] : T(0)) +
                             dot(w_xi + k * X, g_xi_all + b * X, X);
  const bool weights = g_w_rh != nullptr;
  if (weights) {
    for (long k = 0; k < Hd; ++k) {
      T* row = g_w_xi + k * X;
      std::fill(row, row + X, T(0));
      for (long b = 0; b < B; ++b) axpy(row, h_all[b * Hd + k], g_xi_all + b * X, X);
    }
    std::fill(g_bias, g_bias + X, T(0));
    for (long b = 0; b < B; ++b) axpy(g_bias, T(1), g_xi_all + b * X, X);
  }
  // h = σ(o) tanh(c), c = σ(f) c0 + σ(i) tanh(g)
  for (long b = 0; b < B; ++b) {
    const T* act = cwork + b * Sc;
    const T* tc = act + G;
    const T* c0 = static_cast<const T*>(ctrl[2]) + b * ctrl_stride[2];
    const T* gh = g_h0_all + b * Hd;
    T* dg = g_gates_all + b * G;
    for (long k = 0; k < Hd; ++k) {
      const T i = act[k], f = act[Hd + k], g = act[2 * Hd + k], o = act[3 * Hd + k];
      const T gc = (g_c_all ? g_c_all[b * g_c_stride + k] : T(0)) +
                   gh[k] * o * (T(1) - tc[k] * tc[k]);
      g_c0_all[b * Hd + k] = gc * f;
      dg[k] = gc * g * i * (T(1) - i);
      dg[Hd + k] = gc * c0[k] * f * (T(1) - f);
      dg[2 * Hd + k] = gc * i * (T(1) - g * g);
      dg[3 * Hd + k] = gh[k] * tc[k] * o * (T(1) - o);
    }
  }
  // gates = gates_x + [r0; h0] W_rh (a null W_rh: the caller forms g_r0, g_h0 from g_gates_x;
  // g_h0 then holds scratch and g_r0 is untouched)
  for (long k = 0; w_rh && k < K; ++k) {
    const T* w = w_rh + k * G;
    T* row = weights ? g_w_rh + k * G : nullptr;
    if (weights) std::fill(row, row + G, T(0));
    for (long b = 0; b < B; ++b) {
      const T* dg = g_gates_all + b * G;
      const T g_in = dot(w, dg, G);
      if (k < RW)
        g_r0_all[b * RW + k] = g_in;
      else
        g_h0_all[b * Hd + k - RW] = g_in;  // (its gradient of h is no longer needed)
      if (weights) axpy(row, ctrl_in<T>(cd, ctrl, ctrl_stride, b, k), dg, G);
    }
  }
}

// One whole DNC step: the controller, then the access step on its ξ. out (10): the access
// step's 8 outputs, then h [B, Hd], c [B, Hd]; work: the access step's, cwork: [B, Sc].
template <class T>
void step_forward(const long* dims, const void* const* ctrl, const long* ctrl_stride,
                  const void* const* in, const long* in_stride, void* const* out, void* work,
                  void* cwork, int32_t* order) {
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const Ctrl cd{dims[0], dims[5], dims[3] * dims[2], Layout(d).X};
  T* cw = static_cast<T*>(cwork);
  controller_forward<T>(cd, ctrl, ctrl_stride, static_cast<T*>(out[8]), static_cast<T*>(out[9]),
                        cw);
  forward<T>(d, in, in_stride, cw + cd.xi(), cd.size(), out, work, order);
}

// grads (9): the access step's 7, then g_h, g_c (null: zero); res (13): the 6 state gradients,
// then the controller's 7 (see controller_backward; a null g_W_rh skips the parameters'). g_xi:
// null, or [B, X] receiving the gradient of ξ (from which DNCSequence forms g_W_ξ and g_b).
// usage_gradient: as backward's.
template <class T>
void step_backward(const long* dims, const void* const* grad, const long* grad_stride,
                   const void* const* ctrl, const long* ctrl_stride, const void* const* in,
                   const long* in_stride, const void* const* out, const void* work,
                   const void* cwork, const int32_t* order, void* const* res, T* g_xi_out,
                   bool usage_gradient = true) {
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const Ctrl cd{dims[0], dims[5], dims[3] * dims[2], Layout(d).X};
  const T* cw = static_cast<const T*>(cwork);
  std::vector<T> g_xi_own(g_xi_out ? 0 : cd.B * cd.X);
  T* g_xi = g_xi_out ? g_xi_out : g_xi_own.data();
  void* access_res[16] = {res[0], res[1], res[2], res[3], res[4], res[5]};
  backward<T>(d, grad, grad_stride, in, in_stride, cw + cd.xi(), cd.size(), out, work, order,
              access_res, g_xi, usage_gradient);
  controller_backward<T>(cd, ctrl, ctrl_stride, static_cast<const T*>(grad[7]), grad_stride[7],
                         static_cast<const T*>(grad[8]), grad_stride[8], g_xi,
                         static_cast<const T*>(out[8]), cw, res + 6);
}

}  // namespace

#define DNC_EXPORT extern "C" __attribute__((visibility("default")))

static Dims dims_of(const long* dims) { return Dims{dims[0], dims[1], dims[2], dims[3], dims[4]}; }

// Workspace elements per batch element (the Python side allocates [B, size]); dims = B,N,W,R,H.
DNC_EXPORT long dnc_workspace_size(const long* dims) { return Work<double>::size(dims_of(dims)); }

// Length X of the interface vector ξ.
DNC_EXPORT long dnc_interface_size(const long* dims) { return Layout(dims_of(dims)).X; }

DNC_EXPORT void dnc_forward_f32(const long* dims, const void* const* in, const long* in_stride,
                                const void* raw, long raw_stride, void* const* out, void* work,
                                int32_t* order) {
  forward<float>(dims_of(dims), in, in_stride, static_cast<const float*>(raw), raw_stride, out,
                 work, order);
}

DNC_EXPORT void dnc_forward_f64(const long* dims, const void* const* in, const long* in_stride,
                                const void* raw, long raw_stride, void* const* out, void* work,
                                int32_t* order) {
  forward<double>(dims_of(dims), in, in_stride, static_cast<const double*>(raw), raw_stride, out,
                  work, order);
}

DNC_EXPORT void dnc_backward_f32(const long* dims, const void* const* grad,
                                 const long* grad_stride, const void* const* in,
                                 const long* in_stride, const void* raw, long raw_stride,
                                 const void* const* out, const void* work, const int32_t* order,
                                 void* const* res, void* g_raw) {
  backward<float>(dims_of(dims), grad, grad_stride, in, in_stride,
                  static_cast<const float*>(raw), raw_stride, out, work, order, res,
                  static_cast<float*>(g_raw));
}

DNC_EXPORT void dnc_backward_f64(const long* dims, const void* const* grad,
                                 const long* grad_stride, const void* const* in,
                                 const long* in_stride, const void* raw, long raw_stride,
                                 const void* const* out, const void* work, const int32_t* order,
                                 void* const* res, void* g_raw) {
  backward<double>(dims_of(dims), grad, grad_stride, in, in_stride,
                   static_cast<const double*>(raw), raw_stride, out, work, order, res,
                   static_cast<double*>(g_raw));
}

// Controller workspace elements per batch element; dims = B, N, W, R, H, Hd.
DNC_EXPORT long dnc_step_workspace_size(const long* dims) {
  return Ctrl{dims[0], dims[5], dims[3] * dims[2], Layout(dims_of(dims)).X}.size();
}

DNC_EXPORT void dnc_step_forward_f32(const long* dims, const void* const* ctrl,
                                     const long* ctrl_stride, const void* const* in,
                                     const long* in_stride, void* const* out, void* work,
                                     void* cwork, int32_t* order) {
  step_forward<float>(dims, ctrl, ctrl_stride, in, in_stride, out, work, cwork, order);
}

DNC_EXPORT void dnc_step_forward_f64(const long* dims, const void* const* ctrl,
                                     const long* ctrl_stride, const void* const* in,
                                     const long* in_stride, void* const* out, void* work,
                                     void* cwork, int32_t* order) {
  step_forward<double>(dims, ctrl, ctrl_stride, in, in_stride, out, work, cwork, order);
}

DNC_EXPORT void dnc_step_backward_f32(const long* dims, const void* const* grad,
                                      const long* grad_stride, const void* const* ctrl,
                                      const long* ctrl_stride, const void* const* in,
                                      const long* in_stride, const void* const* out,
                                      const void* work, const void* cwork, const int32_t* order,
                                      void* const* res) {
  step_backward<float>(dims, grad, grad_stride, ctrl, ctrl_stride, in, in_stride, out, work,
                       cwork, order, res, nullptr);
}

DNC_EXPORT void dnc_step_backward_f64(const long* dims, const void* const* grad,
                                      const long* grad_stride, const void* const* ctrl,
                                      const long* ctrl_stride, const void* const* in,
                                      const long* in_stride, const void* const* out,
                                      const void* work, const void* cwork, const int32_t* order,
                                      void* const* res) {
  step_backward<double>(dims, grad, grad_stride, ctrl, ctrl_stride, in, in_stride, out, work,
                        cwork, order, res, nullptr);
}

// As dnc_step_backward, with the gradient of ξ written to g_xi [B, X] (DNCSequence passes a null
// g_W_rh in res and forms the parameters' gradients once over all steps). usage_gradient = 0:
// the gradient of the previous write weights (through the usage only) is zero, DeepMind's
// stop_gradient on the recurrent edge w^w_{t-1} -> u_t (the per-step nodes detach w^w_{t-1}).
DNC_EXPORT void dnc_seq_step_backward_f32(const long* dims, const void* const* grad,
                                          const long* grad_stride, const void* const* ctrl,
                                          const long* ctrl_stride, const void* const* in,
                                          const long* in_stride, const void* const* out,
                                          const void* work, const void* cwork,
                                          const int32_t* order, void* const* res, void* g_xi,
                                          long usage_gradient) {
  step_backward<float>(dims, grad, grad_stride, ctrl, ctrl_stride, in, in_stride, out, work,
                       cwork, order, res, static_cast<float*>(g_xi), usage_gradient != 0);
}

DNC_EXPORT void dnc_seq_step_backward_f64(const long* dims, const void* const* grad,
                                          const long* grad_stride, const void* const* ctrl,
                                          const long* ctrl_stride, const void* const* in,
                                          const long* in_stride, const void* const* out,
                                          const void* work, const void* cwork,
                                          const int32_t* order, void* const* res, void* g_xi,
                                          long usage_gradient) {
  step_backward<double>(dims, grad, grad_stride, ctrl, ctrl_stride, in, in_stride, out, work,
                        cwork, order, res, static_cast<double*>(g_xi), usage_gradient != 0);
}
