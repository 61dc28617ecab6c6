// The fast-weight core's slow-net heads (memagents/cores/fwp.py, _SlowNetHeads), forward and
// hand-derived backward, one call each over all rows.
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

#include <cmath>
#include <vector>

namespace {

struct Dims {
  long M;     // rows (all leading axes)
  long F;     // row length of z: 2 H dk + H dv (+ H)
  int H, dk, dv, nu;
  bool dpfp, delta;
  int dphi;   // 2 dk nu (DPFP) or dk (ELU + 1)
  int n_kq;   // 2 H dk
  int n_v;    // H dv
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
T features(const Dims& d, const T* __restrict x, T* __restrict r, T* __restrict phi) {
  if (d.dpfp) {
    const int n = 2 * d.dk;
    for (int j = 0; j < d.dk; ++j) {
      r[j] = x[j] > T(0) ? x[j] : T(0);
      r[d.dk + j] = -x[j] > T(0) ? -x[j] : T(0);
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
void forward(const Dims& d, T eps, const T* z, T* kq, T* v, T* beta) {
  std::vector<T> r(2 * d.dk), phi(d.dphi);
  for (long m = 0; m < d.M; ++m) {
    const T* row = z + m * d.F;
    for (int h = 0; h < 2 * d.H; ++h) {
      const T s = features(d, row + h * d.dk, r.data(), phi.data());
      const T c = T(1) / (s > eps ? s : eps);
      T* out = kq + (m * 2 * d.H + h) * d.dphi;
      for (int j = 0; j < d.dphi; ++j) out[j] = phi[j] * c;
    }
    T* v_row = v + m * d.n_v;
    for (int j = 0; j < d.n_v; ++j) v_row[j] = row[d.n_kq + j];
    if (d.delta) {
      T* b_row = beta + m * d.H;
      for (int j = 0; j < d.H; ++j) b_row[j] = T(1) / (T(1) + std::exp(-row[d.n_kq + d.n_v + j]));
    }
  }
}

template <typename T>
void backward(const Dims& d, T eps, const T* z, const T* beta, const T* g_kq, const T* g_v,
              const T* g_beta, T* dz) {
  std::vector<T> r_(2 * d.dk), phi_(d.dphi), dr_(2 * d.dk), dphi_(2 * d.dk);
  T *r = r_.data(), *phi = phi_.data(), *dr = dr_.data(), *dphi = dphi_.data();
  const int n = 2 * d.dk;
  for (long m = 0; m < d.M; ++m) {
    const T* row = z + m * d.F;
    T* d_row = dz + m * d.F;
    for (int h = 0; h < 2 * d.H; ++h) {
      const T* x = row + h * d.dk;
      T* dx = d_row + h * d.dk;
      const T* g = g_kq + (m * 2 * d.H + h) * d.dphi;
      const T s = features(d, x, r, phi);
      const T c = T(1) / (s > eps ? s : eps);
      T dot = 0;  // g . phi' = c (g . phi), only where the clamp is inactive
      if (s >= eps) dot = c * dot8(g, phi, d.dphi);
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
        for (int j = 0; j < d.dk; ++j) {
          dx[j] = (x[j] > T(0) ? dr[j] : T(0)) - (x[j] < T(0) ? dr[d.dk + j] : T(0));
        }
      } else {
        for (int j = 0; j < d.dk; ++j) {
          const T dp = c * (g[j] - dot);
          dx[j] = x[j] > T(0) ? dp : dp * std::exp(x[j]);
        }
      }
    }
    const T* gv_row = g_v + m * d.n_v;
    for (int j = 0; j < d.n_v; ++j) d_row[d.n_kq + j] = gv_row[j];
    if (d.delta) {
      const T* b_row = beta + m * d.H;
      const T* gb_row = g_beta + m * d.H;
      for (int j = 0; j < d.H; ++j) {
        d_row[d.n_kq + d.n_v + j] = gb_row[j] * b_row[j] * (T(1) - b_row[j]);
      }
    }
  }
}

Dims dims(long M, int H, int dk, int dv, int dpfp, int nu, int delta) {
  Dims d;
  d.M = M;
  d.H = H;
  d.dk = dk;
  d.dv = dv;
  d.nu = nu;
  d.dpfp = dpfp != 0;
  d.delta = delta != 0;
  d.dphi = d.dpfp ? 2 * dk * nu : dk;
  d.n_kq = 2 * H * dk;
  d.n_v = H * dv;
  d.F = d.n_kq + d.n_v + (d.delta ? H : 0);
  return d;
}

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT void fwp_heads_forward_f32(const float* z, long M, int H, int dk, int dv, int dpfp, int nu,
                                  int delta, double eps, float* kq, float* v, float* beta) {
  forward<float>(dims(M, H, dk, dv, dpfp, nu, delta), float(eps), z, kq, v, beta);
}

EXPORT void fwp_heads_forward_f64(const double* z, long M, int H, int dk, int dv, int dpfp, int nu,
                                  int delta, double eps, double* kq, double* v, double* beta) {
  forward<double>(dims(M, H, dk, dv, dpfp, nu, delta), eps, z, kq, v, beta);
}

EXPORT void fwp_heads_backward_f32(const float* z, long M, int H, int dk, int dv, int dpfp, int nu,
                                   int delta, double eps, const float* beta, const float* g_kq,
                                   const float* g_v, const float* g_beta, float* dz) {
  backward<float>(dims(M, H, dk, dv, dpfp, nu, delta), float(eps), z, beta, g_kq, g_v, g_beta, dz);
}

EXPORT void fwp_heads_backward_f64(const double* z, long M, int H, int dk, int dv, int dpfp, int nu,
                                   int delta, double eps, const double* beta, const double* g_kq,
                                   const double* g_v, const double* g_beta, double* dz) {
  backward<double>(dims(M, H, dk, dv, dpfp, nu, delta), eps, z, beta, g_kq, g_v, g_beta, dz);
}
