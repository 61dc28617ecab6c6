// One NTM memory-access step (Graves, Wayne & Danihelka 2014, "Neural Turing Machines",
// arXiv:1410.5401, section 3), forward and hand-derived backward, one call each over the batch.
//
// Per batch element, with H (write head, read head) pairs over an N x W memory:
//   1. write weightings w^w_t on M_{t-1}: content (eqs. 5-6), interpolation (eq. 7),
//      circular shift over -S..S (eq. 8), sharpening (eq. 9);
//   2. M_t = M_{t-1} * prod_h (1 - w^w_h e_h^T) + sum_h w^w_h a_h^T          (eqs. 3-4);
//   3. read weightings w^r_t on M_t, the same four stages;
//   4. r_h = M_t^T w^r_h                                                     (eq. 2).
// The head parameters arrive raw (pre-activation), packed per batch element as in
// memagents/cores/ntm_access.py (head_sizes):
//   read : key H*W | beta H | gate H | shift H*K | gamma H
//   write: key H*W | beta H | gate H | shift H*K | gamma H | erase H*W | add H*W
// with beta = softplus, gate = sigmoid, shift = softmax over K = 2S+1, gamma = 1 + softplus,
// erase = sigmoid, add and key raw. softplus follows torch (x > 20 gives x).
//
// ntm_step_forward / ntm_step_backward wrap one whole step of the core around it for NTMSequence:
// the controller's LSTM cell (from the gates' pre-activations), the head layer, the access.
//
// The forward optionally fills a workspace (per element: the memory row norms of M_{t-1} and M_t,
// then per pass and head the similarities, content, gated and shifted weightings, the shift
// distribution and the activated scalars) that the backward reads instead of recomputing.

#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

constexpr double kEps = 1e-6;  // addressing.EPSILON: under the norms' sqrt and before sharpening

template <typename T>
inline T softplus_grad(T x) {
  if (x > T(20)) return T(1);
  const T z = std::exp(x);
  return z / (z + T(1));
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): a few times cheaper than libm's tanh, which
// goes through expm1; near 0 the error is absolute (~1 ulp of 1), not relative.
template <typename T>
inline T fast_tanh(T x) {
  const T e = std::exp(T(-2) * std::fabs(x));
  const T t = (T(1) - e) / (T(1) + e);
  return x < T(0) ? -t : t;
}

struct Dims {
  long B;
  int N, W, H, S, K;
  int read_size;   // H*W + 3H + H*K
  int erase_offset;  // erase H*W then add H*W follow the write head's addressing block
  int param_size;    // 2 * read_size + 2*H*W
  int head_ws;     // workspace per (pass, head): sim, wc, wg, wt [N each], s [K], kn beta g gamma
  long ws_size;    // per batch element: 2N norms + 2 passes * H heads * head_ws
  long vec_stride;  // distance between batch elements' read vectors r (H*W when packed)

  Dims(long b, int n, int w, int h, int s, long vs = 0)
      : B(b), N(n), W(w), H(h), S(s), K(2 * s + 1), vec_stride(vs ? vs : long(h) * w) {
    read_size = H * W + 3 * H + H * K;
    erase_offset = 2 * read_size;
    param_size = 2 * read_size + 2 * H * W;
    head_ws = 4 * N + K + 4;
    ws_size = 2L * N + 2L * H * head_ws;
  }
};

// Raw parameters of one head of one pass, read from the packed parameter row.
template <typename T>
struct HeadParams {
  const T* key;  // [W]
  T beta_raw, gate_raw, gamma_raw;
  const T* shift_raw;  // [K]
};

template <typename T>
HeadParams<T> head_params(const T* row, const Dims& d, int pass, int h) {
  // pass 0 = write (second block), pass 1 = read (first block)
  const T* base = pass == 0 ? row + d.read_size : row;
  const int HW = d.H * d.W;
  HeadParams<T> p;
  p.key = base + h * d.W;
  p.beta_raw = base[HW + h];
  p.gate_raw = base[HW + d.H + h];
  p.shift_raw = base + HW + 2 * d.H + h * d.K;
  p.gamma_raw = base[HW + 2 * d.H + d.H * d.K + h];
  return p;
}

// Offsets of a head's gradient slots in the packed gradient row (same layout).
struct HeadSlots {
  int key, beta, gate, shift, gamma;
};

inline HeadSlots head_slots(const Dims& d, int pass, int h) {
  const int base = pass == 0 ? d.read_size : 0;
  const int HW = d.H * d.W;
  return {base + h * d.W, base + HW + h, base + HW + d.H + h, base + HW + 2 * d.H + h * d.K,
          base + HW + 2 * d.H + d.H * d.K + h};
}

// sum_j a[j] b[j] with eight independent partial sums, so that the compiler vectorises it (a
// plain running sum is one serial chain: no reassociation without -ffast-math).
template <typename T>
inline T dot(const T* a, const T* b, int n) {
  T acc[8] = {};
  int j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[j + u] * b[j + u];
  T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

template <typename T>
inline T sum(const T* a, int n) {
  T acc[8] = {};
  int j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[j + u];
  T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) s += a[j];
  return s;
}

// pad[p] = x[(p - S) mod N] for p in [0, N + 2S): circular padding, so that the shift of eq. 8
// reads pad[i - k + 2S] = x[(i - (k - S)) mod N] without a modulo in the inner loop (S < N).
template <typename T>
inline void circular_pad(const T* x, int N, int S, T* pad) {
  for (int p = 0; p < S; ++p) pad[p] = x[N - S + p];
  for (int i = 0; i < N; ++i) pad[S + i] = x[i];
  for (int p = 0; p < S; ++p) pad[N + S + p] = x[p];
}

template <typename T>
void row_norms(const T* M, int N, int W, T* mn) {
  for (int i = 0; i < N; ++i) mn[i] = std::sqrt(dot(M + i * W, M + i * W, W) + T(kEps));
}

// The four addressing stages for one head (section 3.3); writes the weighting to `out` [N] and
// the intermediates to `ws` [head_ws]; `pad` is scratch of N + 2S.
template <typename T>
void address_forward(const Dims& d, const T* M, const T* mn, const T* prev, const HeadParams<T>& p,
                     T* out, T* ws, T* pad) {
  const int N = d.N, W = d.W, K = d.K, S = d.S;
  T* sim = ws;
  T* wc = ws + N;
  T* wg = ws + 2 * N;
  T* wt = ws + 3 * N;
  T* s = ws + 4 * N;
  T* scal = ws + 4 * N + K;

  const T kn = std::sqrt(dot(p.key, p.key, W) + T(kEps));
  const T beta = softplus(p.beta_raw);
  const T g = sigmoid(p.gate_raw);
  const T gamma = T(1) + softplus(p.gamma_raw);
  scal[0] = kn;
  scal[1] = beta;
  scal[2] = g;
  scal[3] = gamma;

  // content weighting w^c = softmax(beta * cos(k, M[i]))  (eqs. 5-6)
  T zmax = -INFINITY;
  for (int i = 0; i < N; ++i) {
    sim[i] = dot(p.key, M + i * W, W) / (kn * mn[i]);
    const T z = sim[i] * beta;
    if (z > zmax) zmax = z;
  }
  for (int i = 0; i < N; ++i) wc[i] = std::exp(sim[i] * beta - zmax);
  const T zsum = sum(wc, N);
  for (int i = 0; i < N; ++i) wc[i] /= zsum;

  // interpolation w^g = w_{t-1} + g (w^c - w_{t-1})  (eq. 7)
  for (int i = 0; i < N; ++i) wg[i] = prev[i] + g * (wc[i] - prev[i]);

  // shift distribution s = softmax(raw) over shifts -S..S
  T smax = -INFINITY;
  for (int k = 0; k < K; ++k)
    if (p.shift_raw[k] > smax) smax = p.shift_raw[k];
  T ssum = 0;
  for (int k = 0; k < K; ++k) {
    s[k] = std::exp(p.shift_raw[k] - smax);
    ssum += s[k];
  }
  for (int k = 0; k < K; ++k) s[k] /= ssum;

  // circular convolution w~[i] = sum_k w^g[(i - (k - S)) mod N] s[k]  (eq. 8)
  circular_pad(wg, N, S, pad);
  for (int i = 0; i < N; ++i) wt[i] = 0;
  for (int k = 0; k < K; ++k) {
    const T sk = s[k];
    const T* src = pad + 2 * S - k;
    for (int i = 0; i < N; ++i) wt[i] += src[i] * sk;
  }

  // sharpening w = (w~ + eps)^gamma / sum  (eq. 9)
  for (int i = 0; i < N; ++i) out[i] = std::pow(wt[i] + T(kEps), gamma);
  const T psum = sum(out, N);
  for (int i = 0; i < N; ++i) out[i] /= psum;
}

// Backward of address_forward: given gw [N] (gradient of the weighting `w`), accumulates into
// gM [N, W] and writes gprev [N] and the head's slots of the packed gradient row. `scratch`
// holds 4N + 4S.
template <typename T>
void address_backward(const Dims& d, const T* M, const T* mn, const HeadParams<T>& p,
                      const T* prev, const T* w, const T* ws, const T* gw, T* gM, T* gprev,
                      T* grow, const HeadSlots& slot, T* scratch) {
  const int N = d.N, W = d.W, K = d.K, S = d.S;
  const T* sim = ws;
  const T* wc = ws + N;
  const T* wg = ws + 2 * N;
  const T* wt = ws + 3 * N;
  const T* s = ws + 4 * N;
  const T* scal = ws + 4 * N + K;
  const T kn = scal[0], beta = scal[1], g = scal[2], gamma = scal[3];
  T* gwt = scratch;                // [N]; then t * log(base)
  T* gwg = scratch + N;            // [N]
  T* pad = scratch + 2 * N;        // [N + 2S]
  T* gpad = scratch + 3 * N + 2 * S;  // [N + 2S]

  // sharpening: w = p / sum p, p = (w~ + eps)^gamma; t_i = p_i dL/dp_i = w_i (gw_i - <gw, w>)
  const T c = dot(gw, w, N);
  for (int i = 0; i < N; ++i) {
    const T t = w[i] * (gw[i] - c);
    const T base = wt[i] + T(kEps);
    gwt[i] = gamma * t / base;
    gwg[i] = t * std::log(base);
  }
  grow[slot.gamma] = sum(gwg, N) * softplus_grad(p.gamma_raw);

  // circular shift: gs[k] = sum_i gwt[i] wg[i - k + S];  gwg[j] = sum_k gwt[j + k - S] s[k]
  circular_pad(wg, N, S, pad);
  T* gs = grow + slot.shift;
  T gs_dot_s = 0;
  for (int k = 0; k < K; ++k) {
    gs[k] = dot(gwt, pad + 2 * S - k, N);
    gs_dot_s += gs[k] * s[k];
  }
  for (int k = 0; k < K; ++k) gs[k] = s[k] * (gs[k] - gs_dot_s);  // softmax
  circular_pad(gwt, N, S, gpad);
  for (int j = 0; j < N; ++j) gwg[j] = 0;
  for (int k = 0; k < K; ++k) {
    const T sk = s[k];
    const T* src = gpad + k;
    for (int j = 0; j < N; ++j) gwg[j] += src[j] * sk;
  }

  // interpolation w^g = w_{t-1} + g (w^c - w_{t-1})
  T* gz = pad;  // reuse: [N]
  for (int i = 0; i < N; ++i) gz[i] = gwg[i] * (wc[i] - prev[i]);
  grow[slot.gate] = sum(gz, N) * g * (T(1) - g);
  for (int i = 0; i < N; ++i) gprev[i] = (T(1) - g) * gwg[i];

  // content softmax: gz = wc * (gwc - <gwc, wc>) with gwc = g * gwg
  const T cc = g * dot(gwg, wc, N);
  for (int i = 0; i < N; ++i) gz[i] = wc[i] * (g * gwg[i] - cc);
  grow[slot.beta] = dot(gz, sim, N) * softplus_grad(p.beta_raw);

  // cosine similarity sim_i = k.M_i / (|k| |M_i|), |x| = sqrt(x.x + eps)
  T* gkey = grow + slot.key;
  for (int w = 0; w < W; ++w) gkey[w] = 0;
  T gss = 0;  // sum_i gsim_i sim_i
  for (int i = 0; i < N; ++i) {
    const T gsim = gz[i] * beta;
    const T gdot = gsim / (kn * mn[i]);
    const T gsm = gsim * sim[i];
    gss += gsm;
    const T row_coef = gsm / (mn[i] * mn[i]);
    const T* Mi = M + i * W;
    T* gMi = gM + i * W;
    for (int w = 0; w < W; ++w) {
      gkey[w] += gdot * Mi[w];
      gMi[w] += gdot * p.key[w] - Mi[w] * row_coef;
    }
  }
  const T key_coef = gss / (kn * kn);
  for (int w = 0; w < W; ++w) gkey[w] -= p.key[w] * key_coef;
}

template <typename T>
void forward(const Dims& d, const T* memory, const T* read_prev, const T* write_prev,
             const T* params, T* memory_out, T* write_out, T* read_out, T* read_vectors,
             T* workspace) {
  const int N = d.N, W = d.W, H = d.H;
  const long NW = long(N) * W, HN = long(H) * N;
  std::vector<T> local(workspace ? 0 : d.ws_size);
  std::vector<T> erase(H * W), keep(W), added(W), pad(N + 2 * d.S);
  for (long b = 0; b < d.B; ++b) {
    const T* M0 = memory + b * NW;
    T* M1 = memory_out + b * NW;
    const T* row = params + b * d.param_size;
    T* ws = workspace ? workspace + b * d.ws_size : local.data();
    T* mn0 = ws;
    T* mn1 = ws + N;
    T* heads_ws = ws + 2 * N;
    T* ww = write_out + b * HN;
    T* wr = read_out + b * HN;

    // 1. write weightings on M_{t-1}
    row_norms(M0, N, W, mn0);
    for (int h = 0; h < H; ++h)
      address_forward(d, M0, mn0, write_prev + b * HN + h * N, head_params(row, d, 0, h),
                      ww + h * N, heads_ws + h * d.head_ws, pad.data());

    // 2. erase then add: M_t[i] = M_{t-1}[i] * prod_h (1 - w_h[i] e_h) + sum_h w_h[i] a_h
    const T* erase_raw = row + d.erase_offset;
    const T* add = erase_raw + H * W;
    for (int j = 0; j < H * W; ++j) erase[j] = sigmoid(erase_raw[j]);
    for (int i = 0; i < N; ++i) {
      const T w0 = ww[i];
      for (int w = 0; w < W; ++w) {
        keep[w] = T(1) - w0 * erase[w];
        added[w] = w0 * add[w];
      }
      for (int h = 1; h < H; ++h) {
        const T wh = ww[h * N + i];
        const T* eh = erase.data() + h * W;
        const T* ah = add + h * W;
        for (int w = 0; w < W; ++w) {
          keep[w] *= T(1) - wh * eh[w];
          added[w] += wh * ah[w];
        }
      }
      for (int w = 0; w < W; ++w) M1[i * W + w] = M0[i * W + w] * keep[w] + added[w];
    }

    // 3. read weightings on M_t
    row_norms(M1, N, W, mn1);
    for (int h = 0; h < H; ++h)
      address_forward(d, M1, mn1, read_prev + b * HN + h * N, head_params(row, d, 1, h),
                      wr + h * N, heads_ws + (H + h) * d.head_ws, pad.data());

    // 4. read vectors r_h = M_t^T w^r_h (eq. 2)
    T* r = read_vectors + b * d.vec_stride;
    for (int h = 0; h < H; ++h) {
      T* rh = r + h * W;
      for (int w = 0; w < W; ++w) rh[w] = 0;
      for (int i = 0; i < N; ++i) {
        const T wi = wr[h * N + i];
        for (int w = 0; w < W; ++w) rh[w] += wi * M1[i * W + w];
      }
    }
  }
}

template <typename T>
void backward(const Dims& d, const T* memory, const T* read_prev, const T* write_prev,
              const T* params, const T* memory_out, const T* write_out, const T* read_out,
              const T* workspace, const T* g_memory_out, const T* g_write_out,
              const T* g_read_out, const T* g_read_vectors, T* g_memory, T* g_read_prev,
              T* g_write_prev, T* g_params) {
  const int N = d.N, W = d.W, H = d.H;
  const long NW = long(N) * W, HN = long(H) * N;
  std::vector<T> gM1(NW), gw(N), scratch(4 * N + 4 * d.S), erase(H * W), gerase(H * W);
  std::vector<T> gww(HN), factors(H * W), gk(W), others(W), gf(W), tmp(W);
  for (long b = 0; b < d.B; ++b) {
    const T* M0 = memory + b * NW;
    const T* M1 = memory_out + b * NW;
    const T* row = params + b * d.param_size;
    const T* ws = workspace + b * d.ws_size;
    const T* mn0 = ws;
    const T* mn1 = ws + N;
    const T* heads_ws = ws + 2 * N;
    const T* ww = write_out + b * HN;
    const T* wr = read_out + b * HN;
    const T* gr = g_read_vectors + b * d.vec_stride;
    T* gM0 = g_memory + b * NW;
    T* grow = g_params + b * d.param_size;

    // 4. read vectors: gM_t += w^r_h g_r_h^T
    std::memcpy(gM1.data(), g_memory_out + b * NW, sizeof(T) * NW);
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < N; ++i) {
        const T wi = wr[h * N + i];
        const T* grh = gr + h * W;
        T* gMi = gM1.data() + i * W;
        for (int w = 0; w < W; ++w) gMi[w] += wi * grh[w];
      }

    // 3. read addressing (on M_t), gw = g_{w^r} + M_t g_r
    for (int h = 0; h < H; ++h) {
      for (int i = 0; i < N; ++i)
        gw[i] = g_read_out[b * HN + h * N + i] + dot(M1 + i * W, gr + h * W, W);
      address_backward(d, M1, mn1, head_params(row, d, 1, h), read_prev + b * HN + h * N,
                       wr + h * N, heads_ws + (H + h) * d.head_ws, gw.data(), gM1.data(),
                       g_read_prev + b * HN + h * N, grow, head_slots(d, 1, h), scratch.data());
    }

    // 2. erase and add, with factors f_h = 1 - w_h[i] e_h
    const T* erase_raw = row + d.erase_offset;
    const T* add = erase_raw + H * W;
    T* gadd = grow + d.erase_offset + H * W;
    for (int j = 0; j < H * W; ++j) {
      erase[j] = sigmoid(erase_raw[j]);
      gerase[j] = 0;
      gadd[j] = 0;
    }
    std::memcpy(gww.data(), g_write_out + b * HN, sizeof(T) * HN);
    for (int i = 0; i < N; ++i) {
      const T* g = gM1.data() + i * W;
      for (int h = 0; h < H; ++h) {
        const T wh = ww[h * N + i];
        for (int w = 0; w < W; ++w) factors[h * W + w] = T(1) - wh * erase[h * W + w];
      }
      for (int w = 0; w < W; ++w) {
        T keep = factors[w];
        for (int h = 1; h < H; ++h) keep *= factors[h * W + w];
        gM0[i * W + w] = g[w] * keep;
        gk[w] = g[w] * M0[i * W + w];
      }
      for (int h = 0; h < H; ++h) {
        const T wh = ww[h * N + i];
        const T* eh = erase.data() + h * W;
        const T* ah = add + h * W;
        for (int w = 0; w < W; ++w) others[w] = T(1);
        for (int o = 0; o < H; ++o)
          if (o != h)
            for (int w = 0; w < W; ++w) others[w] *= factors[o * W + w];
        for (int w = 0; w < W; ++w) {
          gf[w] = gk[w] * others[w];  // gradient of the factor f_h[i, w]
          tmp[w] = g[w] * ah[w] - gf[w] * eh[w];
          gerase[h * W + w] -= gf[w] * wh;
          gadd[h * W + w] += g[w] * wh;
        }
        gww[h * N + i] += sum(tmp.data(), W);
      }
    }
    for (int j = 0; j < H * W; ++j)
      grow[d.erase_offset + j] = gerase[j] * erase[j] * (T(1) - erase[j]);

    // 1. write addressing (on M_{t-1})
    for (int h = 0; h < H; ++h)
      address_backward(d, M0, mn0, head_params(row, d, 0, h), write_prev + b * HN + h * N,
                       ww + h * N, heads_ws + h * d.head_ws, gww.data() + h * N, gM0,
                       g_write_prev + b * HN + h * N, grow, head_slots(d, 0, h), scratch.data());
  }
}

// -- the controller's LSTM cell, pointwise part (Hochreiter & Schmidhuber 1997; torch's gate order) --
// gates [B, 4Hd] holds the pre-activations i, f, g, o on entry and sigmoid(i), sigmoid(f),
// tanh(g), sigmoid(o) on exit; c = f c_prev + i g, h = o tanh(c). h is written with row stride
// h_stride (so that it can land in the core's output row [h; r]).
template <typename T>
void lstm_forward(long B, int Hd, T* gates, const T* c_prev, T* c_out, T* h_out, long h_stride) {
  for (long b = 0; b < B; ++b) {
    T* gi = gates + b * 4 * Hd;
    T* gf = gi + Hd;
    T* gg = gi + 2 * Hd;
    T* go = gi + 3 * Hd;
    const T* cp = c_prev + b * Hd;
    T* c = c_out + b * Hd;
    T* h = h_out + b * h_stride;
    for (int j = 0; j < Hd; ++j) {
      gi[j] = sigmoid(gi[j]);
      gf[j] = sigmoid(gf[j]);
      gg[j] = fast_tanh(gg[j]);
      go[j] = sigmoid(go[j]);
      c[j] = gf[j] * cp[j] + gi[j] * gg[j];
      h[j] = go[j] * fast_tanh(c[j]);
    }
  }
}

// Backward of lstm_forward. gc holds the gradient of c on entry and that of c_prev on exit;
// g_gates [B, 4Hd] receives the gradient of the pre-activations.
template <typename T>
void lstm_backward(long B, int Hd, const T* act, const T* c_prev, const T* c, const T* gh,
                   long gh_stride, T* gc, T* g_gates) {
  for (long b = 0; b < B; ++b) {
    const T* ai = act + b * 4 * Hd;
    const T* af = ai + Hd;
    const T* ag = ai + 2 * Hd;
    const T* ao = ai + 3 * Hd;
    const T* cp = c_prev + b * Hd;
    const T* cb = c + b * Hd;
    const T* ghb = gh + b * gh_stride;
    T* gcb = gc + b * Hd;
    T* gi = g_gates + b * 4 * Hd;
    T* gf = gi + Hd;
    T* gg = gi + 2 * Hd;
    T* go = gi + 3 * Hd;
    for (int j = 0; j < Hd; ++j) {
      const T tc = fast_tanh(cb[j]);
      const T gct = gcb[j] + ghb[j] * ao[j] * (T(1) - tc * tc);
      go[j] = ghb[j] * tc * ao[j] * (T(1) - ao[j]);
      gi[j] = gct * ag[j] * ai[j] * (T(1) - ai[j]);
      gf[j] = gct * cp[j] * af[j] * (T(1) - af[j]);
      gg[j] = gct * ai[j] * (T(1) - ag[j] * ag[j]);
      gcb[j] = gct * af[j];
    }
  }
}

// -- one whole step of the core after the gates' matrix product (NTMSequence) ----------------------
// Forward: LSTM cell (h_t into y[:, :Hd], row stride D = Hd + H*W), raw head parameters
// params = b_heads + h_t w_heads^T (w_heads [P, Hd]), then the access (r_t into y[:, Hd:]).
template <typename T>
void step_forward(const Dims& d, int Hd, T* gates, const T* c_prev, T* c_out, T* y,
                  const T* w_heads, const T* b_heads, T* params, const T* memory,
                  const T* read_prev, const T* write_prev, T* memory_out, T* write_out,
                  T* read_out, T* workspace) {
  const long D = d.vec_stride;
  const int P = d.param_size;
  lstm_forward(d.B, Hd, gates, c_prev, c_out, y, D);
  for (long b = 0; b < d.B; ++b) {
    T* row = params + b * P;
    const T* h = y + b * D;
    for (int q = 0; q < P; ++q) row[q] = b_heads[q] + dot(h, w_heads + long(q) * Hd, Hd);
  }
  forward(d, memory, read_prev, write_prev, params, memory_out, write_out, read_out, y + Hd,
          workspace);
}

// Backward of step_forward. g_y [B, D] is the gradient of this step's output row and g_z [B, D]
// that of the same row as the next step's input; the gradients of the access state (g_memory,
// g_write, g_read) and of the cell (g_cell) are read as those of this step's outputs and
// overwritten with those of its inputs (in place: each batch element's outputs are read before
// its inputs are written). g_params [B, P] and g_gates [B, 4Hd] receive the gradients of the
// head parameters and of the gates' pre-activations.
template <typename T>
void step_backward(const Dims& d, int Hd, const T* act, const T* c_prev, const T* c,
                   const T* w_heads, const T* memory, const T* read_prev, const T* write_prev,
                   const T* params, const T* memory_out, const T* write_out, const T* read_out,
                   const T* workspace, const T* g_y, const T* g_z, T* g_memory, T* g_write,
                   T* g_read, T* g_cell, T* g_params, T* g_gates) {
  const long D = d.vec_stride;
  const int P = d.param_size;
  std::vector<T> g_row(d.B * D), g_h(d.B * Hd);
  for (long j = 0; j < d.B * D; ++j) g_row[j] = g_y[j] + g_z[j];
  backward(d, memory, read_prev, write_prev, params, memory_out, write_out, read_out, workspace,
           g_memory, g_write, g_read, g_row.data() + Hd, g_memory, g_read, g_write, g_params);
  for (long b = 0; b < d.B; ++b) {  // g_h = g_y[:, :Hd] + g_params w_heads
    T* gh = g_h.data() + b * Hd;
    for (int j = 0; j < Hd; ++j) gh[j] = g_row[b * D + j];
    const T* gp = g_params + b * P;
    for (int q = 0; q < P; ++q) {
      const T gq = gp[q];
      const T* wq = w_heads + long(q) * Hd;
      for (int j = 0; j < Hd; ++j) gh[j] += gq * wq[j];
    }
  }
  lstm_backward(d.B, Hd, act, c_prev, c, g_h.data(), Hd, g_cell, g_gates);
}

}  // namespace

#define NTM_EXPORT EXPORT  // (common.h; the name keeps the macro's alignment)

#define NTM_INSTANTIATE(T, SUFFIX)                                                              \
  NTM_EXPORT long ntm_workspace_size_##SUFFIX(int N, int W, int H, int S) {                     \
    return Dims(1, N, W, H, S).ws_size;                                                         \
  }                                                                                             \
  NTM_EXPORT void ntm_forward_##SUFFIX(long B, int N, int W, int H, int S, long vec_stride,     \
                                       const T* memory, const T* read_prev, const T* write_prev, \
                                       const T* params, T* memory_out, T* write_out,            \
                                       T* read_out, T* read_vectors, T* workspace) {            \
    forward(Dims(B, N, W, H, S, vec_stride), memory, read_prev, write_prev, params, memory_out, \
            write_out, read_out, read_vectors, workspace);                                      \
  }                                                                                             \
  NTM_EXPORT void ntm_backward_##SUFFIX(                                                        \
      long B, int N, int W, int H, int S, long vec_stride, const T* memory, const T* read_prev, \
      const T* write_prev, const T* params, const T* memory_out, const T* write_out,            \
      const T* read_out, const T* workspace, const T* g_memory_out, const T* g_write_out,       \
      const T* g_read_out, const T* g_read_vectors, T* g_memory, T* g_read_prev,                \
      T* g_write_prev, T* g_params) {                                                           \
    backward(Dims(B, N, W, H, S, vec_stride), memory, read_prev, write_prev, params,            \
             memory_out, write_out, read_out, workspace, g_memory_out, g_write_out, g_read_out, \
             g_read_vectors, g_memory, g_read_prev, g_write_prev, g_params);                    \
  }                                                                                             \
  NTM_EXPORT void ntm_step_forward_##SUFFIX(                                                    \
      long B, int N, int W, int H, int S, int Hd, T* gates, const T* c_prev, T* c_out, T* y,    \
      const T* w_heads, const T* b_heads, T* params, const T* memory, const T* read_prev,       \
      const T* write_prev, T* memory_out, T* write_out, T* read_out, T* workspace) {            \
    step_forward(Dims(B, N, W, H, S, Hd + long(H) * W), Hd, gates, c_prev, c_out, y, w_heads,   \
                 b_heads, params, memory, read_prev, write_prev, memory_out, write_out,         \
                 read_out, workspace);                                                          \
  }                                                                                             \
  NTM_EXPORT void ntm_step_backward_##SUFFIX(                                                   \
      long B, int N, int W, int H, int S, int Hd, const T* act, const T* c_prev, const T* c,    \
      const T* w_heads, const T* memory, const T* read_prev, const T* write_prev,               \
      const T* params, const T* memory_out, const T* write_out, const T* read_out,              \
      const T* workspace, const T* g_y, const T* g_z, T* g_memory, T* g_write, T* g_read,       \
      T* g_cell, T* g_params, T* g_gates) {                                                     \
    step_backward(Dims(B, N, W, H, S, Hd + long(H) * W), Hd, act, c_prev, c, w_heads, memory,   \
                  read_prev, write_prev, params, memory_out, write_out, read_out, workspace,    \
                  g_y, g_z, g_memory, g_write, g_read, g_cell, g_params, g_gates);              \
  }

NTM_INSTANTIATE(float, f32)
NTM_INSTANTIATE(double, f64)
