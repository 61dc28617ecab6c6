// Sparse memory access of SAM (Rae et al. 2016, "Scaling Memory-Augmented Neural Networks with
// Sparse Reads and Writes", section 3): the in-place sparse write, the exact cosine top-K search,
// the sparse content read forward and the step's backward, and the usage / LRU update (3.3).
//
// The equations, their order and the EPSILON handling are those of the torch reference in
// memagents/cores/sparse_access.py (SparseAccessStep, ExactIndex, sparse_read_forward /
// sparse_read_backward, usage_update, least_recently_used); tests compare both in float64.
// Shapes (row-major, contiguous; int64 indices):
//   B batch, N memory rows, W word size, R read heads, K rows per read head, J write entries (the
//   last one is the LRU row I^U_t, which is erased first), E extra rows (the SDNC's link reads).
//   memory [B, N, W], sqnorm [B, N] (|M[i]|^2 per row, kept up to date by the write),
//   write_vector a [B, W], write_weights [B, J], write_idx [B, J], reset [B] uint8 (1 = the
//   element's memory is zeroed before the write), keys [B, R, W], strengths [B, R],
//   read_idx [B, R, K], rows [B, R, K, W] (M_t at read_idx, saved for backward), weights and
//   sim [B, R, K], read [B, R, W], extra_idx [B, E], extra_rows [B, E, W].
// Every loop touches O(J·W + R·K·W) memory per element except the search (O(N·W) over the rows
// that are not zero) and the reset of an element (O(N·W)).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"

using u8 = uint8_t;

namespace {

constexpr double kEps = 1e-6;  // addressing.EPSILON, under the norms' sqrt

// x·y with 8 independent partial sums (so that the loop vectorises without reassociation).
template <typename T>
inline T dot(const T* x, const T* y, i64 n) {
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    i64 i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += x[i + l] * y[i + l];
    T total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) total += x[i] * y[i];
    return total;
}

// M_t = (1 - I^U_t 1^T) ∘ M_{t-1} + w^W_t a_t^T at the J write rows (duplicates add up, in
// order), after zeroing the elements that reset; sqnorm follows the rows that changed.
template <typename T>
void write_rows(T* mem, T* sqnorm, i64 B, i64 N, i64 W, i64 J, const T* a, const T* ww,
                const i64* widx, const u8* reset) {
    for (i64 b = 0; b < B; ++b) {
        T* m = mem + b * N * W;
        if (reset != nullptr && reset[b]) {
            std::memset(m, 0, sizeof(T) * N * W);
            if (sqnorm != nullptr) std::memset(sqnorm + b * N, 0, sizeof(T) * N);
        }
        const i64* wi = widx + b * J;
        std::fill(m + wi[J - 1] * W, m + wi[J - 1] * W + W, T(0));  // erase the LRU row
        const T* av = a + b * W;
        for (i64 j = 0; j < J; ++j) {
            T* row = m + wi[j] * W;
            const T s = ww[b * J + j];
            for (i64 w = 0; w < W; ++w) row[w] += s * av[w];
        }
        if (sqnorm != nullptr) {
            for (i64 j = 0; j < J; ++j) {
                const T* row = m + wi[j] * W;
                sqnorm[b * N + wi[j]] = dot(row, row, W);
            }
        }
    }
}

// |M[i]|^2 of every row.
template <typename T>
void row_sqnorm(const T* mem, T* sqnorm, i64 rows, i64 W) {
    for (i64 i = 0; i < rows; ++i) sqnorm[i] = dot(mem + i * W, mem + i * W, W);
}

// Insert (s, n) into the descending list (score, row) of at most k entries; equal scores go to
// the lowest row, whatever order the rows arrive in (the exact scan's ascending rows, or the
// IVF lists').
template <typename T>
inline void top_insert(T* score, i64* row, i64& count, i64 k, T s, i64 n) {
    auto better = [](T s1, i64 n1, T s2, i64 n2) { return s1 > s2 || (s1 == s2 && n1 < n2); };
    if (count == k && !better(s, n, score[k - 1], row[k - 1])) return;
    i64 pos = count < k ? count++ : k - 1;
    while (pos > 0 && better(s, n, score[pos - 1], row[pos - 1])) {
        score[pos] = score[pos - 1];
        row[pos] = row[pos - 1];
        --pos;
    }
    score[pos] = s;
    row[pos] = n;
}

// Exact cosine top-K of each key over the rows of its element, as ExactIndex: cos = q·m /
// (sqrt(|q|^2 + eps) sqrt(|m|^2 + eps)); a zero row scores 0 (only the K lowest zero rows can be
// chosen); ties go to the lowest row. Output rows ascending per head.
template <typename T>
void exact_search(const T* mem, const T* sqnorm, i64 B, i64 N, i64 W, const T* keys, i64 R,
                  i64 K, i64* out) {
    thread_local std::vector<T> score_buf, norm_buf;
    thread_local std::vector<i64> row_buf, count_buf;
    score_buf.resize(R * K);
    row_buf.resize(R * K);
    count_buf.resize(R);
    norm_buf.resize(R);
    T* score = score_buf.data();
    i64* row = row_buf.data();
    i64* count = count_buf.data();
    T* key_norm = norm_buf.data();
    for (i64 b = 0; b < B; ++b) {
        const T* m = mem + b * N * W;
        const T* sq = sqnorm + b * N;
        const T* q = keys + b * R * W;
        for (i64 r = 0; r < R; ++r) {
            key_norm[r] = std::sqrt(dot(q + r * W, q + r * W, W) + T(kEps));
            count[r] = 0;
        }
        i64 zeros = 0;
        for (i64 n = 0; n < N; ++n) {
            if (sq[n] == 0) {  // cosine 0 with every key
                if (zeros == K) continue;
                ++zeros;
                for (i64 r = 0; r < R; ++r) top_insert(score + r * K, row + r * K, count[r], K, T(0), n);
                continue;
            }
            const T* mr = m + n * W;
            const T rn = std::sqrt(sq[n] + T(kEps));
            for (i64 r = 0; r < R; ++r) {
                const T s = dot(q + r * W, mr, W) / (key_norm[r] * rn);
                if (count[r] < K || s > score[r * K + K - 1])
                    top_insert(score + r * K, row + r * K, count[r], K, s, n);
            }
        }
        for (i64 r = 0; r < R; ++r) {
            i64* o = out + (b * R + r) * K;
            std::copy(row + r * K, row + r * K + K, o);
            std::sort(o, o + K);
        }
    }
}

// w = softmax_K(β cos(q, M[i])) over the K rows of each head, r = Σ w M[i] (sparse_read_forward),
// and the extra rows gathered.
template <typename T>
void read_forward(const T* mem, i64 B, i64 N, i64 W, i64 R, i64 K, const i64* ridx,
                  const T* keys, const T* beta, T* rows, T* weights, T* sim, T* read, i64 E,
                  const i64* eidx, T* erows) {
    for (i64 b = 0; b < B; ++b) {
        const T* m = mem + b * N * W;
        for (i64 r = 0; r < R; ++r) {
            const i64 br = b * R + r;
            const T* q = keys + br * W;
            T kk = 0;
            for (i64 w = 0; w < W; ++w) kk += q[w] * q[w];
            const T kn = std::sqrt(kk + T(kEps));
            T* s = sim + br * K;
            T* wt = weights + br * K;
            T zmax = -INFINITY;
            for (i64 k = 0; k < K; ++k) {
                const T* src = m + ridx[br * K + k] * W;
                T* dst = rows + (br * K + k) * W;
                T dot = 0, rr = 0;
                for (i64 w = 0; w < W; ++w) {
                    dst[w] = src[w];
                    dot += src[w] * q[w];
                    rr += src[w] * src[w];
                }
                s[k] = dot / (kn * std::sqrt(rr + T(kEps)));
                wt[k] = s[k] * beta[br];
                zmax = std::max(zmax, wt[k]);
            }
            T total = 0;
            for (i64 k = 0; k < K; ++k) {
                wt[k] = std::exp(wt[k] - zmax);
                total += wt[k];
            }
            for (i64 k = 0; k < K; ++k) wt[k] /= total;
            T* out = read + br * W;
            for (i64 w = 0; w < W; ++w) out[w] = 0;
            for (i64 k = 0; k < K; ++k) {
                const T* row = rows + (br * K + k) * W;
                for (i64 w = 0; w < W; ++w) out[w] += wt[k] * row[w];
            }
        }
        for (i64 e = 0; e < E; ++e) {
            const T* src = m + eidx[b * E + e] * W;
            std::copy(src, src + W, erows + (b * E + e) * W);
        }
    }
}

// Backward of one step on the dense gradient buffer g = dL/dM_t (in place -> dL/dM_{t-1}):
// the read's gradients (sparse_read_backward) added at the read rows, the extra rows' gradients
// added, the write's gradients taken at the J write rows, then the LRU row (erased) and the
// reset elements zeroed. Null g_weights / g_read / g_extra count as zero.
template <typename T>
void step_backward(T* g, i64 B, i64 N, i64 W, i64 R, i64 K, i64 J, i64 E, const T* rows,
                   const T* keys, const T* beta, const T* sim, const T* weights, const i64* ridx,
                   const T* g_weights, const T* g_read, const i64* eidx, const T* g_extra,
                   const T* a, const T* ww, const i64* widx, const u8* reset, T* g_a, T* g_ww,
                   T* g_keys, T* g_beta) {
    thread_local std::vector<T> buf;
    buf.resize(4 * K);
    T* gw = buf.data();
    T* gsim = gw + K;
    T* gdot = gsim + K;
    T* rn = gdot + K;
    for (i64 b = 0; b < B; ++b) {
        T* gm = g + b * N * W;
        for (i64 r = 0; r < R; ++r) {
            const i64 br = b * R + r;
            const T* q = keys + br * W;
            const T* s = sim + br * K;
            const T* wt = weights + br * K;
            const T* gr = g_read != nullptr ? g_read + br * W : nullptr;
            T kk = 0;
            for (i64 w = 0; w < W; ++w) kk += q[w] * q[w];
            const T kn = std::sqrt(kk + T(kEps));
            T dot_w = 0;
            for (i64 k = 0; k < K; ++k) {
                const T* row = rows + (br * K + k) * W;
                T v = g_weights != nullptr ? g_weights[br * K + k] : T(0);
                T rr = 0;
                if (gr != nullptr) {
                    T d = 0;
                    for (i64 w = 0; w < W; ++w) d += row[w] * gr[w];
                    v += d;
                }
                for (i64 w = 0; w < W; ++w) rr += row[w] * row[w];
                rn[k] = std::sqrt(rr + T(kEps));
                gw[k] = v;
                dot_w += v * wt[k];
            }
            T gb = 0, gs_sim = 0;
            for (i64 k = 0; k < K; ++k) {
                const T gz = wt[k] * (gw[k] - dot_w);  // softmax
                gb += gz * s[k];
                gsim[k] = gz * beta[br];
                gdot[k] = gsim[k] / (kn * rn[k]);
                gs_sim += gsim[k] * s[k];
            }
            g_beta[br] = gb;
            T* gk = g_keys + br * W;
            const T c = gs_sim / (kn * kn);
            for (i64 w = 0; w < W; ++w) gk[w] = -q[w] * c;
            for (i64 k = 0; k < K; ++k) {
                const T* row = rows + (br * K + k) * W;
                for (i64 w = 0; w < W; ++w) gk[w] += gdot[k] * row[w];
            }
            for (i64 k = 0; k < K; ++k) {
                const T* row = rows + (br * K + k) * W;
                T* dst = gm + ridx[br * K + k] * W;
                const T cr = gsim[k] * s[k] / (rn[k] * rn[k]);
                for (i64 w = 0; w < W; ++w) {
                    const T v = gr != nullptr ? wt[k] * gr[w] : T(0);
                    dst[w] += (v + gdot[k] * q[w]) - row[w] * cr;
                }
            }
        }
        if (g_extra != nullptr) {
            for (i64 e = 0; e < E; ++e) {
                const T* src = g_extra + (b * E + e) * W;
                T* dst = gm + eidx[b * E + e] * W;
                for (i64 w = 0; w < W; ++w) dst[w] += src[w];
            }
        }
        const i64* wi = widx + b * J;
        const T* av = a + b * W;
        T* ga = g_a + b * W;
        for (i64 w = 0; w < W; ++w) ga[w] = 0;
        for (i64 j = 0; j < J; ++j) {
            const T* gr = gm + wi[j] * W;
            const T s = ww[b * J + j];
            T d = 0;
            for (i64 w = 0; w < W; ++w) {
                d += gr[w] * av[w];
                ga[w] += s * gr[w];
            }
            g_ww[b * J + j] = d;
        }
        std::fill(gm + wi[J - 1] * W, gm + wi[J - 1] * W + W, T(0));
        if (reset != nullptr && reset[b]) std::memset(gm, 0, sizeof(T) * N * W);
    }
}

// The first position of the minimum of u[0..n) (torch.argmin).
template <typename T>
i64 argmin_first(const T* u, i64 n) {
    T lane[16];
    for (int l = 0; l < 16; ++l) lane[l] = u[0];
    i64 i = 0;
    for (; i + 16 <= n; i += 16)  // 16 independent minima: vectorises (minps semantics)
        for (int l = 0; l < 16; ++l) lane[l] = u[i + l] < lane[l] ? u[i + l] : lane[l];
    T best = lane[0];
    for (int l = 1; l < 16; ++l) best = lane[l] < best ? lane[l] : best;
    for (; i < n; ++i) best = u[i] < best ? u[i] : best;
    i = 0;
    while (i < n - 1 && !(u[i] == best)) ++i;
    return i;
}

// I^U = argmin_i U(i) per element, the first minimum (torch.argmin).
template <typename T>
void least_recently_used(const T* last, i64 B, i64 N, i64* lru) {
    for (i64 b = 0; b < B; ++b) lru[b] = argmin_first(last + b * N, N);
}

// Block minima of U, so that the LRU row is found in O(N / bs + bs) per step instead of O(N):
// bmin[b, k] = min of rows [k bs, (k + 1) bs) and barg[b, k] the first row holding it (the
// first minimum over the blocks' minima is then the first minimum over the rows). Rebuilt for
// the elements in `only` (all when null).
template <typename T>
void lru_blocks_build(const T* last, i64 B, i64 N, i64 bs, T* bmin, i64* barg, const u8* only) {
    const i64 nb = (N + bs - 1) / bs;
    for (i64 b = 0; b < B; ++b) {
        if (only != nullptr && !only[b]) continue;
        for (i64 k = 0; k < nb; ++k) {
            const i64 n0 = k * bs;
            const i64 a = n0 + argmin_first(last + b * N + n0, std::min(bs, N - n0));
            barg[b * nb + k] = a;
            bmin[b * nb + k] = last[b * N + a];
        }
    }
}

// U_t(i) = max(U_{t-1}(i), t) where a weight of row i exceeds δ (usage_update), t = time + 1 per
// element; then, if lru is given, I^U_{t+1} = argmin_i U_t(i) (first minimum), through the block
// minima when bmin/barg are given (kept current: values only grow, so a block changes only when
// its argmin row is stamped).
template <typename T>
void usage_update(T* last, const T* time_in, T* time_out, i64 B, i64 N, i64 J1, const i64* i1,
                  const T* w1, i64 J2, const i64* i2, const T* w2, T threshold, i64* lru,
                  i64 bs, T* bmin, i64* barg) {
    const i64 nb = bmin != nullptr ? (N + bs - 1) / bs : 0;
    for (i64 b = 0; b < B; ++b) {
        T* u = last + b * N;
        const T t = time_in[b] + T(1);
        time_out[b] = t;
        for (int pass = 0; pass < 2; ++pass) {
            const i64 J = pass == 0 ? J1 : J2;
            const i64* idx = (pass == 0 ? i1 : i2) + b * J;
            const T* w = (pass == 0 ? w1 : w2) + b * J;
            for (i64 j = 0; j < J; ++j) {
                const i64 n = idx[j];
                if (!(w[j] > threshold) || !(u[n] < t)) continue;
                u[n] = t;
                if (nb != 0 && barg[b * nb + n / bs] == n) {
                    const i64 k = n / bs, n0 = k * bs;
                    const i64 a = n0 + argmin_first(u + n0, std::min(bs, N - n0));
                    barg[b * nb + k] = a;
                    bmin[b * nb + k] = u[a];
                }
            }
        }
    }
    if (lru == nullptr) return;
    if (nb == 0) {
        least_recently_used(last, B, N, lru);
        return;
    }
    for (i64 b = 0; b < B; ++b) lru[b] = barg[b * nb + argmin_first(bmin + b * nb, nb)];
}

// SAM's interface (sam.py): xi [B, S] = [keys R·W | a W | beta^ R | alpha^, gamma^ | ...] at
// offsets (0, RW, RW + W, RW + W + R) with row stride S. beta = oneplus(beta^) = 1 +
// softplus(beta^) (torch's threshold 20), alpha = sigmoid, gamma = sigmoid; then the write
// weighting w^W = alpha (gamma mean_R(w^R_{t-1}), 1 - gamma) at rows (idx^R_{t-1}, I^U_t)
// (sparse_write_weights). Outputs keys [B, R, W] and a [B, W] copied out contiguous.
template <typename T>
void sam_head(const T* xi, i64 B, i64 S, i64 R, i64 W, i64 K, const T* prev_w,
              const i64* prev_idx, const i64* lru, T* keys, T* a, T* beta, T* gates, T* ww,
              i64* widx) {
    const i64 J = R * K + 1;
    for (i64 b = 0; b < B; ++b) {
        const T* x = xi + b * S;
        std::copy(x, x + R * W, keys + b * R * W);
        std::copy(x + R * W, x + R * W + W, a + b * W);
        for (i64 r = 0; r < R; ++r) beta[b * R + r] = T(1) + softplus(x[R * W + W + r]);
        const T alpha = sigmoid(x[R * W + W + R]);
        const T gamma = sigmoid(x[R * W + W + R + 1]);
        gates[b * 2] = alpha;
        gates[b * 2 + 1] = gamma;
        for (i64 j = 0; j < R * K; ++j) {
            ww[b * J + j] = alpha * (gamma * prev_w[b * R * K + j] / T(R));
            widx[b * J + j] = prev_idx[b * R * K + j];
        }
        ww[b * J + J - 1] = alpha * (T(1) - gamma);
        widx[b * J + J - 1] = lru[b];
    }
}

// Backward of sam_head: g_keys, g_a, g_beta (dL/d beta), g_ww (dL/d w^W) -> g_xi [B, S] (the
// columns past RW + W + R + 2 untouched) and g_prev_w [B, R, K].
template <typename T>
void sam_head_backward(const T* xi, i64 B, i64 S, i64 R, i64 W, i64 K, const T* prev_w,
                       const T* gates, const T* g_keys, const T* g_a, const T* g_beta,
                       const T* g_ww, T* g_xi, T* g_prev_w) {
    const i64 J = R * K + 1;
    for (i64 b = 0; b < B; ++b) {
        const T* x = xi + b * S;
        T* gx = g_xi + b * S;
        std::copy(g_keys + b * R * W, g_keys + b * R * W + R * W, gx);
        std::copy(g_a + b * W, g_a + b * W + W, gx + R * W);
        for (i64 r = 0; r < R; ++r) {
            const T v = x[R * W + W + r];  // torch.softplus backward (beta 1, threshold 20)
            const T z = std::exp(v);
            gx[R * W + W + r] = v > T(20) ? g_beta[b * R + r] : g_beta[b * R + r] * z / (z + T(1));
        }
        const T alpha = gates[b * 2], gamma = gates[b * 2 + 1];
        const T* gw = g_ww + b * J;
        T g_alpha = 0, g_gamma = 0;
        for (i64 j = 0; j < R * K; ++j) {
            const T p = prev_w[b * R * K + j] / T(R);
            g_alpha += gw[j] * (gamma * p);
            g_gamma += gw[j] * alpha * p;
            g_prev_w[b * R * K + j] = gw[j] * alpha * gamma / T(R);
        }
        g_alpha += gw[J - 1] * (T(1) - gamma);
        g_gamma -= gw[J - 1] * alpha;
        gx[R * W + W + R] = g_alpha * alpha * (T(1) - alpha);
        gx[R * W + W + R + 1] = g_gamma * gamma * (T(1) - gamma);
    }
}


// ---- an inverted-file index (FaissIndex's algorithm, natively) ----------------------------------
// Per batch element, the non-zero rows' unit vectors x / sqrt(|x|^2 + eps) (float32, as
// FaissIndex stores them) live in the list of their nearest centroid by inner product (fixed
// unit centroids from Python); zero rows are kept in a bit set instead. A search probes the
// nprobe lists whose centroids score highest against the unit key, keeps the k best rows by
// inner product together with the k lowest zero rows (score 0), ties to the lowest row, and
// falls back to the exact scan (exact_search) when fewer than k rows were found.
struct IVF {
    i64 B, N, W, nlist, nprobe, words;
    std::vector<float> centroids_t;             // [W, nlist] (transposed: scores vectorise)
    std::vector<float> cscore;                  // [nlist] scratch
    std::vector<std::vector<int32_t>> ids;      // [B * nlist] rows per list
    std::vector<std::vector<float>> vecs;       // [B * nlist] their unit vectors, W each
    // [B * N] the list and the position of each filed row, allocated uninitialised: a row's
    // slots are read only while its zero bit is clear, and written when it is filed
    std::unique_ptr<int32_t[]> list_of, pos_of;
    std::vector<uint64_t> zero;                 // [B * words] bit set: the row is zero, unfiled
};

// <centroid_c, unit> for every c, into ix.cscore.
inline const float* centroid_scores(IVF& ix, const float* unit) {
    float* out = ix.cscore.data();
    const i64 L = ix.nlist;
    std::fill(out, out + L, 0.0f);
    for (i64 w = 0; w < ix.W; ++w) {
        const float u = unit[w];
        const float* ct = ix.centroids_t.data() + w * L;
        for (i64 c = 0; c < L; ++c) out[c] += u * ct[c];
    }
    return out;
}

template <typename T>
void ivf_set_row(IVF& ix, i64 b, i64 n, const T* row) {
    const i64 W = ix.W, at = b * ix.N + n;
    uint64_t& word = ix.zero[b * ix.words + n / 64];
    if (!((word >> (n % 64)) & 1)) {  // filed: remove it (the list's last entry takes its place)
        const int32_t l = ix.list_of[at];
        auto& ids = ix.ids[b * ix.nlist + l];
        auto& vecs = ix.vecs[b * ix.nlist + l];
        const int32_t p = ix.pos_of[at], last = ids.back();
        ids[p] = last;
        std::copy(vecs.end() - W, vecs.end(), vecs.begin() + p * W);
        ix.pos_of[b * ix.N + last] = p;
        ids.pop_back();
        vecs.resize(vecs.size() - W);
    }
    const T sq = dot(row, row, W);
    if (sq == 0) {
        word |= uint64_t(1) << (n % 64);
        return;
    }
    word &= ~(uint64_t(1) << (n % 64));
    float unit[256];
    const T norm = std::sqrt(sq + T(kEps));
    for (i64 w = 0; w < W; ++w) unit[w] = float(row[w] / norm);
    const float* cs = centroid_scores(ix, unit);
    int32_t best = 0;
    for (i64 c = 1; c < ix.nlist; ++c)
        if (cs[c] > cs[best]) best = int32_t(c);
    auto& ids = ix.ids[b * ix.nlist + best];
    auto& vecs = ix.vecs[b * ix.nlist + best];
    ix.list_of[at] = best;
    ix.pos_of[at] = int32_t(ids.size());
    ids.push_back(int32_t(n));
    vecs.insert(vecs.end(), unit, unit + W);
}

// Element b's lists emptied and every row marked zero, unfiled (the memory is not read):
// O(nlist + N / 64), the slot arrays untouched.
inline void ivf_empty(IVF& ix, i64 b) {
    for (i64 l = 0; l < ix.nlist; ++l) {
        ix.ids[b * ix.nlist + l].clear();
        ix.vecs[b * ix.nlist + l].clear();
    }
    for (i64 w = 0; w < ix.words; ++w) {
        const i64 left = ix.N - w * 64;
        ix.zero[b * ix.words + w] = left >= 64 ? ~uint64_t(0) : (uint64_t(1) << left) - 1;
    }
}

template <typename T>
void ivf_reset(IVF& ix, const T* mem, const u8* elements) {
    for (i64 b = 0; b < ix.B; ++b) {
        if (elements != nullptr && !elements[b]) continue;
        ivf_empty(ix, b);
        for (i64 n = 0; n < ix.N; ++n) ivf_set_row(ix, b, n, mem + (b * ix.N + n) * ix.W);
    }
}

template <typename T>
void ivf_update(IVF& ix, const T* mem, const i64* rows, i64 J) {
    for (i64 b = 0; b < ix.B; ++b)
        for (i64 j = 0; j < J; ++j) {
            const i64 n = rows[b * J + j];
            ivf_set_row(ix, b, n, mem + (b * ix.N + n) * ix.W);
        }
}

template <typename T>
void ivf_search(IVF& ix, const T* mem, const T* keys, i64 R, i64 K, i64* out) {
    const i64 W = ix.W, N = ix.N;
    std::vector<float> score(K);
    std::vector<i64> probe(ix.nlist), found(K);
    float unit[256];
    std::vector<T> sq;
    for (i64 b = 0; b < ix.B; ++b) {
        for (i64 r = 0; r < R; ++r) {
            const T* q = keys + (b * R + r) * W;
            const T norm = std::sqrt(dot(q, q, W) + T(kEps));
            for (i64 w = 0; w < W; ++w) unit[w] = float(q[w] / norm);
            const float* cs = centroid_scores(ix, unit);
            // the nprobe best lists, best score first and ties to the lower list (a strict
            // order, so the set is that of an insertion sort), in O(nlist)
            const i64 np = ix.nprobe;
            for (i64 c = 0; c < ix.nlist; ++c) probe[c] = c;
            std::nth_element(probe.begin(), probe.begin() + (np - 1), probe.end(),
                             [cs](i64 a, i64 b) { return cs[a] > cs[b] || (cs[a] == cs[b] && a < b); });
            i64 count = 0;
            for (i64 p = 0; p < np; ++p) {
                const auto& ids = ix.ids[b * ix.nlist + probe[p]];
                const float* v = ix.vecs[b * ix.nlist + probe[p]].data();
                for (size_t i = 0; i < ids.size(); ++i) {
                    const float s = dot(unit, v + i * W, W);
                    if (count < K || s >= score[K - 1])
                        top_insert(score.data(), found.data(), count, K, s, ids[i]);
                }
            }
            i64 zeros = 0;  // the k lowest zero rows, score 0
            for (i64 w = 0; w < ix.words && zeros < K; ++w) {
                uint64_t bits = ix.zero[b * ix.words + w];
                while (bits != 0 && zeros < K) {
                    const i64 n = w * 64 + __builtin_ctzll(bits);
                    bits &= bits - 1;
                    top_insert(score.data(), found.data(), count, K, 0.0f, n);
                    ++zeros;
                }
            }
            i64* o = out + (b * R + r) * K;
            if (count < K) {  // the probed lists held fewer than k rows: exact scan
                sq.resize(N);
                const T* m = mem + b * N * W;
                row_sqnorm(m, sq.data(), N, W);
                exact_search(m, sq.data(), 1, N, W, q, 1, K, o);
                continue;
            }
            std::copy(found.begin(), found.end(), o);
            std::sort(o, o + K);
        }
    }
}

}  // namespace

// ---- extern "C" wrappers: float (_f32) and double (_f64) ---------------------------------------
#define SA_INSTANTIATE(T, SUFFIX)                                                                  \
    EXPORT void sa_write_##SUFFIX(T* mem, T* sqnorm, i64 B, i64 N, i64 W, i64 J, const T* a,      \
                                  const T* ww, const i64* widx, const u8* reset) {                \
        write_rows<T>(mem, sqnorm, B, N, W, J, a, ww, widx, reset);                                \
    }                                                                                              \
    EXPORT void sa_sqnorm_##SUFFIX(const T* mem, T* sqnorm, i64 rows, i64 W) {                     \
        row_sqnorm<T>(mem, sqnorm, rows, W);                                                       \
    }                                                                                              \
    EXPORT void sa_search_##SUFFIX(const T* mem, const T* sqnorm, i64 B, i64 N, i64 W,             \
                                   const T* keys, i64 R, i64 K, i64* out) {                        \
        exact_search<T>(mem, sqnorm, B, N, W, keys, R, K, out);                                    \
    }                                                                                              \
    EXPORT void sa_read_##SUFFIX(const T* mem, i64 B, i64 N, i64 W, i64 R, i64 K,                  \
                                 const i64* ridx, const T* keys, const T* beta, T* rows,           \
                                 T* weights, T* sim, T* read, i64 E, const i64* eidx, T* erows) {  \
        read_forward<T>(mem, B, N, W, R, K, ridx, keys, beta, rows, weights, sim, read, E, eidx,   \
                        erows);                                                                    \
    }                                                                                              \
    EXPORT void sa_backward_##SUFFIX(                                                              \
        T* g, i64 B, i64 N, i64 W, i64 R, i64 K, i64 J, i64 E, const T* rows, const T* keys,       \
        const T* beta, const T* sim, const T* weights, const i64* ridx, const T* g_weights,        \
        const T* g_read, const i64* eidx, const T* g_extra, const T* a, const T* ww,               \
        const i64* widx, const u8* reset, T* g_a, T* g_ww, T* g_keys, T* g_beta) {                 \
        step_backward<T>(g, B, N, W, R, K, J, E, rows, keys, beta, sim, weights, ridx, g_weights,  \
                         g_read, eidx, g_extra, a, ww, widx, reset, g_a, g_ww, g_keys, g_beta);    \
    }                                                                                              \
    EXPORT void sa_usage_##SUFFIX(T* last, const T* time_in, T* time_out, i64 B, i64 N, i64 J1,    \
                                  const i64* i1, const T* w1, i64 J2, const i64* i2, const T* w2,  \
                                  double threshold, i64* lru, i64 bs, T* bmin, i64* barg) {        \
        usage_update<T>(last, time_in, time_out, B, N, J1, i1, w1, J2, i2, w2, T(threshold), lru,  \
                        bs, bmin, barg);                                                           \
    }                                                                                              \
    EXPORT void sa_lru_blocks_##SUFFIX(const T* last, i64 B, i64 N, i64 bs, T* bmin, i64* barg,    \
                                       const u8* only) {                                           \
        lru_blocks_build<T>(last, B, N, bs, bmin, barg, only);                                     \
    }                                                                                              \
    EXPORT void sa_head_##SUFFIX(const T* xi, i64 B, i64 S, i64 R, i64 W, i64 K, const T* prev_w,  \
                                 const i64* prev_idx, const i64* lru, T* keys, T* a, T* beta,      \
                                 T* gates, T* ww, i64* widx) {                                     \
        sam_head<T>(xi, B, S, R, W, K, prev_w, prev_idx, lru, keys, a, beta, gates, ww, widx);     \
    }                                                                                              \
    EXPORT void sa_head_backward_##SUFFIX(                                                         \
        const T* xi, i64 B, i64 S, i64 R, i64 W, i64 K, const T* prev_w, const T* gates,           \
        const T* g_keys, const T* g_a, const T* g_beta, const T* g_ww, T* g_xi, T* g_prev_w) {     \
        sam_head_backward<T>(xi, B, S, R, W, K, prev_w, gates, g_keys, g_a, g_beta, g_ww, g_xi,    \
                             g_prev_w);                                                            \
    }                                                                                              \
    EXPORT void sa_lru_##SUFFIX(const T* last, i64 B, i64 N, i64* lru) {                           \
        least_recently_used<T>(last, B, N, lru);                                                   \
    }

SA_INSTANTIATE(float, f32)
SA_INSTANTIATE(double, f64)

EXPORT void* sa_ivf_new(i64 B, i64 N, i64 W, i64 nlist, i64 nprobe, const float* centroids) {
    if (W > 256) return nullptr;
    IVF* ix = new IVF();
    ix->B = B, ix->N = N, ix->W = W, ix->nlist = nlist, ix->nprobe = nprobe;
    ix->words = (N + 63) / 64;
    ix->centroids_t.resize(nlist * W);
    for (i64 c = 0; c < nlist; ++c)
        for (i64 w = 0; w < W; ++w) ix->centroids_t[w * nlist + c] = centroids[c * W + w];
    ix->cscore.resize(nlist);
    ix->ids.resize(B * nlist);
    ix->vecs.resize(B * nlist);
    ix->list_of.reset(new int32_t[B * N]);  // (uninitialised: see struct IVF)
    ix->pos_of.reset(new int32_t[B * N]);
    ix->zero.resize(B * ix->words);
    for (i64 b = 0; b < B; ++b) ivf_empty(*ix, b);  // every row zero, nothing filed
    return ix;
}

EXPORT void sa_ivf_free(void* ix) { delete static_cast<IVF*>(ix); }

// Every row of the elements in `elements` ([B] uint8; all when null) zero, without reading the
// memory: the initial memory, or a reset whose caller zeroed the rows it had written. O(nlist +
// N) per element (the list slots and the zero bits), not O(N·W).
EXPORT void sa_ivf_clear(void* handle, const u8* elements) {
    IVF& ix = *static_cast<IVF*>(handle);
    for (i64 b = 0; b < ix.B; ++b)
        if (elements == nullptr || elements[b]) ivf_empty(ix, b);
}

#define SA_IVF_INSTANTIATE(T, SUFFIX)                                                              \
    EXPORT void sa_ivf_reset_##SUFFIX(void* ix, const T* mem, const u8* elements) {                \
        ivf_reset<T>(*static_cast<IVF*>(ix), mem, elements);                                       \
    }                                                                                              \
    EXPORT void sa_ivf_update_##SUFFIX(void* ix, const T* mem, const i64* rows, i64 J) {           \
        ivf_update<T>(*static_cast<IVF*>(ix), mem, rows, J);                                       \
    }                                                                                              \
    EXPORT void sa_ivf_search_##SUFFIX(void* ix, const T* mem, const T* keys, i64 R, i64 K,        \
                                       i64* out) {                                                 \
        ivf_search<T>(*static_cast<IVF*>(ix), mem, keys, R, K, out);                               \
    }

SA_IVF_INSTANTIATE(float, f32)
SA_IVF_INSTANTIATE(double, f64)
