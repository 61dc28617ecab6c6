// The fast-weight core's slow-net heads (memagents/cores/fwp.py, _SlowNetHeads), forward and
// hand-derived backward, one call each over all steps.
//
// Schlag, Irie & Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight Programmers":
// each row of z = W_slow x is [k_1..k_H, q_1..q_H | v_1..v_H | b_1..b_H] (b for the delta rule
// only). Keys and queries (2H vectors of d_key) map to phi'(x) = phi(x) / max(sum phi(x), eps)
// (Sec. 4.2) with
//   DPFP (Sec. 5.3): r = ReLU([x, -x]) (2 d_key entries), phi_{(i-1) 2 d_key + j} = r_j r_{j+i}
//                    for i = 1..nu, indices modulo 2 d_key;
//   ELU + 1:         phi_j = ELU(x_j) + 1;
// values are copied and beta = sigmoid(b).
//
// Backward, given g = d phi' (per key or query), with c = 1 / max(s, eps), s = sum phi:
//   d phi = c (g - [s >= eps] (g . phi'))
//   DPFP:  dr_j += d phi_{i,j} r_{j+i},  dr_{j+i} += d phi_{i,j} r_j;
//          dx_j = dr_j [x_j > 0] - dr_{j + d_key} [x_j < 0]   (ReLU: no gradient at 0)
//   ELU+1: dx_j = d phi_j (x_j > 0 ? 1 : exp(x_j))
//   d b = g_beta sigma (1 - sigma).
// The backward recomputes r and phi from z (cheaper than storing them).
//
// Layout. z is [T, B, F] (row m = t B + b). The outputs (and, in the backward, their gradients
// and the saved beta) are addressed by strides in the coordinates (n, b, h, c) with
// n = t / C, c = t % C, so that one kernel writes either the step layout ([T, B, H, d]: C = T,
// stride_n unused) or the chunk layout of the chunk form ([N B H, C, d]); keys and queries have
// separate base pointers. Entries of padded steps (t >= T) are not touched.

// comparisons in selects may not trap, so that the sign masks vectorise (as torch builds)
#pragma GCC optimize("no-trapping-math")

#include <cmath>
#include <vector>

namespace {

struct Dims {
  long T, B, C;
  int H, dk, dv, nu;
  bool dpfp, delta;
  int dphi;  // 2 dk nu (DPFP) or dk (ELU + 1)
  int n_kq;  // 2 H dk
  int n_v;   // H dv
  long F;    // row length of z: 2 H dk + H dv (+ H)
};

// strides (in elements) of one output in the coordinates n, b, h, c
struct Strides {
  long n, b, h, c;
  // offset of head h_ of element b_ at step t = n_ C + c_
  long at(long n_, long c_, long b_, long h_) const { return n_ * n + b_ * b + h_ * h + c_ * c; }
};

// sum_j a_j b_j with 8 independent partial sums (a serial sum is latency-bound)
template <typename T>
inline T dot8(const T* __restrict a, const T* __restrict b, int n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += a[j + u] * b[j + u];
  }
  for (; j < n; ++j) acc[0] += a[j] * b[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
inline T sum8(const T* __restrict a, int n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += a[j + u];
  }
  for (; j < n; ++j) acc[0] += a[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// phi(x) of one key or query into phi[dphi] (and r[2 dk] for DPFP); returns sum phi
template <typename T>
inline T features(const Dims& d, const T* __restrict x, T* __restrict r, T* __restrict phi) {
  if (d.dpfp) {
    const int n = 2 * d.dk;
    for (int j = 0; j < d.dk; ++j) {
      const T xj = x[j];  // ReLU([x, -x])
      r[j] = xj > T(0) ? xj : T(0);
      r[d.dk + j] = xj < T(0) ? -xj : T(0);
    }
    for (int i = 1; i <= d.nu; ++i) {
      T* block = phi + (i - 1) * n;
      for (int j = 0; j < n - i; ++j) block[j] = r[j] * r[j + i];  // split: no modulo, vectorises
      for (int j = n - i; j < n; ++j) block[j] = r[j] * r[j + i - n];
    }
  } else {
    for (int j = 0; j < d.dk; ++j) phi[j] = x[j] > T(0) ? x[j] + T(1) : std::expm1(x[j]) + T(1);
  }
  return sum8(phi, d.dphi);
}

template <typename T>
void forward(const Dims& d, T eps, const T* z, T* k_out, T* q_out, const Strides& s_kq, T* v_out,
             const Strides& s_v, T* b_out, const Strides& s_b) {
  std::vector<T> r(2 * d.dk), phi(d.dphi);
  // b outer, t inner: per step the writes go to 3H streams that advance together (with t outer,
  // the chunk layout's B H scattered streams defeat the prefetchers)
  for (long b = 0; b < d.B; ++b) {
    for (long t = 0; t < d.T; ++t) {
      const long n = t / d.C, c = t % d.C;
      const T* row = z + (t * d.B + b) * d.F;
      for (int h = 0; h < 2 * d.H; ++h) {
        const T s = features(d, row + h * d.dk, r.data(), phi.data());
        const T scale = T(1) / (s > eps ? s : eps);
        T* out = (h < d.H ? k_out : q_out) + s_kq.at(n, c, b, h % d.H);
        for (int j = 0; j < d.dphi; ++j) out[j] = phi[j] * scale;
      }
      for (int h = 0; h < d.H; ++h) {
        T* out = v_out + s_v.at(n, c, b, h);
        const T* in = row + d.n_kq + h * d.dv;
        for (int j = 0; j < d.dv; ++j) out[j] = in[j];
        if (d.delta) {
          b_out[s_b.at(n, c, b, h)] = T(1) / (T(1) + std::exp(-row[d.n_kq + d.n_v + h]));
        }
      }
    }
  }
}

// dx of one key or query given g = d phi' (x, g, dx distinct: restrict lets the loops vectorise
// into branch-free selects; data-dependent branches on the signs of x cost a misprediction each)
template <typename T>
inline void feature_backward(const Dims& d, T eps, const T* __restrict x, const T* __restrict g,
                      T* __restrict dx, T* __restrict r, T* __restrict phi, T* __restrict dr,
                      T* __restrict dphi) {
  const int n = 2 * d.dk;
  const T s = features(d, x, r, phi);
  const T c = T(1) / (s > eps ? s : eps);
  const T dot = s >= eps ? c * dot8(g, phi, d.dphi) : T(0);  // g . phi' where unclamped
  if (d.dpfp) {
    for (int j = 0; j < n; ++j) dr[j] = 0;
    for (int i = 1; i <= d.nu; ++i) {
      const T* gi = g + (i - 1) * n;
      for (int j = 0; j < n; ++j) dphi[j] = c * (gi[j] - dot);
      // phi_{i,j} = r_j r_{j+i}: dr_j += dphi_j r_{j+i} and dr_{j+i} += dphi_j r_j
      for (int j = 0; j < n - i; ++j) dr[j] += dphi[j] * r[j + i];
      for (int j = n - i; j < n; ++j) dr[j] += dphi[j] * r[j + i - n];
      for (int k = i; k < n; ++k) dr[k] += dphi[k - i] * r[k - i];
      for (int k = 0; k < i; ++k) dr[k] += dphi[k - i + n] * r[k - i + n];
    }
    for (int j = 0; j < d.dk; ++j) {  // unconditional loads: the selects vectorise
      const T xj = x[j], pos = dr[j], neg = dr[d.dk + j];
      dx[j] = (xj > T(0) ? pos : T(0)) - (xj < T(0) ? neg : T(0));
    }
  } else {
    for (int j = 0; j < d.dk; ++j) {
      const T xj = x[j], dp = c * (g[j] - dot);
      dx[j] = xj > T(0) ? dp : dp * std::exp(xj);
    }
  }
}

template <typename T>
void backward(const Dims& d, T eps, const T* z, const T* beta, const Strides& s_b, const T* g_k,
              const T* g_q, const Strides& s_gkq, const T* g_v, const Strides& s_gv,
              const T* g_b, const Strides& s_gb, T* dz) {
  std::vector<T> r(2 * d.dk), phi(d.dphi), dr(2 * d.dk), dphi(2 * d.dk);
  for (long b = 0; b < d.B; ++b) {  // b outer: see forward
    for (long t = 0; t < d.T; ++t) {
      const long n = t / d.C, c = t % d.C, m = t * d.B + b;
      const T* row = z + m * d.F;
      T* d_row = dz + m * d.F;
      for (int h = 0; h < 2 * d.H; ++h) {
        const T* g = (h < d.H ? g_k : g_q) + s_gkq.at(n, c, b, h % d.H);
        feature_backward(d, eps, row + h * d.dk, g, d_row + h * d.dk, r.data(), phi.data(),
                         dr.data(), dphi.data());
      }
      for (int h = 0; h < d.H; ++h) {
        const T* in = g_v + s_gv.at(n, c, b, h);
        T* out = d_row + d.n_kq + h * d.dv;
        for (int j = 0; j < d.dv; ++j) out[j] = in[j];
        if (d.delta) {
          const T sig = beta[s_b.at(n, c, b, h)];
          d_row[d.n_kq + d.n_v + h] = g_b[s_gb.at(n, c, b, h)] * sig * (T(1) - sig);
        }
      }
    }
  }
}

// sizes: T, B, C, H, d_key, d_v, dpfp (0/1), nu, delta (0/1)
Dims dims(const long* sizes) {
  Dims d;
  d.T = sizes[0];
  d.B = sizes[1];
  d.C = sizes[2];
  d.H = int(sizes[3]);
  d.dk = int(sizes[4]);
  d.dv = int(sizes[5]);
  d.dpfp = sizes[6] != 0;
  d.nu = int(sizes[7]);
  d.delta = sizes[8] != 0;
  d.dphi = d.dpfp ? 2 * d.dk * d.nu : d.dk;
  d.n_kq = 2 * d.H * d.dk;
  d.n_v = d.H * d.dv;
  d.F = d.n_kq + d.n_v + (d.delta ? d.H : 0);
  return d;
}

Strides strides(const long* s) { return Strides{s[0], s[1], s[2], s[3]}; }

template <typename T>
void forward_entry(const T* z, const long* sizes, double eps, T* k, T* q, T* v, T* beta,
                   const long* s) {
  forward<T>(dims(sizes), T(eps), z, k, q, strides(s), v, strides(s + 4), beta, strides(s + 8));
}

template <typename T>
void backward_entry(const T* z, const long* sizes, double eps, const T* beta, const T* g_k,
                    const T* g_q, const T* g_v, const T* g_beta, const long* s, T* dz) {
  // s: beta (saved), then the gradients of keys and queries, values, beta
  backward<T>(dims(sizes), T(eps), z, beta, strides(s), g_k, g_q, strides(s + 4), g_v,
              strides(s + 8), g_beta, strides(s + 12), dz);
}

}  // namespace

#include "common.h"

// sizes[9]: T, B, C, H, d_key, d_v, dpfp, nu, delta. strides[12]: (n, b, h, c) of the keys and
// queries, the values and beta.
EXPORT void fwp_heads_forward_f32(const float* z, const long* sizes, double eps, float* k,
                                  float* q, float* v, float* beta, const long* strides) {
  forward_entry<float>(z, sizes, eps, k, q, v, beta, strides);
}

EXPORT void fwp_heads_forward_f64(const double* z, const long* sizes, double eps, double* k,
                                  double* q, double* v, double* beta, const long* strides) {
  forward_entry<double>(z, sizes, eps, k, q, v, beta, strides);
}

// strides[16]: (n, b, h, c) of the saved beta, then of the gradients of the keys and queries,
// the values and beta.
EXPORT void fwp_heads_backward_f32(const float* z, const long* sizes, double eps,
                                   const float* beta, const float* g_k, const float* g_q,
                                   const float* g_v, const float* g_beta, const long* strides,
                                   float* dz) {
  backward_entry<float>(z, sizes, eps, beta, g_k, g_q, g_v, g_beta, strides, dz);
}

EXPORT void fwp_heads_backward_f64(const double* z, const long* sizes, double eps,
                                   const double* beta, const double* g_k, const double* g_q,
                                   const double* g_v, const double* g_beta, const long* strides,
                                   double* dz) {
  backward_entry<double>(z, sizes, eps, beta, g_k, g_q, g_v, g_beta, strides, dz);
}
