// Native kernels of the SDNC (Rae et al. 2016, supplementary "Sparse Differentiable Neural
// Computer"), each with a hand-written backward:
// - sdnc_links_*: one step of the sparse link update (L_t and its transpose, each row keeping its
//   K_L strongest entries), the precedence update p_t, and the link reads f_t = L_t w^R_{t-1},
//   b_t = L_t^T w^R_{t-1};
// - sdnc_head_*: the interface vector's activations and SAM's write weighting;
// - sdnc_mix_*: the read weighting over the read modes and the read vectors;
// - sdnc_lstm_*: the controller's LSTM cell from its gates' pre-activations (SDNCSequence).
//
// The equations, their order and the tie-breaking of every top-k are those of the torch reference
// in memagents/cores/sparse_links.py (SparseLinkStep, sparse_precedence_update, directional_read)
// and sdnc.py (head_and_links, read_mix); tests compare both in float64. Link step shapes
// (row-major, contiguous):
//   B batch, N memory rows, L = K_L entries per link row, J write entries, R heads, S slots per
//   head of w^R_{t-1}, K entries kept per link read.
//   link, link_t        [B, N, L] values of L and L^T (updated in place)
//   link_idx, link_t_idx [B, N, L] columns as exact integers in T (updated in place; float32
//                        holds every row number below 2^24, the cores' largest N)
//   w, w_idx            [B, J] w^W_t (duplicate rows add up)
//   p, p_idx            [B, L] p_{t-1} (distinct rows)
//   rw, rw_idx          [B, R, S] w^R_{t-1}
//   reset               [n_reset] int64 batch elements whose links are emptied first
// Saved for backward (struct Saved; set 0 = L, set 1 = L^T): cap, n_rows [B, 2], the touched
// rows (all elements and sets one after the other, at most cap: rows, old values, old_idx, sel),
// p_sel [B, L], read_vals [B, 2, R, S, L], read_idx [B, 2, R, S, L], read_sel [B, 2, R, K]
// (int32 except the values). Set 0 of the reads is b_t (from rows of L), set 1 is f_t (L^T).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// No fused multiply-adds: every product and sum rounds on its own, as in the torch reference's
// separate elementwise ops, so that values the reference computes equal stay equal here and the
// top-k tie-breaking agrees (-march=native would otherwise contract a * b + c).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "common.h"

using u8 = uint8_t;

using i32 = int32_t;

namespace {

// Dense maps over the N rows, kept in their neutral state between uses (every use undoes its
// writes), so a step costs O(touched rows), never O(N).
template <typename T>
struct Scratch {
    std::vector<i32> wslot;  // row -> first write entry j at that row, or -1
    std::vector<i32> pslot;  // row -> precedence entry at that row, or -1
    std::vector<i64> stamp;  // row -> generation in which it was last marked
    std::vector<T> acc;      // row -> accumulated value (link reads)
    std::vector<T> wd, pd;   // row -> merged w^W (p) at that row, or 0
    i64 gen = 0;
    void ensure(i64 n) {
        if ((i64)wslot.size() < n) {
            wslot.resize(n, -1);
            pslot.resize(n, -1);
            stamp.resize(n, 0);
            acc.resize(n, T(0));
            wd.resize(n, T(0));
            pd.resize(n, T(0));
        }
    }
};

// Raw pointers into the calling thread's Scratch (taken once per call: every access through the
// thread_local itself would cost a TLS lookup) and the generation counter, written back by done().
template <typename T>
struct Maps {
    i32* wslot;
    i32* pslot;
    i64* stamp;
    T* acc;
    T* wd;
    T* pd;
    i64 gen;
    Scratch<T>* home;
    void done() { home->gen = gen; }
};

template <typename T>
Maps<T> maps(i64 n) {
    thread_local Scratch<T> s;
    s.ensure(n);
    return Maps<T>{s.wslot.data(), s.pslot.data(), s.stamp.data(), s.acc.data(),
                   s.wd.data(),    s.pd.data(),    s.gen,          &s};
}

// Positions of the k largest scores among n, in descending order; ties go to the earlier
// position (torch.sort(descending=True, stable=True)[:k]).
template <typename T>
inline void select_top(const T* score, int n, int k, i32* out, T* best) {
    int filled = 0;
    for (int i = 0; i < n; ++i) {
        T s = score[i];
        if (filled == k && !(s > best[k - 1])) continue;
        int j = filled < k ? filled : k - 1;  // slot to fill (the last one is dropped)
        while (j > 0 && s > best[j - 1]) {
            best[j] = best[j - 1];
            out[j] = out[j - 1];
            --j;
        }
        best[j] = s;
        out[j] = i;
        if (filled < k) ++filled;
    }
}

template <typename T>
struct Batch {
    // one batch element's views
    i64 N, L, J, R, S, K, U;
    const T* w;
    const i64* w_idx;
    const T* p;
    const i64* p_idx;
    T* wsum;      // [J] merged w at the first entry of each row
    T* psum;      // [L] merged p at the first entry of each row
    char* first;  // [J] first occurrence of w_idx[j]
    Maps<T>* sc;

    T wm(i64 row) const { return sc->wd[row]; }
    T pm(i64 row) const { return sc->pd[row]; }
    void bind() {  // fill the slot maps of this element
        for (i64 j = 0; j < J; ++j) {
            i64 r = w_idx[j];
            if (sc->wslot[r] < 0) {
                sc->wslot[r] = (i32)j;
                wsum[j] = w[j];
                first[j] = 1;
            } else {
                wsum[sc->wslot[r]] += w[j];
                first[j] = 0;
            }
        }
        // precedence rows are distinct (every update keeps them so); duplicates would add up
        for (i64 m = 0; m < L; ++m) {
            i64 r = p_idx[m];
            if (sc->pslot[r] < 0) {
                sc->pslot[r] = (i32)m;
                psum[m] = p[m];
            } else {
                psum[sc->pslot[r]] += p[m];
            }
        }
        for (i64 j = 0; j < J; ++j)
            if (first[j]) sc->wd[w_idx[j]] = wsum[j];
        for (i64 m = 0; m < L; ++m)
            if (sc->pslot[p_idx[m]] == (i32)m) sc->pd[p_idx[m]] = psum[m];
    }
    void unbind() {
        for (i64 j = 0; j < J; ++j) {
            sc->wslot[w_idx[j]] = -1;
            sc->wd[w_idx[j]] = T(0);
        }
        for (i64 m = 0; m < L; ++m) {
            sc->pslot[p_idx[m]] = -1;
            sc->pd[p_idx[m]] = T(0);
        }
    }
};

template <typename I>
bool in_row(const I* idx, i64 L, i64 c) {
    for (i64 k = 0; k < L; ++k)
        if ((i64)idx[k] == c) return true;
    return false;
}

// New row `r` of L (transpose = 0) or of L^T (transpose = 1), from its old entries; writes the
// K_L selected entries over vals/idx and their source positions into sel (< L: old entry,
// >= L: candidate L + m, m a precedence entry (L) or a write entry (L^T)). LC: K_L when known
// at compile time (0: read bt.L).
template <typename T, int LC>
inline __attribute__((always_inline)) void update_row(const Batch<T>& bt, bool transpose, i64 r,
                                                      T* vals, T* idx, i32* sel, T* cv, T* cs,
                                                      i64* ci, T* best) {
    const i64 L = LC ? LC : bt.L;
    const T w_row = bt.wm(r);
    const T p_row = transpose ? bt.pm(r) : T(0);
    // New entries are w[i] p[j]: all 0 when the row's own factor (w[i] for L, p[j] for L^T) is 0,
    // as for most touched rows. A 0 candidate never beats an entry >= 0 that precedes it, so
    // then only the old entries compete, and their top K_L is their stable descending order.
    const bool own_zero = (transpose ? p_row : w_row) == T(0);
    bool none = own_zero;
    for (i64 k = 0; k < L; ++k) {
        i64 c = (i64)idx[k];
        T wc = bt.wm(c);
        T dec = (T(1) - w_row - wc) * vals[k];
        // with the own factor 0 the added term is 0 (exactly: + 0 changes no value >= 0)
        T ex = own_zero ? dec : transpose ? dec + wc * p_row : dec + w_row * bt.pm(c);
        cv[k] = ex;
        ci[k] = c;
        none = none && ex >= T(0);
    }
    if (none) {  // stable insertion sort, descending
        i32 order[LC ? LC : 64];
        if (LC == 0 && L > 64) goto general;
        for (i64 k = 0; k < L; ++k) {
            i64 j = k;
            while (j > 0 && cv[order[j - 1]] < cv[k]) {
                order[j] = order[j - 1];
                --j;
            }
            order[j] = (i32)k;
        }
        for (i64 k = 0; k < L; ++k) {
            sel[k] = order[k];
            vals[k] = cv[order[k]];
            idx[k] = (T)ci[order[k]];
        }
        return;
    }
general:
    for (i64 k = 0; k < L; ++k) cs[k] = cv[k];
    const i64 C = none ? 0 : transpose ? bt.J : L;
    for (i64 m = 0; m < C; ++m) {
        i64 c = transpose ? bt.w_idx[m] : bt.p_idx[m];
        bool ok = (!transpose || bt.first[m]) && c != r && !in_row(idx, L, c);
        T cand = transpose ? bt.sc->wd[c] * p_row : w_row * bt.p[m];
        cv[L + m] = ok ? cand : T(0);
        cs[L + m] = ok ? cand : T(-1);
        ci[L + m] = c;
    }
    select_top<T>(cs, (int)(L + C), (int)L, sel, best);
    for (i64 k = 0; k < L; ++k) {
        vals[k] = cv[sel[k]];
        idx[k] = (T)ci[sel[k]];
    }
}

// Offsets of the saved buffers (one int32 and one T buffer; sizes as saved_sizes() in Python).
// The touched rows of all elements and both links are stored one after the other (element by
// element, L then L^T), at most `cap` of them; n_rows [B, 2] says how many each has. The int32
// buffer starts with `cap` itself, so that the backward finds the layout.
struct Saved {
    i64 n_rows, rows, old_idx, sel, p_sel, read_idx, read_sel, n_i32;  // int32 buffer
    i64 old, read_vals, n_t;                                          // T buffer
    Saved(i64 B, i64 L, i64 R, i64 S, i64 K, i64 cap) {
        n_rows = 1;
        rows = n_rows + B * 2;
        old_idx = rows + cap;
        sel = old_idx + cap * L;
        p_sel = sel + cap * L;
        read_idx = p_sel + B * L;
        read_sel = read_idx + B * 2 * R * S * L;
        n_i32 = read_sel + B * 2 * R * K;
        old = 0;
        read_vals = old + cap * L;
        n_t = read_vals + B * 2 * R * S * L;
    }
};

// The rows one step touches, from the links before the update, each once per link: rows of L are
// the written rows and those linking to them (L^T's written rows); rows of L^T are the written
// rows, the precedence rows and those linked from written rows (L's written rows). Appends
// element b's rows of L, then of L^T, to `out`; counts into n[0], n[1].
template <typename T>
void touched_rows(const Maps<T>& sc_in, i64& gen, i64 L, i64 J, const i64* w_idx,
                  const i64* p_idx, const T* idx_l, const T* idx_t, std::vector<i32>& out,
                  std::vector<i32>& written, i64* n) {
    i64* stamp = sc_in.stamp;
    written.clear();
    ++gen;
    for (i64 j = 0; j < J; ++j)
        if (stamp[w_idx[j]] != gen) {
            stamp[w_idx[j]] = gen;
            written.push_back((i32)w_idx[j]);
        }
    for (int set = 0; set < 2; ++set) {
        const size_t start = out.size();
        ++gen;
        auto add = [&](i64 row) {
            if (stamp[row] != gen) {
                stamp[row] = gen;
                out.push_back((i32)row);
            }
        };
        for (i32 r : written) add(r);
        if (set == 1)
            for (i64 m = 0; m < L; ++m) add(p_idx[m]);
        const T* other = set == 0 ? idx_t : idx_l;
        for (i32 r : written)
            for (i64 k = 0; k < L; ++k) add((i64)other[r * L + k]);
        n[set] = (i64)(out.size() - start);
    }
}

// Returns the number of touched rows; when saving and that exceeds `cap`, returns it having
// changed nothing but the reset elements (the caller retries with a larger buffer).
template <typename T, int LC>
i64 forward(i64 B, i64 N, i64 L_, i64 J, i64 R, i64 S, i64 K, T* link, T* link_t, T* link_idx,
            T* link_t_idx, const T* w, const i64* w_idx, const T* p, const i64* p_idx,
            const T* rw, const i64* rw_idx, const i64* reset, i64 n_reset, T* p_out,
            i64* p_out_idx, T* dir_out, i64* dir_out_idx, i64 cap, i32* saved_i32, T* saved_t,
            u8* touched) {
    const i64 L = LC ? LC : L_;
    const bool save = saved_i32 != nullptr;
    const Saved off(B, L, R, S, K, cap);
    i32* n_rows = save ? saved_i32 + off.n_rows : nullptr;
    i32* rows = save ? saved_i32 + off.rows : nullptr;
    i32* old_idx = save ? saved_i32 + off.old_idx : nullptr;
    i32* sel = save ? saved_i32 + off.sel : nullptr;
    i32* p_sel = save ? saved_i32 + off.p_sel : nullptr;
    i32* read_idx = save ? saved_i32 + off.read_idx : nullptr;
    i32* read_sel = save ? saved_i32 + off.read_sel : nullptr;
    T* old = save ? saved_t + off.old : nullptr;
    T* read_vals = save ? saved_t + off.read_vals : nullptr;
    Maps<T> sc = maps<T>(N);
    const i64 U = J * (1 + L) + L;
    const i64 C = (J > L ? J : L) + L;
    const i64 SL = S * L;
    std::vector<T> wsum(J), psum(L), cv(C > SL ? C : SL), cs(C > SL ? C : SL), best(L > K ? L : K);
    std::vector<i64> ci(C > SL ? C : SL);
    std::vector<char> first(J), pos_first(SL);
    std::vector<i32> tmp_sel(L > K ? L : K), written;
    std::vector<i32> all_rows;  // every element's touched rows, L then L^T
    std::vector<i64> counts(2 * B);
    all_rows.reserve(B * 2 * (U < N ? U : N));

    for (i64 n = 0; n < n_reset; ++n) {
        i64 b = reset[n];
        std::memset(link + b * N * L, 0, sizeof(T) * N * L);
        std::memset(link_t + b * N * L, 0, sizeof(T) * N * L);
        for (i64 i = 0; i < N; ++i)
            for (i64 k = 0; k < L; ++k) {
                const i64 o = (b * N + i) * L + k;
                const i64 col = i + 1 + k;  // (i + 1 + k) mod N, as k < L < N
                link_idx[o] = link_t_idx[o] = (T)(col < N ? col : col - N);
            }
    }

    // the rows an element touches are scattered over the links: the loads of the next element's
    // written rows start while this element's rows are enumerated (the first element's now)
    auto prefetch_written = [&](i64 bb) {
        if (bb >= B) return;
        for (i64 j = 0; j < J; ++j) {
            const i64 o = (bb * N + w_idx[bb * J + j]) * L;
            __builtin_prefetch(link_idx + o);
            __builtin_prefetch(link_t_idx + o);
            __builtin_prefetch(link + o);
            __builtin_prefetch(link_t + o);
        }
    };
    prefetch_written(0);
    for (i64 b = 0; b < B; ++b) {
        prefetch_written(b + 1);
        touched_rows<T>(sc, sc.gen, L, J, w_idx + b * J, p_idx + b * L, link_idx + b * N * L,
                        link_t_idx + b * N * L, all_rows, written, &counts[2 * b]);
    }
    const i64 n_total = (i64)all_rows.size();
    if (save && n_total > cap) {
        sc.done();
        return n_total;
    }
    if (touched != nullptr) {  // [2, B, N]: the rows of L, then of L^T, this step rewrites
        i64 at = 0;
        for (i64 b = 0; b < B; ++b)
            for (i64 set = 0; set < 2; ++set)
                for (i64 u = 0; u < counts[2 * b + set]; ++u, ++at)
                    touched[(set * B + b) * N + all_rows[at]] = 1;
    }
    if (save) {
        saved_i32[0] = (i32)cap;
        for (i64 i = 0; i < 2 * B; ++i) n_rows[i] = (i32)counts[i];
    }

    i64 base = 0;  // first row of this element's (and link's) rows in all_rows
    for (i64 b = 0; b < B; ++b) {
        Batch<T> bt{N, L, J, R, S, K, U, w + b * J, w_idx + b * J, p + b * L, p_idx + b * L,
                    wsum.data(), psum.data(), first.data(), &sc};
        bt.bind();
        T* vals[2] = {link + b * N * L, link_t + b * N * L};
        T* idxs[2] = {link_idx + b * N * L, link_t_idx + b * N * L};
        for (i64 set = 0, o = base; set < 2; ++set)
            for (i64 u = 0; u < counts[2 * b + set]; ++u, ++o) {
                __builtin_prefetch(idxs[set] + all_rows[o] * L);
                __builtin_prefetch(vals[set] + all_rows[o] * L);
            }
        for (int set = 0; set < 2; ++set) {
            const i32* lst = all_rows.data() + base;
            const i64 count = counts[2 * b + set];
            for (i64 u = 0; u < count; ++u) {
                i64 r = lst[u];
                T* v = vals[set] + r * L;
                T* ix = idxs[set] + r * L;
                i32* s = save ? sel + (base + u) * L : tmp_sel.data();
                if (save) {
                    rows[base + u] = (i32)r;
                    for (i64 k = 0; k < L; ++k) {
                        old[(base + u) * L + k] = v[k];
                        old_idx[(base + u) * L + k] = (i32)ix[k];
                    }
                }
                update_row<T, LC>(bt, set == 1, r, v, ix, s, cv.data(), cs.data(), ci.data(),
                                  best.data());
            }
            base += count;
        }

        // p_t = (1 - sum w) p_{t-1} + w, top K_L
        {
            T total = T(0);
            for (i64 j = 0; j < J; ++j) total += bt.w[j];
            for (i64 k = 0; k < L; ++k) {
                T ex = (T(1) - total) * bt.p[k] + bt.wm(bt.p_idx[k]);
                cv[k] = cs[k] = ex;
                ci[k] = bt.p_idx[k];
            }
            for (i64 j = 0; j < J; ++j) {
                i64 c = bt.w_idx[j];
                bool ok = bt.first[j] && !in_row(bt.p_idx, L, c);
                T cand = sc.wd[c];
                cv[L + j] = ok ? cand : T(0);
                cs[L + j] = ok ? cand : T(-1);
                ci[L + j] = c;
            }
            i32* s = save ? p_sel + b * L : tmp_sel.data();
            select_top<T>(cs.data(), (int)(L + J), (int)L, s, best.data());
            for (i64 k = 0; k < L; ++k) {
                p_out[b * L + k] = cv[s[k]];
                p_out_idx[b * L + k] = ci[s[k]];
            }
        }
        bt.unbind();

        // b_t from rows of L_t (set 0), f_t from rows of L_t^T (set 1), per head: the rows of
        // w^R_{t-1} weighted, duplicates merged at their first position, top K
        for (int set = 0; set < 2; ++set) {
            T* outv = dir_out + set * K;  // [B, R, 2K]: b_t | f_t per head
            i64* outi = dir_out_idx + set * K;
            for (i64 h = 0; h < R; ++h) {
                const T* wr = rw + (b * R + h) * S;
                const i64* wr_idx = rw_idx + (b * R + h) * S;
                i64 rbase = ((b * 2 + set) * R + h) * SL;
                for (i64 s = 0; s < S; ++s) {
                    const T* v = vals[set] + wr_idx[s] * L;
                    const T* ix = idxs[set] + wr_idx[s] * L;
                    for (i64 k = 0; k < L; ++k) {
                        i64 c = s * L + k;
                        cv[c] = wr[s] * v[k];
                        ci[c] = (i64)ix[k];
                        if (save) {
                            read_vals[rbase + c] = v[k];
                            read_idx[rbase + c] = (i32)ix[k];
                        }
                    }
                }
                ++sc.gen;
                for (i64 c = 0; c < SL; ++c) {
                    i64 x = ci[c];
                    pos_first[c] = sc.stamp[x] != sc.gen;
                    sc.stamp[x] = sc.gen;
                    sc.acc[x] += cv[c];
                }
                for (i64 c = 0; c < SL; ++c) {
                    T merged = pos_first[c] ? sc.acc[ci[c]] : T(0);
                    cs[c] = pos_first[c] ? merged : T(-1);
                }
                for (i64 c = 0; c < SL; ++c) sc.acc[ci[c]] = T(0);
                i32* s = save ? read_sel + ((b * 2 + set) * R + h) * K : tmp_sel.data();
                select_top<T>(cs.data(), (int)SL, (int)K, s, best.data());
                for (i64 k = 0; k < K; ++k) {
                    i64 c = s[k];
                    outv[(b * R + h) * 2 * K + k] = pos_first[c] ? cs[c] : T(0);
                    outi[(b * R + h) * 2 * K + k] = ci[c];
                }
            }
        }
    }
    sc.done();
    return n_total;
}

// g_p_out, g_dir may be null (no gradient reached those outputs).
template <typename T>
void backward(i64 B, i64 N, i64 L, i64 J, i64 R, i64 S, i64 K, T* g_link, T* g_link_t,
              const T* g_p_out, const T* g_dir, const T* w, const i64* w_idx, const T* p,
              const i64* p_idx, const T* rw, const i64* rw_idx, const i64* reset, i64 n_reset,
              const i32* saved_i32, const T* saved_t, T* g_w, T* g_p, T* g_rw) {
    const Saved off(B, L, R, S, K, saved_i32[0]);
    const i32* n_rows = saved_i32 + off.n_rows;
    const i32* rows = saved_i32 + off.rows;
    const i32* old_idx = saved_i32 + off.old_idx;
    const i32* sel = saved_i32 + off.sel;
    const i32* p_sel = saved_i32 + off.p_sel;
    const i32* read_idx = saved_i32 + off.read_idx;
    const i32* read_sel = saved_i32 + off.read_sel;
    const T* old = saved_t + off.old;
    const T* read_vals = saved_t + off.read_vals;
    Maps<T> sc = maps<T>(N);
    const i64 U = J * (1 + L) + L;
    const i64 SL = S * L;
    std::vector<T> wsum(J), psum(L), gws(J), gps(L), gpd(L), g_new(L), g_old(L);
    std::vector<char> first(J);
    std::vector<i64> oi(L);
    i64 row_base = 0;  // first saved row of this element (and link)

    for (i64 b = 0; b < B; ++b) {
        Batch<T> bt{N, L, J, R, S, K, U, w + b * J, w_idx + b * J, p + b * L, p_idx + b * L,
                    wsum.data(), psum.data(), first.data(), &sc};
        bt.bind();
        for (i64 j = 0; j < J; ++j) gws[j] = T(0);
        for (i64 m = 0; m < L; ++m) gps[m] = gpd[m] = T(0);
        for (i64 o = 0; o < R * S; ++o) g_rw[b * R * S + o] = T(0);
        auto add_w = [&](i64 row, T g) {  // d/d w-merged at row
            i32 s = sc.wslot[row];
            if (s >= 0) gws[s] += g;
        };
        auto add_p = [&](i64 row, T g) {  // d/d p-looked-up at row
            i32 s = sc.pslot[row];
            if (s >= 0) gps[s] += g;
        };
        T* gbuf[2] = {g_link + b * N * L, g_link_t + b * N * L};

        // link reads: g of each selected (first-occurrence) row, spread over its candidates
        for (int set = 0; g_dir && set < 2; ++set) {
            const T* g_out = g_dir + set * K;  // [B, R, 2K]: b_t | f_t per head
            for (i64 h = 0; h < R; ++h) {
                const T* wr = rw + (b * R + h) * S;
                const i64* wr_idx = rw_idx + (b * R + h) * S;
                T* gwr = g_rw + (b * R + h) * S;
                i64 rbase = ((b * 2 + set) * R + h) * SL;
                const T* v = read_vals + rbase;
                const i32* ix = read_idx + rbase;
                const i32* s = read_sel + ((b * 2 + set) * R + h) * K;
                for (i64 k = 0; k < K; ++k) {
                    i64 c = s[k];
                    bool is_first = true;  // the value is 0 at repeated positions
                    for (i64 c2 = 0; c2 < c; ++c2)
                        if (ix[c2] == ix[c]) {
                            is_first = false;
                            break;
                        }
                    if (is_first) sc.acc[ix[c]] += g_out[(b * R + h) * 2 * K + k];
                }
                for (i64 s2 = 0; s2 < S; ++s2) {
                    T* grow = gbuf[set] + wr_idx[s2] * L;
                    for (i64 k = 0; k < L; ++k) {
                        T g = sc.acc[ix[s2 * L + k]];
                        gwr[s2] += g * v[s2 * L + k];
                        grow[k] += g * wr[s2];
                    }
                }
                for (i64 c = 0; c < SL; ++c) sc.acc[ix[c]] = T(0);
            }
        }

        // precedence
        {
            T total = T(0), g_total = T(0);
            for (i64 j = 0; j < J; ++j) total += bt.w[j];
            for (i64 k2 = 0; g_p_out && k2 < L; ++k2) {
                T g = g_p_out[b * L + k2];
                i64 q = p_sel[b * L + k2];
                if (q < L) {
                    gpd[q] += g * (T(1) - total);
                    g_total -= g * bt.p[q];
                    add_w(bt.p_idx[q], g);
                } else {
                    i64 j = q - L, c = bt.w_idx[j];
                    if (bt.first[j] && !in_row(bt.p_idx, L, c)) add_w(c, g);
                }
            }
            for (i64 j = 0; j < J; ++j) g_w[b * J + j] = g_total;
        }

        // link rows: from dL/d(new row) to dL/d(old row), w and p
        for (int set = 0; set < 2; ++set) {
            bool transpose = set == 1;
            const i64 base = row_base;
            row_base += n_rows[b * 2 + set];
            for (i64 u = 0; u < n_rows[b * 2 + set]; ++u) {
                i64 r = rows[base + u];
                T* grow = gbuf[set] + r * L;
                const T* o = old + (base + u) * L;
                const i32* s = sel + (base + u) * L;
                for (i64 k = 0; k < L; ++k) {
                    g_new[k] = grow[k];
                    g_old[k] = T(0);
                    oi[k] = old_idx[(base + u) * L + k];
                }
                const T w_row = bt.wm(r);
                const T p_row = transpose ? bt.pm(r) : T(0);
                for (i64 k2 = 0; k2 < L; ++k2) {
                    T g = g_new[k2];
                    i64 q = s[k2];
                    if (q < L) {
                        i64 c = oi[q];
                        T wc = bt.wm(c);
                        g_old[q] += g * (T(1) - w_row - wc);
                        add_w(r, -g * o[q]);
                        add_w(c, -g * o[q]);
                        if (!transpose) {
                            add_w(r, g * bt.pm(c));
                            add_p(c, g * w_row);
                        } else {
                            add_w(c, g * p_row);
                            add_p(r, g * wc);
                        }
                    } else {
                        i64 m = q - L;
                        i64 c = transpose ? bt.w_idx[m] : bt.p_idx[m];
                        bool ok = (!transpose || bt.first[m]) && c != r &&
                                  !in_row(oi.data(), L, c);
                        if (!ok) continue;
                        if (!transpose) {
                            add_w(r, g * bt.p[m]);
                            gpd[m] += g * w_row;
                        } else {
                            add_w(c, g * p_row);
                            add_p(r, g * sc.wd[c]);
                        }
                    }
                }
                for (i64 k = 0; k < L; ++k) grow[k] = g_old[k];
            }
        }
        for (i64 j = 0; j < J; ++j) g_w[b * J + j] += gws[sc.wslot[bt.w_idx[j]]];
        for (i64 m = 0; m < L; ++m) g_p[b * L + m] = gpd[m] + gps[sc.pslot[bt.p_idx[m]]];
        bt.unbind();
    }
    for (i64 n = 0; n < n_reset; ++n) {
        i64 b = reset[n];
        for (i64 o = 0; o < N * L; ++o) g_link[b * N * L + o] = g_link_t[b * N * L + o] = T(0);
    }
}

// The SDNC's interface after the controller (Rae et al. 2016 SAM section 3 and the DNC's read
// modes): xi = [q (R W) | a (W) | beta^ (R) | alpha^, gamma^ | pi^ (3 R)] per element.
//   beta = oneplus(beta^) = 1 + softplus(beta^)   (torch's softplus: x > 20 -> x)
//   alpha = sigma(alpha^), gamma = sigma(gamma^), pi = softmax over each head's 3 modes
//   w^W = alpha [gamma w^R_{t-1} / R | 1 - gamma] at rows [rows of w^R_{t-1} | I^U_t]
// (sparse_write_weights). Outputs keys [B, R, W], a [B, W], beta [B, R], gates [B, 2]
// (alpha, gamma), modes [B, R, 3], ww [B, J], widx int64 [B, J], J = R S + 1.
template <typename T>
void head_forward(i64 B, i64 R, i64 W, i64 S, const T* xi, const T* prev_w, const i64* prev_idx,
                  const i64* lru, T* keys, T* a, T* beta, T* gates, T* modes, T* ww, i64* widx) {
    const i64 X = R * W + W + R + 2 + 3 * R, J = R * S + 1;
    for (i64 b = 0; b < B; ++b) {
        const T* x = xi + b * X;
        for (i64 i = 0; i < R * W; ++i) keys[b * R * W + i] = x[i];
        for (i64 i = 0; i < W; ++i) a[b * W + i] = x[R * W + i];
        for (i64 h = 0; h < R; ++h) beta[b * R + h] = T(1) + softplus(x[R * W + W + h]);
        const T alpha = sigmoid(x[R * W + W + R]), gamma = sigmoid(x[R * W + W + R + 1]);
        gates[b * 2] = alpha;
        gates[b * 2 + 1] = gamma;
        const T* m = x + R * W + W + R + 2;
        for (i64 h = 0; h < R; ++h) {
            T mx = std::max(m[3 * h], std::max(m[3 * h + 1], m[3 * h + 2]));
            T e[3], sum = T(0);
            for (int i = 0; i < 3; ++i) sum += (e[i] = std::exp(m[3 * h + i] - mx));
            for (int i = 0; i < 3; ++i) modes[(b * R + h) * 3 + i] = e[i] / sum;
        }
        for (i64 j = 0; j < R * S; ++j) {
            ww[b * J + j] = alpha * (gamma * prev_w[b * R * S + j] / T(R));
            widx[b * J + j] = prev_idx[b * R * S + j];
        }
        ww[b * J + J - 1] = alpha * (T(1) - gamma);
        widx[b * J + J - 1] = lru[b];
    }
}

// Gradients of head_forward: any of g_keys, g_a, g_beta, g_modes, g_ww may be null (no gradient
// reached it). g_ww_links [B, J] and g_prev_w_links [B, R, S] (nullable) are the links' own
// gradients w.r.t. the same w^W and w^R_{t-1}, added in. Writes g_xi [B, X], g_prev_w [B, R, S].
template <typename T>
void head_backward(i64 B, i64 R, i64 W, i64 S, const T* xi, const T* prev_w, const T* gates,
                   const T* modes, const T* g_keys, const T* g_a, const T* g_beta,
                   const T* g_modes, const T* g_ww, const T* g_ww_links,
                   const T* g_prev_w_links, T* g_xi, T* g_prev_w) {
    const i64 X = R * W + W + R + 2 + 3 * R, J = R * S + 1;
    for (i64 b = 0; b < B; ++b) {
        const T* x = xi + b * X;
        T* gx = g_xi + b * X;
        for (i64 i = 0; i < R * W; ++i) gx[i] = g_keys ? g_keys[b * R * W + i] : T(0);
        for (i64 i = 0; i < W; ++i) gx[R * W + i] = g_a ? g_a[b * W + i] : T(0);
        for (i64 h = 0; h < R; ++h) {
            T v = x[R * W + W + h];
            T g = g_beta ? g_beta[b * R + h] : T(0);
            T z = std::exp(v);
            gx[R * W + W + h] = v > T(20) ? g : g * z / (z + T(1));
        }
        const T alpha = gates[b * 2], gamma = gates[b * 2 + 1];
        T g_alpha = T(0), g_gamma = T(0);
        auto gw = [&](i64 j) {
            return (g_ww ? g_ww[b * J + j] : T(0)) + (g_ww_links ? g_ww_links[b * J + j] : T(0));
        };
        for (i64 j = 0; j < R * S; ++j) {
            T g = gw(j);
            T w = prev_w[b * R * S + j];
            T inner = gamma * w / T(R);
            g_alpha += g * inner;
            T g_inner = g * alpha;
            g_gamma += g_inner * w / T(R);
            g_prev_w[b * R * S + j] = g_inner * gamma / T(R) +
                                      (g_prev_w_links ? g_prev_w_links[b * R * S + j] : T(0));
        }
        {
            T g = gw(J - 1);
            g_alpha += g * (T(1) - gamma);
            g_gamma -= g * alpha;
        }
        gx[R * W + W + R] = g_alpha * alpha * (T(1) - alpha);
        gx[R * W + W + R + 1] = g_gamma * gamma * (T(1) - gamma);
        for (i64 h = 0; h < R; ++h) {
            const T* m = modes + (b * R + h) * 3;
            T g[3], dot = T(0);
            for (int i = 0; i < 3; ++i) {
                g[i] = g_modes ? g_modes[(b * R + h) * 3 + i] : T(0);
                dot += g[i] * m[i];
            }
            for (int i = 0; i < 3; ++i) gx[R * W + W + R + 2 + 3 * h + i] = m[i] * (g[i] - dot);
        }
    }
}

// The SDNC's read weighting and read vectors (DNC read modes over SAM's sparse reads):
//   w^R = [pi_b b_t | pi_c c_t | pi_f f_t]            [B, R, 3K]
//   r   = pi_c r_c + sum_k (pi_b b_t[k]) M[b_idx[k]] + sum_k (pi_f f_t[k]) M[f_idx[k]]
// modes [B, R, 3] (pi_b, pi_c, pi_f), dir [B, R, 2K] (b_t | f_t), dir_idx int64 [B, R, 2K],
// cw [B, R, K] content weights, c_idx [B, R, K] their rows (exact integers in T), cr [B, R, W]
// content read vectors, er [B, R, 2K, W] the memory rows at dir_idx; ri_out int64 [B, R, 3K]
// the rows of w^R (b_idx | c_idx | f_idx).
template <typename T>
void mix_forward(i64 B, i64 R, i64 K, i64 W, const T* modes, const T* dir, const i64* dir_idx,
                 const T* cw, const T* c_idx, const T* cr, const T* er, T* rw_out, T* rv_out,
                 i64* ri_out) {
    for (i64 bh = 0; bh < B * R; ++bh) {
        const T* pi = modes + bh * 3;
        const T* d = dir + bh * 2 * K;
        const i64* di = dir_idx + bh * 2 * K;
        T* o = rw_out + bh * 3 * K;
        i64* ol = ri_out + bh * 3 * K;
        for (i64 k = 0; k < K; ++k) {
            o[k] = pi[0] * d[k];
            o[K + k] = pi[1] * cw[bh * K + k];
            o[2 * K + k] = pi[2] * d[K + k];
            ol[k] = di[k];
            ol[K + k] = (i64)c_idx[bh * K + k];
            ol[2 * K + k] = di[K + k];
        }
        T* v = rv_out + bh * W;
        for (i64 x = 0; x < W; ++x) v[x] = pi[1] * cr[bh * W + x];
        for (i64 k = 0; k < 2 * K; ++k) {
            T a = k < K ? o[k] : o[K + k];  // pi_b b_t[k] or pi_f f_t[k - K]
            const T* row = er + (bh * 2 * K + k) * W;
            for (i64 x = 0; x < W; ++x) v[x] += a * row[x];
        }
    }
}

// g_rv [B, R, W], g_rw [B, R, 3K] may be null (no gradient reached them).
template <typename T>
void mix_backward(i64 B, i64 R, i64 K, i64 W, const T* modes, const T* dir, const T* cw,
                  const T* cr, const T* er, const T* g_rv, const T* g_rw, T* g_modes, T* g_dir,
                  T* g_cw, T* g_cr, T* g_er) {
    for (i64 bh = 0; bh < B * R; ++bh) {
        const T* pi = modes + bh * 3;
        const T* d = dir + bh * 2 * K;
        const T* gv = g_rv ? g_rv + bh * W : nullptr;
        const T* gw = g_rw ? g_rw + bh * 3 * K : nullptr;
        T gm[3] = {T(0), T(0), T(0)};
        for (i64 k = 0; k < 2 * K; ++k) {
            const i64 m = k < K ? 0 : 2;  // mode of this slot
            const T* row = er + (bh * 2 * K + k) * W;
            T* grow = g_er + (bh * 2 * K + k) * W;
            T dot = T(0);
            const T a = pi[m] * d[k];
            for (i64 x = 0; x < W; ++x) {
                T g = gv ? gv[x] : T(0);
                dot += row[x] * g;
                grow[x] = a * g;
            }
            T g_mixed = dot + (gw ? gw[k < K ? k : K + k] : T(0));  // dL/d(pi_m d[k])
            gm[m] += g_mixed * d[k];
            g_dir[bh * 2 * K + k] = g_mixed * pi[m];
        }
        T dot = T(0);
        for (i64 x = 0; x < W; ++x) {
            T g = gv ? gv[x] : T(0);
            dot += cr[bh * W + x] * g;
            g_cr[bh * W + x] = pi[1] * g;
        }
        gm[1] += dot;
        for (i64 k = 0; k < K; ++k) {
            T g = gw ? gw[K + k] : T(0);
            gm[1] += g * cw[bh * K + k];
            g_cw[bh * K + k] = pi[1] * g;
        }
        for (int m = 0; m < 3; ++m) g_modes[bh * 3 + m] = gm[m];
    }
}

}  // namespace

#define FORWARD_ARGS(T)                                                                          \
    i64 B, i64 N, i64 L, i64 J, i64 R, i64 S, i64 K, T *link, T *link_t, T *link_idx,            \
        T *link_t_idx, const T *w, const i64 *w_idx, const T *p, const i64 *p_idx,             \
        const T *rw, const i64 *rw_idx, const i64 *reset, i64 n_reset, T *p_out, i64 *p_out_idx, \
        T *dir_out, i64 *dir_out_idx, i64 cap, i32 *saved_i32, T *saved_t, u8 *touched
#define FORWARD_CALL                                                                            \
    B, N, L, J, R, S, K, link, link_t, link_idx, link_t_idx, w, w_idx, p, p_idx, rw, rw_idx,   \
        reset, n_reset, p_out, p_out_idx, dir_out, dir_out_idx, cap, saved_i32, saved_t, touched
#define BACKWARD_ARGS(T)                                                                        \
    i64 B, i64 N, i64 L, i64 J, i64 R, i64 S, i64 K, T *g_link, T *g_link_t, const T *g_p_out,  \
        const T *g_dir, const T *w, const i64 *w_idx, const T *p, const i64 *p_idx,             \
        const T *rw, const i64 *rw_idx, const i64 *reset, i64 n_reset, const i32 *saved_i32,   \
        const T *saved_t, T *g_w, T *g_p, T *g_rw
#define BACKWARD_CALL                                                                           \
    B, N, L, J, R, S, K, g_link, g_link_t, g_p_out, g_dir, w, w_idx, p, p_idx, rw, rw_idx,     \
        reset, n_reset, saved_i32, saved_t, g_w, g_p, g_rw
#define MIX_ARGS(T)                                                                             \
    i64 B, i64 R, i64 K, i64 W, const T *modes, const T *dir, const i64 *dir_idx, const T *cw,  \
        const T *c_idx, const T *cr, const T *er, T *rw_out, T *rv_out, i64 *ri_out
#define MIX_CALL B, R, K, W, modes, dir, dir_idx, cw, c_idx, cr, er, rw_out, rv_out, ri_out
#define MIX_BACKWARD_ARGS(T)                                                                    \
    i64 B, i64 R, i64 K, i64 W, const T *modes, const T *dir, const T *cw, const T *cr,         \
        const T *er, const T *g_rv, const T *g_rw, T *g_modes, T *g_dir, T *g_cw, T *g_cr,      \
        T *g_er
#define MIX_BACKWARD_CALL B, R, K, W, modes, dir, cw, cr, er, g_rv, g_rw, g_modes, g_dir, g_cw, g_cr, g_er

// K_L = 4 (the default) with its loops unrolled; any other K_L through the general code
EXPORT i64 sdnc_links_forward_f32(FORWARD_ARGS(float)) {
    return L == 4 ? forward<float, 4>(FORWARD_CALL) : forward<float, 0>(FORWARD_CALL);
}
EXPORT i64 sdnc_links_forward_f64(FORWARD_ARGS(double)) {
    return L == 4 ? forward<double, 4>(FORWARD_CALL) : forward<double, 0>(FORWARD_CALL);
}
EXPORT void sdnc_links_backward_f32(BACKWARD_ARGS(float)) { backward<float>(BACKWARD_CALL); }
EXPORT void sdnc_links_backward_f64(BACKWARD_ARGS(double)) { backward<double>(BACKWARD_CALL); }
#define HEAD_ARGS(T)                                                                            \
    i64 B, i64 R, i64 W, i64 S, const T *xi, const T *prev_w, const i64 *prev_idx,               \
        const i64 *lru, T *keys, T *a, T *beta, T *gates, T *modes, T *ww, i64 *widx
#define HEAD_CALL B, R, W, S, xi, prev_w, prev_idx, lru, keys, a, beta, gates, modes, ww, widx
#define HEAD_BACKWARD_ARGS(T)                                                                   \
    i64 B, i64 R, i64 W, i64 S, const T *xi, const T *prev_w, const T *gates, const T *modes,   \
        const T *g_keys, const T *g_a, const T *g_beta, const T *g_modes, const T *g_ww,        \
        const T *g_ww_links, const T *g_prev_w_links, T *g_xi, T *g_prev_w
#define HEAD_BACKWARD_CALL                                                                      \
    B, R, W, S, xi, prev_w, gates, modes, g_keys, g_a, g_beta, g_modes, g_ww, g_ww_links,       \
        g_prev_w_links, g_xi, g_prev_w

EXPORT void sdnc_head_forward_f32(HEAD_ARGS(float)) { head_forward<float>(HEAD_CALL); }
EXPORT void sdnc_head_forward_f64(HEAD_ARGS(double)) { head_forward<double>(HEAD_CALL); }
EXPORT void sdnc_head_backward_f32(HEAD_BACKWARD_ARGS(float)) {
    head_backward<float>(HEAD_BACKWARD_CALL);
}
EXPORT void sdnc_head_backward_f64(HEAD_BACKWARD_ARGS(double)) {
    head_backward<double>(HEAD_BACKWARD_CALL);
}
EXPORT void sdnc_mix_forward_f32(MIX_ARGS(float)) { mix_forward<float>(MIX_CALL); }
EXPORT void sdnc_mix_forward_f64(MIX_ARGS(double)) { mix_forward<double>(MIX_CALL); }
EXPORT void sdnc_mix_backward_f32(MIX_BACKWARD_ARGS(float)) {
    mix_backward<float>(MIX_BACKWARD_CALL);
}
EXPORT void sdnc_mix_backward_f64(MIX_BACKWARD_ARGS(double)) {
    mix_backward<double>(MIX_BACKWARD_CALL);
}

// The controller's LSTM cell (torch's LSTMCell, gates i, f, g, o; Hochreiter & Schmidhuber 1997)
// from the gates' pre-activations, for SDNCSequence. Forward: acts [B, 4 Hd] (pre-activations,
// overwritten by the activations), c_prev [B, Hd] -> c, tanh_c [B, Hd] and h (row stride
// h_stride, e.g. written straight into y_t = [h_t; r_t]).
//   c = f c_prev + i g,  h = o tanh(c)
// Backward: from g_h [B, Hd] and g_c [B, Hd] (the next step's, nullable) -> g_acts [B, 4 Hd]
// (gradients of the pre-activations) and g_c_prev [B, Hd].
namespace {

// float32 activations without libm calls, so that the loop vectorises (libm's expf and tanhf
// are scalar calls: ~75% of the cell's time at B = 24, Hd = 64). exp by range reduction
// x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite 1980), exp(r) by its Taylor
// polynomial to r^7 (truncation < 2e-9 relative, under float's ulp), times 2^n built in the
// exponent bits; x is clamped to [-87, 88] (exp stays finite and normal: sigmoid and tanh
// saturate correctly). sigmoid(x) = 1 / (1 + e^-x); tanh(x) = 1 - 2 / (e^2x + 1): absolute error
// a few float ulps of 1 (~1e-7), relative error larger only where |tanh x| << 1. float64 keeps
// std::exp / std::tanh (the path the float64 tests compare with torch at 1e-10).
inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    float n = (x * 1.44269504088896341f + shift) - shift;
    float r = x - n * 0.693145751953125f;  // ln2's leading bits (exact product)
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
inline float act_sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
inline float act_tanh(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }
inline double act_sigmoid(double x) { return sigmoid(x); }
inline double act_tanh(double x) { return std::tanh(x); }

// In place over n values (separate simple loops vectorise; restrict: no aliasing).
template <typename T>
void sigmoid_n(T* __restrict x, i64 n) {
    for (i64 j = 0; j < n; ++j) x[j] = act_sigmoid(x[j]);
}
template <typename T>
void tanh_n(T* __restrict x, i64 n) {
    for (i64 j = 0; j < n; ++j) x[j] = act_tanh(x[j]);
}

template <typename T>
void lstm_forward(i64 B, i64 Hd, T* acts, const T* c_prev, T* c, T* tanh_c, T* h, i64 h_stride) {
    for (i64 b = 0; b < B; ++b) {
        T* __restrict a = acts + b * 4 * Hd;
        sigmoid_n(a, 2 * Hd);  // i, f
        tanh_n(a + 2 * Hd, Hd);  // g
        sigmoid_n(a + 3 * Hd, Hd);  // o
        const T* __restrict cp = c_prev + b * Hd;
        T* __restrict cb = c + b * Hd;
        T* __restrict tb = tanh_c + b * Hd;
        for (i64 j = 0; j < Hd; ++j) cb[j] = a[Hd + j] * cp[j] + a[j] * a[2 * Hd + j];
        for (i64 j = 0; j < Hd; ++j) tb[j] = act_tanh(cb[j]);
        T* __restrict hb = h + b * h_stride;
        for (i64 j = 0; j < Hd; ++j) hb[j] = a[3 * Hd + j] * tb[j];
    }
}

template <typename T>
void lstm_backward(i64 B, i64 Hd, const T* acts, const T* c_prev, const T* tanh_c, const T* g_h,
                   const T* g_c, T* g_acts, T* g_c_prev) {
    for (i64 b = 0; b < B; ++b) {
        const T* a = acts + b * 4 * Hd;
        T* ga = g_acts + b * 4 * Hd;
        for (i64 j = 0; j < Hd; ++j) {
            T i = a[j], f = a[Hd + j], g = a[2 * Hd + j], o = a[3 * Hd + j];
            T tc = tanh_c[b * Hd + j], gh = g_h[b * Hd + j];
            T gc = gh * o * (T(1) - tc * tc);
            if (g_c) gc = gc + g_c[b * Hd + j];
            ga[j] = gc * g * (i * (T(1) - i));
            ga[Hd + j] = gc * c_prev[b * Hd + j] * (f * (T(1) - f));
            ga[2 * Hd + j] = gc * i * (T(1) - g * g);
            ga[3 * Hd + j] = gh * tc * (o * (T(1) - o));
            g_c_prev[b * Hd + j] = gc * f;
        }
    }
}

}  // namespace

EXPORT void sdnc_lstm_forward_f32(i64 B, i64 Hd, float* acts, const float* c_prev, float* c,
                                  float* tanh_c, float* h, i64 h_stride) {
    lstm_forward<float>(B, Hd, acts, c_prev, c, tanh_c, h, h_stride);
}
EXPORT void sdnc_lstm_forward_f64(i64 B, i64 Hd, double* acts, const double* c_prev, double* c,
                                  double* tanh_c, double* h, i64 h_stride) {
    lstm_forward<double>(B, Hd, acts, c_prev, c, tanh_c, h, h_stride);
}
EXPORT void sdnc_lstm_backward_f32(i64 B, i64 Hd, const float* acts, const float* c_prev,
                                   const float* tanh_c, const float* g_h, const float* g_c,
                                   float* g_acts, float* g_c_prev) {
    lstm_backward<float>(B, Hd, acts, c_prev, tanh_c, g_h, g_c, g_acts, g_c_prev);
}
EXPORT void sdnc_lstm_backward_f64(i64 B, i64 Hd, const double* acts, const double* c_prev,
                                   const double* tanh_c, const double* g_h, const double* g_c,
                                   double* g_acts, double* g_c_prev) {
    lstm_backward<double>(B, Hd, acts, c_prev, tanh_c, g_h, g_c, g_acts, g_c_prev);
}
