"""Fast weight programmers: linear attention as a memory of outer products (``"fwp"``).

Schlag, Irie & Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight Programmers":
a *slow* network maps each input ``x^(i)`` to a key ``k^(i)``, a value ``v^(i)``, a query
``q^(i)`` and (for the delta rule) a learning rate ``β^(i)`` per head; these *program* a fast
weight matrix ``W^(i)`` per head, which is the recurrent state, and the output is what the
query retrieves from it::

    sum rule    W^(i) = W^(i-1) + v^(i) ⊗ φ'(k^(i))                                   (linear attention)
    delta rule  W^(i) = W^(i-1) + β^(i) (v^(i) - W^(i-1) φ'(k^(i))) ⊗ φ'(k^(i)),  β^(i) = σ(W_β x^(i))
    read        y^(i) = W^(i) φ'(q^(i))

with ``a ⊗ b = a bᵀ``. The delta rule first retrieves the value ``v̄ = W φ'(k)`` currently bound
to the key and replaces a fraction ``β`` of it by the new value, so that the memory can correct a
binding instead of only adding to it (the sum rule's capacity limit, paper Sec. 4.1-4.2).

Two execution paths compute the same function (tested to 1e-4 in float32):

- the **step form** (:func:`fast_weight_step`): one update of ``W`` per time step; used for
  ``T = 1`` rollouts, for ``chunk_size = 1`` and for ``return_debug``;
- the **chunk form** (:func:`fast_weight_chunked`): Yang et al. 2024, "Parallelizing Linear
  Transformers with the Delta Rule over Sequence Length": the sequence is cut into chunks of ``C``
  steps; inside a chunk everything is matrix products (the delta rule's product of
  ``I - β k kᵀ`` factors in the WY/UT form, one triangular solve), and only the ``T / C`` chunk
  states are passed on sequentially.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memagents.cores.base import MemoryCore, check_positive_int

#: Update rules of the fast weights (``update`` kwarg).
UPDATES = ("sum", "delta")

#: Feature maps φ of keys and queries (``feature_map`` kwarg).
FEATURE_MAPS = ("elu1", "dpfp")

#: Lower bound of the sum in the sum normalisation; only reached by DPFP features that are all
#: zero (e.g. a zero key), which then map to the zero vector instead of 0 / 0.
NORM_EPS = 1e-6


class FWPState(NamedTuple):
    """State of the fast-weight core: one fast weight matrix per head."""

    fast_weights: Tensor  # [B, H, d_v, d_φ]  W^(i): maps a feature φ'(q) of size d_φ to a value


# -- feature maps ------------------------------------------------------------------------------


def elu1(x: Tensor) -> Tensor:
    """``φ(x) = ELU(x) + 1`` elementwise (Katharopoulos et al. 2020): positive, same size.

    :param x: ``[..., d_key]``.
    :return: ``[..., d_key]``, every entry > 0.
    """
    return F.elu(x) + 1.0


def dpfp(x: Tensor, nu: int = 1) -> Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021, Sec. 5.3), before normalisation.

    With ``r = ReLU([x, -x])`` of size ``2 d_key`` (indices taken modulo ``2 d_key``)::

        φ_{2 d_key (i - 1) + j}(x) = r_j · r_{j + i},   i = 1..ν,  j = 1..2 d_key

    so ``φ(x)`` has ``d_φ = 2 d_key ν`` non-negative entries, block ``i`` holding the products of
    ``r`` with ``r`` rolled by ``i``. Most entries are zero, and the features of keys that point in
    different directions are nearly orthogonal. A key can map to the zero vector (with ``ν = 1``,
    one whose signs alternate, e.g. ``[1, -1, 1]``): it then neither writes nor reads.

    ``r`` and its rolls are computed as ``ReLU(x E_i)`` with the signed permutation matrices
    ``E_i [d_key, 2 d_key]`` (column ``j`` of ``E_i`` picks ``±x`` for entry ``j + i`` of
    ``[x, -x]``): one exact matrix product instead of concatenations and rolls along the last
    axis, which are slow on CPU and in the backward pass.

    :param x: ``[..., d_key]``.
    :param nu: ``ν`` in ``1 .. 2 d_key - 1``.
    :return: ``[..., 2 d_key ν]``, entries ≥ 0.
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    E = torch.cat([eye, -eye], dim=1)  # [d, 2d]: x E = [x, -x]
    # E_i is E with its columns rolled left by i: (x E_i)_j = [x, -x]_{j + i}
    E_rolled = torch.cat([torch.roll(E, shifts=-i, dims=1) for i in range(1, nu + 1)], dim=1)
    # 2-D products on [M, d]: a batched [..., d] @ [d, n] product is far slower on CPU, and
    # separate products (rather than slices of one) keep slice gradients out of the backward
    flat = x.reshape(-1, d)
    r = F.relu(flat @ E)  # [M, 2d]
    r_rolled = F.relu(flat @ E_rolled).view(-1, nu, 2 * d)  # [M, ν, 2d], block i: r rolled by i
    return (r.unsqueeze(1) * r_rolled).view(*lead, 2 * d * nu)


def sum_normalise(phi: Tensor, eps: float = NORM_EPS) -> Tensor:
    """``φ'(x) = φ(x) / Σ_j φ(x)_j`` (Schlag et al. 2021, Sec. 4.2, "normalisation").

    Both feature maps are non-negative, so this makes every key and query feature a vector of
    unit L1 norm. The paper applies it to keys *and* queries in place of linear attention's
    denominator ``z^(i) · φ(q^(i))`` with ``z^(i) = Σ_j φ(k^(j))``: that denominator is a sum over
    all past keys, which the delta rule (which also *removes* values) does not have, and without any
    normalisation the write strength ``φ(k)ᵀ φ(k)`` of the delta rule is unbounded and the update
    ``W (I - β φ(k) φ(k)ᵀ)`` can diverge. With ``‖φ'(k)‖₁ = 1`` and ``φ' ≥ 0``,
    ``‖φ'(k)‖₂² ≤ 1``, so for ``β ∈ (0, 1)`` each factor ``I - β φ' φ'ᵀ`` is a contraction and
    ``‖W φ'(q)‖`` is bounded by the largest stored value.

    :param phi: ``[..., d_φ]``, non-negative.
    :param eps: the sum is clamped below at ``eps`` (an all-zero DPFP feature stays zero).
    :return: ``[..., d_φ]`` with unit L1 norm (or zero).
    """
    return phi * phi.sum(dim=-1, keepdim=True).clamp_min(eps).reciprocal()


# -- the two execution paths -------------------------------------------------------------------


def fast_weight_step(
    W: Tensor, k: Tensor, v: Tensor, q: Tensor, beta: Tensor | None, update: str
) -> tuple[Tensor, Tensor]:
    """One step of the fast weights: update ``W`` with ``(k, v[, β])``, then read with ``q``.

    :param W: ``[B, H, d_v, d_φ]``, ``W^(i-1)``.
    :param k: ``[B, H, d_φ]``, the key feature ``φ'(k^(i))``.
    :param v: ``[B, H, d_v]``, the value ``v^(i)``.
    :param q: ``[B, H, d_φ]``, the query feature ``φ'(q^(i))``.
    :param beta: ``[B, H]``, ``β^(i)`` (delta rule only; ignored by the sum rule).
    :param update: ``"sum"`` or ``"delta"``.
    :return: ``y^(i) = W^(i) φ'(q^(i))`` ``[B, H, d_v]`` and ``W^(i)`` ``[B, H, d_v, d_φ]``.
    """
    if update == "delta":
        v_old = torch.einsum("bhvf,bhf->bhv", W, k)  # v̄ = W^(i-1) φ'(k)
        write = beta.unsqueeze(-1) * (v - v_old)  # β (v - v̄)
    else:
        write = v
    W = W + torch.einsum("bhv,bhf->bhvf", write, k)
    y = torch.einsum("bhvf,bhf->bhv", W, q)
    return y, W


def fast_weight_chunked(
    W: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    beta: Tensor | None,
    starts: Tensor | None,
    chunk_size: int,
    update: str,
) -> tuple[Tensor, Tensor]:
    """The recurrence of :func:`fast_weight_step` over ``T`` steps, in chunks of ``C`` steps.

    **Inside a chunk** starting from the state ``S``, with the chunk's key features, values and
    query features as rows ``K [C, d_φ]``, ``V [C, d_v]``, ``Q [C, d_φ]`` (Yang et al. 2024,
    Sec. 3):

    - Delta rule. The state after step ``t`` of the chunk is ``S_t = S P_t + H_t`` with
      ``P_t = Π_{i≤t} (I - β_i k_i k_iᵀ)``, which the WY representation writes as
      ``P_t = I - Σ_{i≤t} w_i k_iᵀ`` and ``H_t = Σ_{i≤t} u_i k_iᵀ``, where
      ``w_t = β_t (k_t - Σ_{i<t} (k_iᵀ k_t) w_i)`` and ``u_t = β_t (v_t - Σ_{i<t} (k_iᵀ k_t) u_i)``.
      Stacked as rows, this is the UT transform ``(I + A) [Wy | U] = diag(β) [K | V]`` with
      ``A = strict_tril(diag(β) K Kᵀ)``: one unit-lower-triangular solve per chunk, for all
      chunks at once since it does not involve ``S``.
    - Sum rule: ``P_t = I`` and ``H_t = Σ_{i≤t} v_i k_iᵀ``, i.e. ``Wy = 0`` and ``U = V``.

    Then, with the "new values" ``Ũ = U - Wy Sᵀ`` (``u_i - S w_i``: what step ``i`` writes,
    given the state the chunk started from) and the causal scores ``A_qk = tril(Q Kᵀ)`` (diagonal
    included: ``y_t`` reads ``S_t``)::

        O     = Q Sᵀ + A_qk Ũ                            [C, d_v]
        S_C   = S + Ũᵀ K                                 [d_v, d_φ]

    ``A_qk``, ``U`` and ``Wy`` are computed for all chunks at once; the ``T / C`` sequential
    steps are the four small products above.

    **Resets inside a chunk.** An episode start at step ``t`` sets the state to zero before step
    ``t``, so each chunk splits into segments (the steps between starts) that do not interact,
    and every segment but the first starts from zero instead of ``S``:

    - ``A`` and ``A_qk`` are masked to pairs ``(t, i)`` in the same segment, so that the UT
      transform and the intra-chunk outputs restart at every start;
    - ``Q Sᵀ`` and ``Wy Sᵀ`` are kept only in rows before the chunk's first start;
    - the next state keeps ``S`` only if the chunk has no start, and sums ``Ũᵀ K`` over the
      chunk's last segment only.

    With finite inputs this is exact. (Unlike the step form's ``torch.where`` reset, a NaN or inf
    of the ending episode in the same chunk can still reach the next one through a zero weight in
    a matrix product, ``0 · NaN``; the carried state itself is reset with ``torch.where``.)
    ``T`` need not be a multiple of ``C``: the last chunk is padded with zero keys, values,
    queries and ``β``, which change nothing.

    :param W: ``[B, H, d_v, d_φ]``, the state before step 0.
    :param k: ``[T, B, H, d_φ]``, key features ``φ'(k^(i))``.
    :param v: ``[T, B, H, d_v]``, values ``v^(i)``.
    :param q: ``[T, B, H, d_φ]``, query features ``φ'(q^(i))``.
    :param beta: ``[T, B, H]``, learning rates ``β^(i)`` (delta rule only).
    :param starts: ``[T, B]`` bool, True where step ``t`` begins an episode (the state is set
        to zero first); ``None`` for no resets.
    :param chunk_size: ``C`` ≥ 1.
    :param update: ``"sum"`` or ``"delta"``.
    :return: ``y [T, B, H, d_v]`` and the state after the last step ``[B, H, d_v, d_φ]``.
    """
    T, B, H, Dk = k.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    pad = N * C - T
    delta = update == "delta"

    def chunked(a: Tensor) -> Tensor:
        # [T, B, H, d] -> (pad) [N, C, B, H, d] -> [N, B, H, C, d]: chunk n is a ``C x d`` block
        if pad:
            a = F.pad(a, (0, 0) * (a.dim() - 1) + (0, pad))
        return a.reshape(N, C, *a.shape[1:]).movedim(1, -2).contiguous()

    k, v, q = chunked(k), chunked(v), chunked(q)
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()  # i ≤ t
    carry = in_last = carry_last = None
    qk_mask = causal
    if starts is not None:
        if pad:
            starts = F.pad(starts, (0, 0, 0, pad), value=False)
        seg = starts.reshape(N, C, B).transpose(1, 2).long().cumsum(-1)  # [N, B, C] segment ids
        same = (seg.unsqueeze(-1) == seg.unsqueeze(-2)).unsqueeze(2)  # [N, B, 1, C, C]
        qk_mask = causal & same
        carry = (seg == 0).view(N, B, 1, C, 1)  # rows before the chunk's first start
        in_last = same[..., -1, :].unsqueeze(-1)  # [N, B, 1, C, 1]: rows in the last segment
        carry_last = carry[:, :, :, -1:, :]  # [N, B, 1, 1, 1]: the chunk has no start

    scores = q @ k.transpose(-1, -2)  # Q Kᵀ [N, B, H, C, C]
    # A_qk: tril is cheaper than a masked where, forward and backward
    scores = scores.tril() if starts is None else torch.where(qk_mask, scores, 0.0)
    if delta:
        b = chunked(beta.unsqueeze(-1))  # [N, B, H, C, 1]
        bk = b * k  # diag(β) K
        # A = diag(β) K Kᵀ: the solve reads only its strict lower triangle (the unit diagonal
        # of I + A is implied by unitriangular) and autograd gives a gradient only there
        A = bk @ k.transpose(-1, -2)  # [N, B, H, C, C]
        if starts is not None:
            A = torch.where(same, A, 0.0)
        wu = torch.linalg.solve_triangular(
            A, torch.cat([bk, b * v], dim=-1), upper=False, unitriangular=True
        )
        w, u = wu.split([Dk, Dv], dim=-1)  # Wy [N, B, H, C, d_φ], U [N, B, H, C, d_v]
    else:
        w, u = None, v
    k_last = k if in_last is None else torch.where(in_last, k, 0.0)  # K on the last segment

    # per-chunk views by unbind, whose backward is one stack (indexing [n] would allocate and
    # accumulate a full-size gradient per chunk)
    q_n, u_n, k_n, s_n = q.unbind(0), u.unbind(0), k_last.unbind(0), scores.unbind(0)
    w_n = w.unbind(0) if delta else None
    outputs = []
    for n in range(N):
        S_t = W.transpose(-1, -2)  # Sᵀ [B, H, d_φ, d_v]
        q_s = q_n[n] @ S_t  # Q Sᵀ [B, H, C, d_v]
        new_values = u_n[n]
        if delta:
            w_s = w_n[n] @ S_t  # Wy Sᵀ
            new_values = new_values - (w_s if carry is None else torch.where(carry[n], w_s, 0.0))
        if carry is not None:
            q_s = torch.where(carry[n], q_s, 0.0)
            W = torch.where(carry_last[n], W, 0.0)
        outputs.append(q_s + s_n[n] @ new_values)  # Q Sᵀ + A_qk Ũ
        W = W + new_values.transpose(-1, -2) @ k_n[n]  # S + Ũᵀ K
    y = torch.stack(outputs)  # [N, B, H, C, d_v]
    y = y.movedim(-2, 1).reshape(N * C, B, H, Dv)  # -> [N, C, B, H, d_v] -> [T + pad, B, H, d_v]
    return y[:T], W


# -- the core ----------------------------------------------------------------------------------


class FWPCore(MemoryCore):
    """Fast weight programmer core (Schlag et al. 2021) with the sum or the delta update rule.

    Per step, with ``H`` heads of key size ``d_key`` and value size ``d_v = d_key`` (as the
    paper's ``d_k = d_v``)::

        k, v, q, β = split(W_slow x^(i));   φ'(k) = φ(k) / Σ φ(k);   φ'(q) likewise;   β = σ(β)
        W^(i) = update(W^(i-1), φ'(k), v, β)            per head, see the module docstring
        y^(i) = W_o [W^(i)_1 φ'(q_1); ...; W^(i)_H φ'(q_H)] + b_o                 [hidden_size]

    ``W_slow`` is one linear layer (the slow net) producing all heads' ``k, q [d_key]``,
    ``v [d_v]`` and, for the delta rule only, ``β``. The fast weights start each episode at zero
    (nothing learned lives in the state). Sequences of ``T > 1`` steps run in the chunk-parallel
    form with chunks of ``chunk_size`` steps; ``T = 1``, ``chunk_size = 1`` and ``return_debug``
    run the step form. Both honour ``episode_starts`` at any step.

    :param input_size: features per step of ``x``.
    :param hidden_size: output width (the output projection ``W_o``'s size).
    :param num_heads: ``H``, independent fast weight matrices.
    :param key_size: ``d_key``, size of each head's key and query before the feature map, and
        ``d_v``, the size of each head's value.
    :param update: ``"delta"`` (default; delta rule with learned ``β``) or ``"sum"`` (linear
        attention: ``W += v ⊗ φ'(k)``, no ``β``).
    :param feature_map: ``"dpfp"`` (default; ``d_φ = 2 d_key ν``) or ``"elu1"``
        (``ELU + 1``, ``d_φ = d_key``); both sum-normalised, see :func:`sum_normalise`.
    :param chunk_size: ``C``, steps per chunk of the chunk-parallel form (default 64);
        1 runs every sequence in the step form.
    :param dpfp_nu: ``ν`` of DPFP, ``1 .. 2 d_key - 1`` (default 1; unused by ``"elu1"``).
    :raises ValueError: a value out of its allowed range, naming it and the allowed values.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        num_heads: int = 4,
        key_size: int = 16,
        update: str = "delta",
        feature_map: str = "dpfp",
        chunk_size: int = 64,
        dpfp_nu: int = 1,
    ):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.output_size = check_positive_int("hidden_size", hidden_size)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.key_size = check_positive_int("key_size", key_size)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if update not in UPDATES:
            raise ValueError(
                f"update must be one of {', '.join(map(repr, UPDATES))}; got {update!r}"
            )
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))}; "
                f"got {feature_map!r}"
            )
        max_nu = 2 * key_size - 1
        if isinstance(dpfp_nu, bool) or not isinstance(dpfp_nu, int) or not 1 <= dpfp_nu <= max_nu:
            raise ValueError(
                f"dpfp_nu must be an integer in 1 .. 2 * key_size - 1 = {max_nu}; got {dpfp_nu!r}"
            )
        self.update = update
        self.feature_map = feature_map
        self.dpfp_nu = dpfp_nu
        self.value_size = key_size  # d_v
        self.feature_size = key_size * (2 * dpfp_nu if feature_map == "dpfp" else 1)  # d_φ
        H, Dk, Dv = num_heads, key_size, self.value_size
        self._split = [2 * H * Dk, H * Dv] + ([H] if update == "delta" else [])
        self.slow = nn.Linear(input_size, sum(self._split))  # W_slow: x -> [k | q], v[, β]
        self.out = nn.Linear(H * Dv, hidden_size)  # W_o

    def extra_repr(self) -> str:
        return (
            f"update={self.update!r}, feature_map={self.feature_map!r}, heads={self.num_heads}, "
            f"d_key={self.key_size}, d_phi={self.feature_size}, chunk_size={self.chunk_size}"
        )

    # -- state -------------------------------------------------------------------------------
    def initial_state(self, batch_size, device=None) -> FWPState:
        shape = (batch_size, self.num_heads, self.value_size, self.feature_size)
        return FWPState(torch.zeros(shape, device=self._device(device), dtype=self._dtype()))

    def state_shapes_tree(self) -> FWPState:
        return FWPState((self.num_heads, self.value_size, self.feature_size))

    # -- slow net ----------------------------------------------------------------------------
    def _phi(self, x: Tensor) -> Tensor:
        """``φ'``: the feature map, then sum normalisation. ``[..., d_key] -> [..., d_φ]``."""
        phi = dpfp(x, self.dpfp_nu) if self.feature_map == "dpfp" else elu1(x)
        return sum_normalise(phi)

    def _program(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The slow net: ``x [..., I]`` -> ``φ'(k) [..., H, d_φ]``, ``v [..., H, d_v]``,
        ``φ'(q) [..., H, d_φ]``, ``β [..., H]`` (``None`` for the sum rule)."""
        H = self.num_heads
        kq, v, *b = self.slow(x).split(self._split, dim=-1)
        kq = self._phi(kq.unflatten(-1, (2 * H, self.key_size)))  # keys and queries at once
        k, q = kq.split(H, dim=-2)
        v = v.unflatten(-1, (H, self.value_size))
        beta = torch.sigmoid(b[0]) if b else None
        return k, v, q, beta

    # -- time --------------------------------------------------------------------------------
    def step(self, x, state, return_debug=False):
        """One step: ``x [B, I]``, ``state.fast_weights [B, H, d_v, d_φ]`` -> ``y [B, hidden]``.

        Debug tensors: ``fast_weights`` ``W^(i)`` ``[B, H, d_v, d_φ]``, ``key`` ``φ'(k)`` and
        ``query`` ``φ'(q)`` ``[B, H, d_φ]``, ``value`` ``[B, H, d_v]``, and for the delta rule
        ``beta`` ``[B, H]``.
        """
        k, v, q, beta = self._program(x)
        y, W = fast_weight_step(state.fast_weights, k, v, q, beta, self.update)
        y = self.out(y.flatten(-2))
        if not return_debug:
            return y, FWPState(W)
        debug = {"fast_weights": W, "key": k, "query": q, "value": v}
        if beta is not None:
            debug["beta"] = beta
        return y, FWPState(W), debug

    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        """Run over ``x [T, B, I]``; see :meth:`MemoryCore.forward`. The step form runs for
        ``T = 1``, ``chunk_size = 1`` or ``return_debug``; otherwise the chunk-parallel form."""
        state, starts = self._check_inputs(x, state, episode_starts)
        T = x.shape[0]
        if return_debug or T == 1 or self.chunk_size == 1:
            return self._forward_steps(x, state, starts, return_debug)
        k, v, q, beta = self._program(x)  # [T, B, H, d]
        y, W = fast_weight_chunked(
            state.fast_weights, k, v, q, beta, starts, self.chunk_size, self.update
        )
        y = self.out(y.flatten(-2))  # [T, B, H, d_v] -> [T, B, H * d_v]
        return y, FWPState(W)

    def _forward_steps(self, x: Tensor, state: FWPState, starts: Tensor | None, return_debug: bool):
        """The step form over a sequence: the slow net for all steps at once (it has no state),
        then one fast-weight update per step, resetting ``W`` to zero where an episode starts."""
        k, v, q, beta = self._program(x)  # [T, B, H, d], β [T, B, H]
        W = state.fast_weights
        ys, debug_steps = [], []
        for t in range(x.shape[0]):
            if starts is not None:
                W = torch.where(starts[t].view(-1, 1, 1, 1), 0.0, W)  # reset to the initial W = 0
            b_t = beta[t] if beta is not None else None
            y, W = fast_weight_step(W, k[t], v[t], q[t], b_t, self.update)
            ys.append(y)
            if return_debug:
                dbg = {"fast_weights": W, "key": k[t], "query": q[t], "value": v[t]}
                if b_t is not None:
                    dbg["beta"] = b_t
                debug_steps.append(dbg)
        y = self.out(torch.stack(ys).flatten(-2))  # [T, B, H, d_v] -> [T, B, hidden]
        if return_debug:
            debug = {name: torch.stack([d[name] for d in debug_steps]) for name in debug_steps[0]}
            return y, FWPState(W), debug
        return y, FWPState(W)
