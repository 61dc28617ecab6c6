"""The addressing mechanisms of the NTM and the DNC against the papers' equations.

Three kinds of checks, after DeepMind's own DNC tests (``dnc/addressing_test.py``,
``dnc/access_test.py``):

- hand computations: small inputs whose result is worked out in the comments from the paper's
  equation (DNC Methods, "Memory addressing"; NTM section 3.3);
- invariants under random inputs (hypothesis): weightings non-negative and summing to at most 1,
  usage in ``[0, 1]``, link in ``[0, 1]`` with zero diagonal and rows and columns summing to at
  most 1, both for the functions alone and for the real ``DNCCore`` driven over many steps;
- gradients: float64 ``gradcheck`` of the hand-written backward of the fused link step, agreement
  with a plain-torch reference of the paper's link equation, no NaN on an all-zero memory.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import build_core, hypothesis_settings, randomize_initial_state
from hypothesis import given
from hypothesis import strategies as st

from memagents.cores import addressing as A
from memagents.cores.rnn import LSTMState

F64 = torch.float64
EPS = A.EPSILON
#: Slack for comparisons of float32 sums against their bound 1.
TOL32 = 1e-5
#: Slack for float64.
TOL64 = 1e-12


def t64(data) -> torch.Tensor:
    return torch.tensor(data, dtype=F64)


def one_hot(n: int, i: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=F64)
    out[i] = 1.0
    return out


def random_weightings(gen, shape, sharpness=1.0, gate=None) -> torch.Tensor:
    """Non-negative weightings over the last axis summing to at most 1: ``g * softmax``."""
    logits = sharpness * torch.randn(shape, generator=gen, dtype=F64)
    if gate is None:
        gate = torch.rand(shape[:-1], generator=gen, dtype=F64)
    return gate.unsqueeze(-1) * torch.softmax(logits, -1)


# ================================================================================================
# Content addressing (NTM eqs. 5-6, DNC "Content-based addressing")
# ================================================================================================


def test_content_weights_hand_computed():
    """M rows [1,0], [0,1], [1,1]; key [1,0], β=2: cosines 1, 0, 1/√2, then softmax(β K)."""
    memory = t64([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    keys = t64([[[1.0, 0.0], [0.0, 3.0]]])  # two heads; the second key points along row 1
    strengths = t64([[2.0, 1.0]])
    weights = A.content_weights(memory, keys, strengths)

    e = [math.exp(2 * 1.0), math.exp(2 * 0.0), math.exp(2 * (1 / math.sqrt(2)))]
    expected_0 = [v / sum(e) for v in e]
    e = [math.exp(0.0), math.exp(1.0), math.exp(1 / math.sqrt(2))]
    expected_1 = [v / sum(e) for v in e]
    torch.testing.assert_close(weights, t64([[expected_0, expected_1]]), rtol=0, atol=1e-6)


def test_cosine_similarity_hand_computed():
    """u=[3,4], rows [3,4], [-4,3], [-3,-4], [6,8]: cosines 1, 0, -1, 1."""
    memory = t64([[[3.0, 4.0], [-4.0, 3.0], [-3.0, -4.0], [6.0, 8.0]]])
    keys = t64([[[3.0, 4.0]]])
    sim = A.cosine_similarity(memory, keys)
    torch.testing.assert_close(sim, t64([[[1.0, 0.0, -1.0, 1.0]]]), rtol=0, atol=1e-7)


@hypothesis_settings(40)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 7), heads=st.integers(1, 3))
def test_content_weights_are_distributions(seed, n, heads):
    """Non-negative, summing to 1, equal to softmax(β u·v / (|u| |v|)) computed plainly, and
    unchanged by scaling rows and keys (cosine similarity). Rows and keys have norms ≥ 0.5, where
    the eps under the norms changes nothing at 1e-5."""
    gen = torch.Generator().manual_seed(seed)

    def vectors(*shape):
        v = torch.randn(*shape, generator=gen, dtype=F64)
        norms = 0.5 + 2.5 * torch.rand(*shape[:-1], 1, generator=gen, dtype=F64)
        return v / v.norm(dim=-1, keepdim=True) * norms

    memory, keys = vectors(2, n, 3), vectors(2, heads, 3)
    strengths = A.oneplus(3 * torch.randn(2, heads, generator=gen, dtype=F64))
    w = A.content_weights(memory, keys, strengths)
    assert w.shape == (2, heads, n)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, heads, dtype=F64))
    cos = torch.einsum("bhw,bnw->bhn", keys, memory) / (
        keys.norm(dim=-1).unsqueeze(-1) * memory.norm(dim=-1).unsqueeze(1)
    )
    expected = torch.softmax(strengths.unsqueeze(-1) * cos, -1)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-5)
    scaled = A.content_weights(memory * 7.0, keys * 0.5, strengths)
    torch.testing.assert_close(scaled, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["all-zero", "first-row-ones"])
def test_content_weights_no_nan_on_zero_memory(case):
    """DeepMind's divide-by-zero case: zero memory rows and zero keys give finite outputs and
    finite gradients w.r.t. memory, keys and strengths (float32, where it is tightest)."""
    B, H, N, W = 2, 3, 5, 4
    memory = torch.zeros(B, N, W)
    if case == "first-row-ones":
        memory[:, 0] = 1.0
    keys = torch.randn(B, H, W)
    keys[0] = 0.0  # batch element 0: zero keys as well
    strengths = A.oneplus(torch.randn(B, H))
    for t in (memory, keys, strengths):
        t.requires_grad_(True)
    w = A.content_weights(memory, keys, strengths)
    assert torch.isfinite(w).all()
    if case == "all-zero":
        # every similarity is 0: the weighting is uniform
        torch.testing.assert_close(w, torch.full((B, H, N), 1.0 / N))
    grads = torch.autograd.grad((w * torch.randn(B, H, N)).sum(), (memory, keys, strengths))
    for g in grads:
        assert torch.isfinite(g).all()


# ================================================================================================
# NTM location addressing: interpolation (eq. 7), shift (eq. 8), sharpening (eq. 9)
# ================================================================================================


def test_interpolate_hand_computed():
    """w_g = g w_c + (1 - g) w_prev, g = 0.25 and g = 1."""
    content = t64([[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    previous = t64([[[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]]])
    gate = t64([[0.25, 1.0]])
    out = A.interpolate(content, previous, gate)
    torch.testing.assert_close(out, t64([[[0.25, 0.0, 0.75], [0.2, 0.3, 0.5]]]))


def test_shift_index_hand_computed():
    """index[i, k] = (i - (k - S)) mod N, N=4, S=1: column k=0 is shift -1, k=2 is shift +1."""
    index = A.shift_index(4, 1)
    expected = torch.tensor([[1, 0, 3], [2, 1, 0], [3, 2, 1], [0, 3, 2]])
    assert torch.equal(index, expected)


def _shift(w: list[float], s: list[float]) -> torch.Tensor:
    """circular_shift of one weighting ``w`` (N) by one distribution ``s`` (2S+1)."""
    n, k = len(w), len(s)
    index = A.shift_index(n, (k - 1) // 2)
    return A.circular_shift(t64([[w]]), t64([[s]]), index)[0, 0]


@pytest.mark.parametrize(
    ("position", "shift", "expected"),
    [
        (0, +1, 1),
        (2, +1, 3),
        (4, +1, 0),  # wraps around the end
        (2, -1, 1),
        (0, -1, 4),  # wraps around the start
        (3, 0, 3),
    ],
)
def test_circular_shift_moves_a_one_hot(position, shift, expected):
    """s puts all its mass on shift ``shift`` (entries are shifts -1, 0, +1); N=5."""
    s = [0.0, 0.0, 0.0]
    s[shift + 1] = 1.0
    out = _shift(one_hot(5, position).tolist(), s)
    assert torch.equal(out, one_hot(5, expected))


def test_circular_shift_spread_distribution_hand_computed():
    """eq. 8 w~[i] = Σ_j w[j] s[i - j]: s = (0.1 at -1, 0.6 at 0, 0.3 at +1)."""
    s = [0.1, 0.6, 0.3]
    torch.testing.assert_close(_shift([0.0, 0.0, 1.0, 0.0, 0.0], s), t64([0.0, 0.1, 0.6, 0.3, 0.0]))
    # a one-hot at the edge wraps: mass 0.1 moves to slot 4, 0.3 to slot 1
    torch.testing.assert_close(_shift([1.0, 0.0, 0.0, 0.0, 0.0], s), t64([0.6, 0.3, 0.0, 0.0, 0.1]))
    # a spread weighting: w = (0.5, 0.5, 0, 0): w~[0] = .5*.6 + .5*.1, w~[1] = .5*.3 + .5*.6, ...
    torch.testing.assert_close(_shift([0.5, 0.5, 0.0, 0.0], s), t64([0.35, 0.45, 0.15, 0.05]))
    # S = 2 (shifts -2..2): all mass on +2 then on -2
    torch.testing.assert_close(_shift([0.0, 1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0, 1.0]), one_hot(5, 3))
    torch.testing.assert_close(_shift([0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0, 0, 0, 0]), one_hot(5, 4))


def test_circular_shift_is_per_batch_element_and_head():
    """One call with a different shift in each (batch, head) cell: no mixing between cells."""
    N = 6
    index = A.shift_index(N, 1)
    w = torch.zeros(2, 2, N, dtype=F64)
    s = torch.zeros(2, 2, 3, dtype=F64)
    cells = {(0, 0): (0, -1, 5), (0, 1): (2, 0, 2), (1, 0): (5, +1, 0), (1, 1): (3, +1, 4)}
    for (b, h), (pos, shift, _) in cells.items():
        w[b, h, pos] = 1.0
        s[b, h, shift + 1] = 1.0
    out = A.circular_shift(w, s, index)
    for (b, h), (_, _, target) in cells.items():
        assert torch.equal(out[b, h], one_hot(N, target)), (b, h)


def test_sharpen_gamma_one_is_identity_up_to_eps():
    """γ = 1: (w + eps) / Σ (w + eps), i.e. w itself when w sums to 1, up to eps."""
    w = t64([[[0.5, 0.3, 0.2, 0.0]]])
    out = A.sharpen(w, t64([[1.0]]))
    expected = (w + EPS) / (1.0 + 4 * EPS)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(out, w, rtol=0, atol=4 * EPS)


def test_sharpen_gamma_two_hand_computed():
    """γ = 2: (0.5, 0.3, 0.2) -> (25, 9, 4) / 38; γ = 3 on (0.5, 0.5) stays (0.5, 0.5)."""
    out = A.sharpen(t64([[[0.5, 0.3, 0.2]]]), t64([[2.0]]))
    torch.testing.assert_close(out, t64([[[25 / 38, 9 / 38, 4 / 38]]]), rtol=0, atol=1e-5)
    out = A.sharpen(t64([[[0.5, 0.5]]]), t64([[3.0]]))
    torch.testing.assert_close(out, t64([[[0.5, 0.5]]]))
    # an unnormalised input is normalised: (1, 3) with γ = 2 -> (1, 9) / 10
    out = A.sharpen(t64([[[1.0, 3.0]]]), t64([[2.0]]))
    torch.testing.assert_close(out, t64([[[0.1, 0.9]]]), rtol=0, atol=1e-5)


def test_oneplus_hand_computed():
    torch.testing.assert_close(A.oneplus(t64([0.0])), t64([1.0 + math.log(2.0)]))
    torch.testing.assert_close(A.oneplus(t64([-100.0])), t64([1.0]))
    torch.testing.assert_close(A.oneplus(t64([5.0])), t64([1.0 + math.log1p(math.exp(5.0))]))


# ================================================================================================
# Reading and writing (NTM eqs. 2-4; DNC "Reading and writing to memory")
# ================================================================================================


def test_read_memory_hand_computed():
    """r = M^T w: w = (0.5, 0, 0.5) on rows [1,2], [3,4], [5,6] gives [3, 4]."""
    memory = t64([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    out = A.read_memory(memory, t64([[[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]]))
    torch.testing.assert_close(out, t64([[[3.0, 4.0], [3.0, 4.0]]]))


def test_erase_and_add_one_head_hand_computed():
    """M' = M ∘ (1 - w e^T) + w a^T with w = (1, 0.5, 0), e = (1, 0.5), a = (10, 20):
    row 0: [1*0, 2*0.5] + [10, 20] = [10, 21]; row 1: [3*0.5, 4*0.75] + [5, 10] = [6.5, 13];
    row 2 (w = 0) unchanged."""
    memory = t64([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    out = A.erase_and_add(
        memory, t64([[[1.0, 0.5, 0.0]]]), t64([[[1.0, 0.5]]]), t64([[[10.0, 20.0]]])
    )
    torch.testing.assert_close(out, t64([[[10.0, 21.0], [6.5, 13.0], [5.0, 6.0]]]))


def test_erase_and_add_two_heads_hand_computed():
    """Erase is the product over heads, adds are summed (DNC code release):
    head 2: w = (0, 0.5, 1), e = (0.5, 0), a = (1, -1).
    keep = (1 - w1 e1)(1 - w2 e2): row 0 [0, .5], row 1 [.5*.75, .75*1], row 2 [1*.5, 1];
    add  = w1 a1 + w2 a2:         row 0 [10, 20], row 1 [5.5, 9.5], row 2 [1, -1]."""
    memory = t64([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    weights = t64([[[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]])
    erase = t64([[[1.0, 0.5], [0.5, 0.0]]])
    add = t64([[[10.0, 20.0], [1.0, -1.0]]])
    out = A.erase_and_add(memory, weights, erase, add)
    expected = t64([[[10.0, 21.0], [3 * 0.375 + 5.5, 4 * 0.75 + 9.5], [5 * 0.5 + 1, 6 - 1]]])
    torch.testing.assert_close(out, expected)
    # the order of the heads does not matter
    torch.testing.assert_close(
        A.erase_and_add(memory, weights.flip(1), erase.flip(1), add.flip(1)), expected
    )


def test_erase_and_add_without_write_leaves_memory_unchanged():
    memory = torch.randn(2, 4, 3, dtype=F64)
    erase = torch.rand(2, 2, 3, dtype=F64)
    add = torch.randn(2, 2, 3, dtype=F64)
    out = A.erase_and_add(memory, torch.zeros(2, 2, 4, dtype=F64), erase, add)
    assert torch.equal(out, memory)


# ================================================================================================
# DNC dynamic memory allocation: usage, allocation (Methods, "Dynamic memory allocation")
# ================================================================================================


def test_usage_update_hand_computed_one_write_one_read():
    """u = (u + w - u∘w) ∘ ψ, ψ = 1 - f w^r.
    u = (.2, .5, 0), w = (.5, 0, .5): u + w - u w = (.6, .5, .5); f = .5, w^r = (0, 1, 0):
    ψ = (1, .5, 1), so u_t = (.6, .25, .5)."""
    out = A.usage_update(
        t64([[0.2, 0.5, 0.0]]),
        t64([[[0.5, 0.0, 0.5]]]),
        t64([[0.5]]),
        t64([[[0.0, 1.0, 0.0]]]),
    )
    torch.testing.assert_close(out, t64([[0.6, 0.25, 0.5]]))


def test_usage_update_hand_computed_two_writes_two_reads():
    """Combined write 1 - Π_h (1 - w_h): heads (.5, 0, 0) and (.5, .4, 0) give (.75, .4, 0);
    u = (0, .5, .5) -> (.75, .7, .5); ψ = (1 - .5*1)(1 - 1*.5) at slot 0 = .25, slot 2: 1 - 1*.5;
    u_t = (.75*.25, .7, .5*.5)."""
    out = A.usage_update(
        t64([[0.0, 0.5, 0.5]]),
        t64([[[0.5, 0.0, 0.0], [0.5, 0.4, 0.0]]]),
        t64([[0.5, 1.0]]),
        t64([[[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]]),
    )
    torch.testing.assert_close(out, t64([[0.1875, 0.7, 0.25]]))


def test_usage_full_write_makes_used_and_full_free_makes_free():
    """DeepMind's freeness case: a full write sets usage to 1, a full free to 0."""
    gen = torch.Generator().manual_seed(0)
    usage = torch.rand(1, 5, generator=gen, dtype=F64)
    write = torch.zeros(1, 1, 5, dtype=F64)
    write[0, 0, 3] = 1.0
    read = torch.zeros(1, 2, 5, dtype=F64)
    read[0, 0, 1] = 1.0
    out = A.usage_update(usage, write, t64([[1.0, 0.7]]), read)
    torch.testing.assert_close(out[0, 3], t64(1.0), rtol=0, atol=TOL64)
    assert out[0, 1] == 0.0
    others = [0, 2, 4]
    torch.testing.assert_close(out[0, others], usage[0, others], rtol=0, atol=0)


@hypothesis_settings(60)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), writes=st.integers(1, 3))
def test_usage_update_stays_in_unit_interval_and_is_monotone(seed, n, writes):
    gen = torch.Generator().manual_seed(seed)
    usage = torch.rand(2, n, generator=gen, dtype=F64)
    write = random_weightings(gen, (2, writes, n), sharpness=3.0)
    free = torch.rand(2, 3, generator=gen, dtype=F64)
    read = random_weightings(gen, (2, 3, n), sharpness=3.0)
    out = A.usage_update(usage, write, free, read)
    assert (out >= 0).all() and (out <= 1 + TOL64).all()
    # writing alone (free gates 0) can only increase usage; freeing alone only decrease it
    no_free = A.usage_update(usage, write, torch.zeros_like(free), read)
    assert (no_free >= usage - TOL64).all()
    no_write = A.usage_update(usage, torch.zeros_like(write), free, read)
    assert (no_write <= usage + TOL64).all()


def _hand_allocation(usage: list[float], eps: float) -> list[float]:
    """a[φ_j] = (1 - u[φ_j]) Π_{i<j} u[φ_i] with φ the slots by ascending usage, in Python."""
    u = [eps + (1 - eps) * v for v in usage]
    order = sorted(range(len(u)), key=lambda i: u[i])
    out, prod = [0.0] * len(u), 1.0
    for j in order:
        out[j] = (1 - u[j]) * prod
        prod *= u[j]
    return out


def test_allocation_hand_computed():
    """u = (.5, .1, .9): φ = (1, 0, 2); a[1] = .9, a[0] = .5 * .1, a[2] = .1 * .1 * .5."""
    usage = [0.5, 0.1, 0.9]
    out = A.allocation_weights(t64([usage]))[0]
    torch.testing.assert_close(out, t64([0.05, 0.9, 0.005]), rtol=0, atol=5 * EPS)
    # and exactly the formula with the eps the code maps usage through
    torch.testing.assert_close(out, t64(_hand_allocation(usage, EPS)), rtol=0, atol=TOL64)
    assert int(out.argmax()) == 1


def test_allocation_all_free_and_all_used():
    """Zero usage: the first slot in φ gets 1 - eps and the rest almost nothing; full usage:
    nothing can be allocated."""
    free = A.allocation_weights(torch.zeros(1, 4, dtype=F64))
    torch.testing.assert_close(free.sum(), t64(1.0), rtol=0, atol=2 * EPS)
    assert free.max() >= 1 - 2 * EPS
    used = A.allocation_weights(torch.ones(1, 4, dtype=F64))
    torch.testing.assert_close(used, torch.zeros(1, 4, dtype=F64), rtol=0, atol=TOL64)


@hypothesis_settings(100)
@given(
    usage=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=9, unique=True),
)
def test_allocation_picks_the_least_used_slot(usage):
    """argmax a = argmin u, argmin a = argmax u, Σ a = 1 - Π u' (telescoping), a in [0, 1]."""
    u = sorted(usage)
    if u[1] - u[0] < 1e-6 or u[-1] - u[-2] < 1e-6:
        return  # too close to call after the eps mapping
    t = t64([usage])
    a = A.allocation_weights(t)[0]
    assert (a >= 0).all() and (a <= 1).all()
    assert int(a.argmax()) == usage.index(u[0])
    assert int(a.argmin()) == usage.index(u[-1])
    mapped = EPS + (1 - EPS) * t[0]
    torch.testing.assert_close(a.sum(), 1 - mapped.prod(), rtol=0, atol=TOL64)
    torch.testing.assert_close(a, t64(_hand_allocation(usage, EPS)), rtol=0, atol=TOL64)


def test_write_allocation_two_heads_hand_computed():
    """Head 1 allocates from u + (1 - u) g_0 a_0. u = (.5, .1, .9), g_0 = 1:
    a_0 = (.05, .9, .005); u_1 = (.525, .91, .9005): φ = (0, 2, 1);
    a_1[0] = .475, a_1[2] = .0995 * .525, a_1[1] = .09 * .525 * .9005."""
    out = A.write_allocation_weights(t64([[0.5, 0.1, 0.9]]), t64([[1.0, 0.3]]))
    expected = t64([[[0.05, 0.9, 0.005], [0.475, 0.09 * 0.525 * 0.9005, 0.0995 * 0.525]]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_write_allocation_deepmind_cases():
    """DeepMind's freeness test: a closed gate leaves usage, so the next head gets the same
    allocation; usages 0 and 1e-4 go to heads 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    N = 9
    usage = 0.1 + 0.9 * torch.rand(2, N, generator=gen, dtype=F64)
    gates = torch.rand(2, 5, generator=gen, dtype=F64)
    gates[0, :4] = t64([1.0, 0.0, 1.0, 0.0])
    usage[1, 4] = 0.0
    usage[1, 6] = 1e-4
    gates[1, :2] = 1.0
    out = A.write_allocation_weights(usage, gates)
    assert out.shape == (2, 5, N)
    assert (out >= 0).all() and (out.sum(-1) <= 1 + TOL64).all()
    assert torch.equal(out[0, 1], out[0, 2])
    assert torch.equal(out[0, 3], out[0, 4])
    assert (out[0, 0] - out[0, 1]).abs().max() > 0.1
    assert (out[0, 2] - out[0, 3]).abs().max() > 0.1
    torch.testing.assert_close(out[1, 0], one_hot(N, 4), rtol=0, atol=1e-3)
    torch.testing.assert_close(out[1, 1], one_hot(N, 6), rtol=0, atol=1e-3)


def test_allocation_gradcheck():
    usage = t64([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.6, 0.4]]).requires_grad_(True)
    assert torch.autograd.gradcheck(A.allocation_weights, (usage,))
    gates = t64([[0.7, 0.4], [0.9, 0.1]]).requires_grad_(True)
    assert torch.autograd.gradcheck(A.write_allocation_weights, (usage, gates))


# ================================================================================================
# DNC temporal memory linkage (Methods, "Temporal memory linkage")
# ================================================================================================


def test_precedence_update_hand_computed():
    """p_t = (1 - Σ w) p + w: p = (.5, .5, 0), w = (0, .2, .3) -> (.25, .45, .3)."""
    out = A.precedence_update(t64([[[0.5, 0.5, 0.0]]]), t64([[[0.0, 0.2, 0.3]]]))
    torch.testing.assert_close(out, t64([[[0.25, 0.45, 0.3]]]))
    # no write keeps p; a full write replaces it by w
    p = t64([[[0.1, 0.2, 0.3], [0.3, 0.3, 0.3]]])
    w = t64([[[0.0, 0.0, 0.0], [0.0, 0.25, 0.75]]])
    out = A.precedence_update(p, w)
    torch.testing.assert_close(out[0, 0], p[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 1], w[0, 1], rtol=0, atol=TOL64)


def reference_link(link, write, precedence):
    """The paper's equation, written plainly:
    L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j], and L_t[i, i] = 0."""
    w_i = write.unsqueeze(-1)
    w_j = write.unsqueeze(-2)
    new = (1 - w_i - w_j) * link + w_i * precedence.unsqueeze(-2)
    n = link.shape[-1]
    return new * (1 - torch.eye(n, dtype=link.dtype))


def reference_directional(link, read):
    """f[r, h, i] = Σ_j L_h[i, j] w^r_r[j];  b[r, h, j] = Σ_i L_h[i, j] w^r_r[i]."""
    B, H, N, _ = link.shape
    R = read.shape[1]
    forward = torch.zeros(B, R, H, N, dtype=link.dtype)
    backward = torch.zeros(B, R, H, N, dtype=link.dtype)
    for b in range(B):
        for r in range(R):
            for h in range(H):
                forward[b, r, h] = link[b, h] @ read[b, r]
                backward[b, r, h] = link[b, h].T @ read[b, r]
    return forward, backward


def _scripted_link(slots_per_step: list[list[int]], N: int):
    """Run link_update / precedence_update with one-hot writes; one list of slots per step,
    one slot per write head (None: that head does not write)."""
    H = len(slots_per_step[0])
    link = torch.zeros(1, H, N, N, dtype=F64)
    precedence = torch.zeros(1, H, N, dtype=F64)
    for slots in slots_per_step:
        write = torch.zeros(1, H, N, dtype=F64)
        for h, slot in enumerate(slots):
            if slot is not None:
                write[0, h, slot] = 1.0
        link = A.link_update(link, write, precedence)
        precedence = A.precedence_update(precedence, write)
    return link[0], precedence[0]


def test_link_scripted_one_hot_writes():
    """Write slot 2, then 0, then 3: L[0, 2] = 1 (0 written after 2), L[3, 0] = 1, all else 0,
    and p = e_3."""
    link, precedence = _scripted_link([[2], [0], [3]], N=5)
    expected = torch.zeros(5, 5, dtype=F64)
    expected[0, 2] = 1.0
    expected[3, 0] = 1.0
    assert torch.equal(link[0], expected)
    assert torch.equal(precedence[0], one_hot(5, 3))


def test_link_rewriting_a_slot_clears_its_row_and_column():
    """... then write slot 0 again: the row and column of slot 0 are cleared (its old links
    L[0, 2] and L[3, 0] are gone) and L[0, 3] = 1 records the new transition 3 -> 0."""
    link, precedence = _scripted_link([[2], [0], [3], [0]], N=5)
    expected = torch.zeros(5, 5, dtype=F64)
    expected[0, 3] = 1.0
    assert torch.equal(link[0], expected)
    assert torch.equal(precedence[0], one_hot(5, 0))


def test_link_no_write_keeps_link_and_precedence():
    link, precedence = _scripted_link([[1], [3], [None], [None]], N=4)
    expected = torch.zeros(4, 4, dtype=F64)
    expected[3, 1] = 1.0
    assert torch.equal(link[0], expected)
    assert torch.equal(precedence[0], one_hot(4, 3))


def test_link_two_write_heads_are_independent():
    """DeepMind's linkage case: head 0 writes 0 then 1, head 1 writes 3 then 2."""
    link, precedence = _scripted_link([[0, 3], [1, 2]], N=4)
    e0 = torch.zeros(4, 4, dtype=F64)
    e0[1, 0] = 1.0
    e1 = torch.zeros(4, 4, dtype=F64)
    e1[2, 3] = 1.0
    assert torch.equal(link[0], e0)
    assert torch.equal(link[1], e1)
    assert torch.equal(precedence, torch.stack([one_hot(4, 1), one_hot(4, 2)]))


def test_directional_read_weights_follow_the_scripted_links():
    """With links 2 -> 0 -> 3 (L[0, 2] = L[3, 0] = 1): reading at 0, forward goes to 3 and
    backward to 2; reading at 2, forward goes to 0 and backward to nothing."""
    link, _ = _scripted_link([[2], [0], [3]], N=5)
    read = torch.stack([one_hot(5, 0), one_hot(5, 2)]).unsqueeze(0)  # [1, R=2, N]
    forward, backward = A.directional_read_weights(link.unsqueeze(0), read)
    assert forward.shape == backward.shape == (1, 2, 1, 5)
    assert torch.equal(forward[0, 0, 0], one_hot(5, 3))
    assert torch.equal(backward[0, 0, 0], one_hot(5, 2))
    assert torch.equal(forward[0, 1, 0], one_hot(5, 0))
    assert torch.equal(backward[0, 1, 0], torch.zeros(5, dtype=F64))


def _random_link_inputs(seed: int, B=2, H=2, N=4, R=3, steps=3):
    """A valid link / precedence reached by a few random writes, the next write and a read."""
    gen = torch.Generator().manual_seed(seed)
    link = torch.zeros(B, H, N, N, dtype=F64)
    precedence = torch.zeros(B, H, N, dtype=F64)
    for _ in range(steps):
        write = random_weightings(gen, (B, H, N), sharpness=2.0)
        link = reference_link(link, write, precedence)
        precedence = A.precedence_update(precedence, write)
    write = random_weightings(gen, (B, H, N), sharpness=2.0)
    read = random_weightings(gen, (B, R, N), sharpness=2.0)
    return link, write, precedence, read


def test_link_update_matches_the_reference_equation_values_and_gradients():
    link, write, precedence, _ = _random_link_inputs(0)
    inputs = [t.clone().requires_grad_(True) for t in (link, write, precedence)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (link, write, precedence)]
    out = A.link_update(*inputs)
    ref = reference_link(*ref_inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    cotangent = torch.randn(out.shape, dtype=F64)
    grads = torch.autograd.grad((out * cotangent).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), ref_inputs)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=TOL64)


def test_link_update_and_read_matches_the_reference_values_and_gradients():
    link, write, precedence, read = _random_link_inputs(1)
    inputs = [t.clone().requires_grad_(True) for t in (link, write, precedence, read)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (link, write, precedence, read)]
    out, fwd, bwd = A.link_update_and_read(*inputs)
    ref_link = reference_link(*ref_inputs[:3])
    ref_fwd, ref_bwd = reference_directional(ref_link, ref_inputs[3])
    for got, want in ((out, ref_link), (fwd, ref_fwd), (bwd, ref_bwd)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=TOL64)
    cotangents = [torch.randn(t.shape, dtype=F64) for t in (out, fwd, bwd)]
    loss = sum((t * c).sum() for t, c in zip((out, fwd, bwd), cotangents, strict=True))
    ref_loss = sum(
        (t * c).sum() for t, c in zip((ref_link, ref_fwd, ref_bwd), cotangents, strict=True)
    )
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    for name, g, r in zip(("link", "write", "precedence", "read"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=TOL64, msg=name)


@pytest.mark.parametrize("used", ["link only", "forward only", "backward only"])
def test_link_update_and_read_gradients_when_only_some_outputs_are_used(used):
    """The hand-written backward must handle outputs that receive no gradient."""
    link, write, precedence, read = _random_link_inputs(2, H=1, R=2)
    inputs = [t.clone().requires_grad_(True) for t in (link, write, precedence, read)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (link, write, precedence, read)]
    outs = A.link_update_and_read(*inputs)
    ref_link = reference_link(*ref_inputs[:3])
    ref_outs = (ref_link, *reference_directional(ref_link, ref_inputs[3]))
    k = ["link only", "forward only", "backward only"].index(used)
    grads = torch.autograd.grad(outs[k].square().sum(), inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_outs[k].square().sum(), ref_inputs, allow_unused=True)
    for g, r, inp in zip(grads, ref_grads, inputs, strict=True):
        g = torch.zeros_like(inp) if g is None else g
        r = torch.zeros_like(inp) if r is None else r
        torch.testing.assert_close(g, r, rtol=0, atol=TOL64)


def test_link_update_gradcheck():
    link, write, precedence, _ = _random_link_inputs(3, B=2, H=2, N=4)
    inputs = tuple(t.requires_grad_(True) for t in (link, write, precedence))
    assert torch.autograd.gradcheck(A.link_update, inputs)


def test_link_update_and_read_gradcheck():
    link, write, precedence, read = _random_link_inputs(4, B=2, H=2, N=4, R=2)
    inputs = tuple(t.requires_grad_(True) for t in (link, write, precedence, read))
    assert torch.autograd.gradcheck(A.link_update_and_read, inputs)


def test_directional_read_weights_equal_the_fused_outputs():
    link, write, precedence, read = _random_link_inputs(5, B=2, H=2, N=5, R=3)
    inputs = [t.clone().requires_grad_(True) for t in (link, write, precedence, read)]
    new_link, fwd, bwd = A.link_update_and_read(*inputs)

    plain = [t.clone().requires_grad_(True) for t in (link, write, precedence, read)]
    plain_link = A.link_update(*plain[:3])
    plain_fwd, plain_bwd = A.directional_read_weights(plain_link, plain[3])
    torch.testing.assert_close(fwd, plain_fwd, rtol=0, atol=TOL64)
    torch.testing.assert_close(bwd, plain_bwd, rtol=0, atol=TOL64)
    torch.testing.assert_close(new_link, plain_link, rtol=0, atol=TOL64)
    ref_fwd, ref_bwd = reference_directional(plain_link.detach(), read)
    torch.testing.assert_close(plain_fwd, ref_fwd, rtol=0, atol=TOL64)
    torch.testing.assert_close(plain_bwd, ref_bwd, rtol=0, atol=TOL64)

    cotangents = [torch.randn(t.shape, dtype=F64) for t in (new_link, fwd, bwd)]
    grads = torch.autograd.grad(
        sum((t * c).sum() for t, c in zip((new_link, fwd, bwd), cotangents, strict=True)), inputs
    )
    plain_grads = torch.autograd.grad(
        sum(
            (t * c).sum()
            for t, c in zip((plain_link, plain_fwd, plain_bwd), cotangents, strict=True)
        ),
        plain,
    )
    for g, p in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, p, rtol=0, atol=TOL64)


def test_directional_read_weights_gradcheck():
    link, _, _, read = _random_link_inputs(6, B=1, H=2, N=4, R=2)
    inputs = (link.requires_grad_(True), read.requires_grad_(True))
    assert torch.autograd.gradcheck(A.directional_read_weights, inputs)


def _check_link_invariants(link, precedence, tol):
    # bounds hold exactly in the equations; `tol` absorbs rounding (1 - w_i - w_j can be -1 ulp)
    assert (link >= -tol).all() and (link <= 1 + tol).all()
    diag = link.diagonal(dim1=-2, dim2=-1)
    assert torch.equal(diag, torch.zeros_like(diag))
    assert (link.sum(-1) <= 1 + tol).all(), "rows of L sum to more than 1"
    assert (link.sum(-2) <= 1 + tol).all(), "columns of L sum to more than 1"
    assert (precedence >= -tol).all() and (precedence.sum(-1) <= 1 + tol).all()


@hypothesis_settings(60)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 7),
    heads=st.integers(1, 3),
    sharpness=st.sampled_from([0.1, 1.0, 5.0, 50.0]),
    full_gate=st.booleans(),
)
def test_link_invariants_under_random_valid_writes(seed, n, heads, sharpness, full_gate):
    """Link in [0, 1], zero diagonal, rows and columns summing to ≤ 1, precedence summing to
    ≤ 1, after each of several random writes (from soft to one-hot, gated or full)."""
    gen = torch.Generator().manual_seed(seed)
    link = torch.zeros(2, heads, n, n, dtype=F64)
    precedence = torch.zeros(2, heads, n, dtype=F64)
    for _ in range(6):
        gate = torch.ones(2, heads, dtype=F64) if full_gate else None
        write = random_weightings(gen, (2, heads, n), sharpness=sharpness, gate=gate)
        read = random_weightings(gen, (2, 2, n), sharpness=sharpness)
        link, fwd, bwd = A.link_update_and_read(link, write, precedence, read)
        precedence = A.precedence_update(precedence, write)
        _check_link_invariants(link, precedence, TOL64)
        for directional in (fwd, bwd):
            assert (directional >= -TOL64).all() and (directional.sum(-1) <= 1 + TOL64).all()


# ================================================================================================
# The real DNCCore: invariants over many steps, scripted writes, no NaN on zero memory
# ================================================================================================


@hypothesis_settings(60)
@given(
    seed=st.integers(0, 2**16),
    param_scale=st.sampled_from([0.3, 1.0, 3.0]),
    input_scale=st.sampled_from([0.1, 1.0, 10.0]),
    num_reads=st.integers(1, 2),
    num_writes=st.integers(1, 2),
    fused=st.booleans(),
)
def test_dnc_core_invariants_over_many_steps(
    seed, param_scale, input_scale, num_reads, num_writes, fused
):
    """Drive a DNC with random parameters and inputs (gates from closed to saturated) and check
    every step's state via return_debug: weightings ≥ 0 summing to ≤ 1 over N, usage in [0, 1],
    link in [0, 1] with zero diagonal and rows/columns summing to ≤ 1, read modes a simplex."""
    core = build_core(
        "dnc",
        seed=seed,
        memory_size=5,
        word_size=3,
        num_reads=num_reads,
        num_writes=num_writes,
        fused=fused,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in core.parameters():
            p.copy_(param_scale * torch.randn(p.shape, generator=gen))
    T, B = 20, 3
    x = input_scale * torch.randn(T, B, core.input_size, generator=gen)
    starts = torch.zeros(T, B)
    starts[7, 1] = 1.0
    with torch.no_grad():
        y, _, debug = core(x, None, starts, return_debug=True)
    assert torch.isfinite(y).all()
    for key in ("read_weights", "write_weights", "allocation"):
        w = debug[key]
        assert (w >= -TOL32).all(), key
        assert (w.sum(-1) <= 1 + TOL32).all(), key
    usage = debug["usage"]
    assert (usage >= 0).all() and (usage <= 1 + TOL32).all()
    _check_link_invariants(debug["link"], debug["precedence"], TOL32)
    modes = debug["read_modes"]
    assert modes.shape == (T, B, num_reads, 1 + 2 * num_writes)
    assert (modes >= 0).all()
    torch.testing.assert_close(modes.sum(-1), torch.ones(T, B, num_reads))
    assert torch.isfinite(debug["memory"]).all()


@hypothesis_settings(30)
@given(seed=st.integers(0, 2**16), param_scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_ntm_core_weightings_are_distributions(seed, param_scale):
    core = build_core("ntm", seed=seed, memory_size=5, word_size=3, num_heads=2, max_shift=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in core.parameters():
            p.copy_(param_scale * torch.randn(p.shape, generator=gen))
    T, B = 8, 2
    with torch.no_grad():
        y, _, debug = core(3 * torch.randn(T, B, core.input_size, generator=gen), return_debug=True)
    assert torch.isfinite(y).all()
    for key in ("read_weights", "write_weights"):
        w = debug[key]
        assert (w >= 0).all(), key
        torch.testing.assert_close(w.sum(-1), torch.ones(T, B, 2), msg=key)


def _zero_memory_state(core, batch):
    state = core.initial_state(batch)
    memory = torch.zeros_like(state.memory)
    if hasattr(state, "access"):
        return state._replace(access=state.access._replace(memory=memory))
    return state._replace(memory=memory)


@pytest.mark.parametrize(
    ("name", "extra"),
    [("dnc", {}), ("dnc", {"fused": False}), ("ntm", {})],
    ids=["dnc-fused", "dnc-reference", "ntm"],
)
@pytest.mark.parametrize("keys", ["random", "zero"])
def test_core_no_nan_outputs_or_gradients_on_all_zero_memory(name, extra, keys):
    """With M = 0 (and, with zero interface/head weights, zero keys and zero written words, so M
    stays 0) the outputs and the gradients of every parameter and of the input are finite."""
    core = build_core(name, **extra)
    randomize_initial_state(core)
    head = core.interface if name == "dnc" else core.heads
    if keys == "zero":
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
    T, batch = 4, 2
    x = torch.randn(T, batch, core.input_size, requires_grad=True)
    y, state = core(x, _zero_memory_state(core, batch))
    if keys == "zero":
        assert not state.memory.any(), "zero add vectors must leave a zero memory at zero"
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in core.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), pname


# -- scripted DNC: a constant interface vector chosen by hand ----------------------------------

BIG = 40.0  # sigmoid(±BIG) and softmax over ±BIG are 0 or 1 to within 1e-17


def _interface_bias(
    core,
    *,
    write_gate: float,
    alloc_gate: float = BIG,
    free_gate: float = -BIG,
    erase: float = BIG,
    write_vector=None,
    read_mode: str = "content",
) -> torch.Tensor:
    """The interface bias for a DNC whose interface weight is zero, so that ξ_t is this constant.

    The layout is ``dnc.py``'s (its ``_sizes`` comment): raw [read keys R*W | write keys H*W |
    write vectors H*W], oneplus [read strengths R | write strengths H], sigmoid [erase H*W |
    free gates R | allocation gates H | write gates H], softmax read modes R x (1 + 2H) ordered
    [backward per write head | content | forward per write head]. Write heads H = 1 here.
    """
    R, W = core.num_reads, core.word_size
    assert core.num_writes == 1
    write_vector = torch.zeros(W) if write_vector is None else torch.as_tensor(write_vector)
    raw = torch.cat([torch.zeros(R * W), torch.zeros(W), write_vector.to(torch.float32)])
    strengths = torch.zeros(R + 1)
    gates = torch.cat(
        [
            torch.full((W,), erase),
            torch.full((R,), free_gate),
            torch.tensor([alloc_gate, write_gate]),
        ]
    )
    index = {"backward": 0, "content": 1, "forward": 2}[read_mode]
    modes = torch.full((R, 3), -BIG)
    modes[:, index] = BIG
    bias = torch.cat([raw, strengths, gates, modes.flatten()])
    assert bias.shape == (core.interface.out_features,), "the DNC interface layout changed"
    return bias.to(core.interface.bias.dtype)


def _scripted_dnc(N=4, W=3, fused=True):
    core = build_core(
        "dnc",
        dtype=F64,
        hidden_size=4,
        memory_size=N,
        word_size=W,
        num_reads=1,
        num_writes=1,
        fused=fused,
    )
    with torch.no_grad():
        core.interface.weight.zero_()
    return core


def _run_with_bias(core, state, bias, batch, steps=1):
    with torch.no_grad():
        core.interface.bias.copy_(bias)
        x = torch.zeros(steps, batch, core.input_size, dtype=F64)
        return core(x, state, return_debug=True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_dnc_scripted_writes_allocate_fresh_slots_and_link_them_in_order(fused):
    """Write gate 1, allocation gate 1, erase 1, free gates 0: each step writes its word to the
    least-used (a fresh) slot; the link matrix records the chain of slots in write order,
    p is the last slot; forward reads from the first slot replay the words in write order,
    backward reads from the last slot replay them in reverse."""
    N, W, batch = 4, 3, 2
    core = _scripted_dnc(N, W, fused)
    words = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -1.0], [-3.0, 2.0, 2.0], [0.0, 1.0, -4.0]])
    state = core.initial_state(batch)
    slots = []
    for t in range(N):
        bias = _interface_bias(core, write_gate=BIG, write_vector=words[t])
        _, state, debug = _run_with_bias(core, state, bias, batch)
        w = debug["write_weights"][0, :, 0]  # [B, N]
        slot = w.argmax(-1)
        assert torch.equal(slot, slot[:1].expand(batch)), "same inputs, same slot"
        slots.append(int(slot[0]))
        torch.testing.assert_close(w, one_hot(N, slots[-1]).expand(batch, N), rtol=0, atol=1e-5)
        if t == N - 2:
            # the slot never written yet still holds the initial 1e-6 (up to eps leakage)
            fresh = (set(range(N)) - set(slots)).pop()
            assert state.memory[:, fresh].abs().max() < 1e-5
    assert sorted(slots) == list(range(N)), "every write went to a fresh slot"

    for t, s in enumerate(slots):  # erase 1 then add: each slot holds exactly its word
        torch.testing.assert_close(
            state.memory[:, s], words[t].to(F64).expand(batch, W), rtol=0, atol=1e-4
        )
    expected_link = torch.zeros(N, N, dtype=F64)
    for earlier, later in itertools.pairwise(slots):
        expected_link[later, earlier] = 1.0
    torch.testing.assert_close(
        state.link[:, 0], expected_link.expand(batch, N, N), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(
        state.precedence[:, 0], one_hot(N, slots[-1]).expand(batch, N), rtol=0, atol=1e-4
    )

    # forward traversal: no writes, read mode forward, read weights start at the first slot
    for mode, start, order in (
        ("forward", slots[0], slots[1:]),
        ("backward", slots[-1], slots[-2::-1]),
    ):
        read0 = one_hot(N, start).expand(batch, 1, N).clone()
        s = state._replace(access=state.access._replace(read_weights=read0))
        bias = _interface_bias(core, write_gate=-BIG, read_mode=mode)
        y, s_end, debug = _run_with_bias(core, s, bias, batch, steps=N - 1)
        for k, slot in enumerate(order):
            torch.testing.assert_close(
                debug["read_weights"][k, :, 0], one_hot(N, slot).expand(batch, N), atol=1e-4, rtol=0
            )
            word = words[slots.index(slot)].to(F64)
            read_part = y[k, :, core.hidden_size :]
            torch.testing.assert_close(read_part, word.expand(batch, W), atol=1e-3, rtol=0)
        # no writes: memory, link and precedence are unchanged
        torch.testing.assert_close(s_end.memory, state.memory, rtol=0, atol=1e-12)
        torch.testing.assert_close(s_end.link, state.link, rtol=0, atol=1e-12)

    # free a slot: read weights on slots[1], free gate 1 -> usage 0 there -> the next write
    # is allocated to it, and its old links are replaced by slots[-1] -> slots[1]
    read0 = one_hot(N, slots[1]).expand(batch, 1, N).clone()
    s = state._replace(access=state.access._replace(read_weights=read0))
    new_word = torch.tensor([9.0, -9.0, 0.5])
    bias = _interface_bias(core, write_gate=BIG, free_gate=BIG, write_vector=new_word)
    _, s_end, debug = _run_with_bias(core, s, bias, batch)
    usage = debug["usage"][0]
    assert (usage[:, slots[1]] < 1e-6).all()
    others = [s_ for s_ in range(N) if s_ != slots[1]]
    assert (usage[:, others] > 1 - 1e-4).all()
    torch.testing.assert_close(
        debug["write_weights"][0, :, 0], one_hot(N, slots[1]).expand(batch, N), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        s_end.memory[:, slots[1]], new_word.to(F64).expand(batch, W), rtol=0, atol=1e-4
    )
    link = s_end.link[:, 0]
    torch.testing.assert_close(
        link[:, slots[1], slots[-1]], torch.ones(batch, dtype=F64), rtol=0, atol=1e-4
    )
    assert (link[:, slots[1], slots[0]] < 1e-4).all(), "old link into the freed slot cleared"
    assert (link[:, slots[2], slots[1]] < 1e-4).all(), "old link out of the freed slot cleared"
    torch.testing.assert_close(
        link[:, slots[3], slots[2]], torch.ones(batch, dtype=F64), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_dnc_write_gate_closed_writes_nothing(fused):
    """Write gate 0: write weights 0, memory unchanged, usage unchanged (free gates 0)."""
    core = _scripted_dnc(fused=fused)
    batch = 2
    state = core.initial_state(batch)
    _, state, _ = _run_with_bias(
        core, state, _interface_bias(core, write_gate=BIG, write_vector=[1.0, 2.0, 3.0]), batch, 2
    )
    _, s_end, debug = _run_with_bias(core, state, _interface_bias(core, write_gate=-BIG), batch, 3)
    assert debug["write_weights"].abs().max() < 1e-12
    torch.testing.assert_close(s_end.memory, state.memory, rtol=0, atol=1e-12)
    # usage lags one step (step 0 still adds the last write of the first phase); it then stays
    for t in (1, 2):
        torch.testing.assert_close(debug["usage"][t], debug["usage"][0], rtol=0, atol=1e-12)
    assert (debug["usage"][0] > state.usage + 0.5).any(), "the last write became usage"


def test_dnc_step_uses_lstm_state_layout():
    """The DNC's controller state is an LSTMState of [B, 1, hidden] tensors."""
    core = build_core("dnc")
    state = core.initial_state(2)
    assert isinstance(state.controller, LSTMState)
    assert state.controller.h.shape == (2, 1, core.hidden_size)


# -- the fused access step (one autograd node, hand-written backward) against the reference --


def _random_access_inputs(seed: int, B=2, N=4, W=3, R=2, H=2):
    """Valid inputs of ``DNCAccessStep``: a state reached by valid writes, activated interface."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    link, _, precedence, _ = _random_link_inputs(seed, B=B, H=H, N=N, R=R)
    # usages spread out, so that a 1e-6 perturbation cannot reorder the allocation sort
    usage = (torch.stack([torch.randperm(N, generator=gen) for _ in range(B)]).to(F64) + 0.5) / N
    return (
        randn(B, N, W),  # memory
        usage,
        link,
        precedence,
        random_weightings(gen, (B, R, N), sharpness=2.0),  # read weights
        random_weightings(gen, (B, H, N), sharpness=2.0),  # write weights
        randn(B, R, W),  # read keys
        A.oneplus(randn(B, R)),  # read strengths
        randn(B, H, W),  # write keys
        A.oneplus(randn(B, H)),  # write strengths
        randn(B, H, W),  # write vectors
        rand(B, H, W),  # erase
        rand(B, R),  # free gates
        rand(B, H),  # allocation gates
        rand(B, H),  # write gates
        torch.softmax(randn(B, R, 1 + 2 * H), -1),  # read modes
    )


@pytest.mark.parametrize(("R", "H"), [(1, 1), (2, 2), (3, 1)])
def test_fused_access_step_gradcheck(R, H):
    """float64 gradcheck of the hand-written backward w.r.t. all 16 inputs."""
    from memagents.cores.dnc_access import DNCAccessStep

    inputs = tuple(t.requires_grad_(True) for t in _random_access_inputs(7, R=R, H=H))

    def step(*args):
        return DNCAccessStep.apply(*args)[:7]  # the allocation output carries no gradient

    assert torch.autograd.gradcheck(step, inputs)


def _dnc_pair(seed: int, param_scale: float, **kwargs):
    """A fused DNC and a reference-path DNC with identical random parameters (float64)."""
    fused = build_core("dnc", seed=seed, dtype=F64, fused=True, **kwargs)
    reference = build_core("dnc", seed=seed, dtype=F64, fused=False, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(param_scale * torch.randn(p.shape, generator=gen, dtype=F64))
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _random_dnc_state(core, batch: int, seed: int):
    """A valid DNC state far from the initial one, with usages spread well apart: the allocation
    sort is discontinuous at ties, so two paths that round differently may only be compared
    where no two usages are within rounding of each other."""
    N, W = core.memory_size, core.word_size
    R, H = core.num_reads, core.num_writes
    gen = torch.Generator().manual_seed(seed)
    link, write, precedence, read = _random_link_inputs(seed, B=batch, H=H, N=N, R=R)
    usage = torch.stack([torch.randperm(N, generator=gen) for _ in range(batch)]).to(F64)
    s0 = core.initial_state(batch)
    hidden = (batch, 1, core.hidden_size)
    return s0._replace(
        controller=LSTMState(
            torch.randn(hidden, generator=gen, dtype=F64),
            torch.randn(hidden, generator=gen, dtype=F64),
        ),
        access=s0.access._replace(
            memory=torch.randn(batch, N, W, generator=gen, dtype=F64),
            usage=(usage + 0.5) / N,
            link=link,
            precedence=precedence,
            read_weights=read,
            write_weights=write,
        ),
        read_vectors=torch.randn(batch, R, W, generator=gen, dtype=F64),
    )


def _compare_fused_with_reference(fused, reference, x, s0, starts, seed):
    """Run both cores; compare outputs, states, debug tensors and the gradients of a random
    projection of (outputs, final access state) w.r.t. x, the starting state and parameters."""
    results = []
    for core in (fused, reference):
        x_in = x.clone().requires_grad_(True)
        leaves = [t.clone().requires_grad_(True) for t in s0.access]
        s_in = s0._replace(access=type(s0.access)(*leaves))
        y, s_end, debug = core(x_in, s_in, starts, return_debug=True)
        g = torch.Generator().manual_seed(seed + 2)
        loss = (y * torch.randn(y.shape, generator=g, dtype=F64)).sum()
        for leaf in s_end.access:
            loss = loss + (leaf * torch.randn(leaf.shape, generator=g, dtype=F64)).sum()
        params = [p for p in core.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [x_in, *leaves, *params], allow_unused=True)
        results.append((y, s_end, debug, grads))

    (y_f, s_f, d_f, g_f), (y_r, s_r, d_r, g_r) = results
    tol = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(y_f, y_r, **tol)
    for name, a, b in zip(s0.access._fields, s_f.access, s_r.access, strict=True):
        torch.testing.assert_close(a, b, msg=name, **tol)
    assert set(d_f) == set(d_r)
    for key in d_f:
        torch.testing.assert_close(d_f[key], d_r[key], msg=key, **tol)
    names = ["x", *s0.access._fields] + [n for n, p in fused.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_f, g_r, strict=True):
        assert (a is None) == (b is None), name  # h0, c0, read0 are unused without a reset
        if a is not None:
            torch.testing.assert_close(a, b, msg=f"gradient of {name}", **tol)


@hypothesis_settings(15)
@given(
    seed=st.integers(0, 2**16),
    param_scale=st.sampled_from([0.3, 1.0, 3.0]),
    num_reads=st.integers(1, 3),
    num_writes=st.integers(1, 2),
)
def test_fused_dnc_matches_the_reference_path(seed, param_scale, num_reads, num_writes):
    """The fused access step and the plain-autograd reference agree on every output, every
    state field, every debug tensor, and the gradients of the input, all parameters and the
    starting state, over several steps (float64)."""
    kwargs = {"memory_size": 5, "word_size": 3, "num_reads": num_reads, "num_writes": num_writes}
    fused, reference = _dnc_pair(seed, param_scale, **kwargs)
    T, batch = 6, 3
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, batch, fused.input_size, generator=gen, dtype=F64)
    s0 = _random_dnc_state(fused, batch, seed)
    _compare_fused_with_reference(fused, reference, x, s0, torch.zeros(T, batch), seed)


@pytest.mark.parametrize(("R", "H"), [(1, 1), (2, 2)])
def test_fused_dnc_matches_the_reference_path_through_a_reset(R, H):
    """A step where some elements reset (usage all 0: an exact tie that both paths break the
    same way) agrees too, including the gradient to the learned initial state."""
    kwargs = {"memory_size": 5, "word_size": 3, "num_reads": R, "num_writes": H}
    fused, reference = _dnc_pair(3, 1.0, **kwargs)
    batch = 3
    x = torch.randn(1, batch, fused.input_size, dtype=F64)
    starts = torch.tensor([[1.0, 0.0, 1.0]])
    _compare_fused_with_reference(
        fused, reference, x, _random_dnc_state(fused, batch, 3), starts, 3
    )


# ================================================================================================
# The real NTMCore with a constant, hand-chosen head vector: the four addressing stages in order
# ================================================================================================


def _ntm_head_bias(
    core,
    *,
    read_shift: int,
    write_shift: int,
    read_key=None,
    read_beta: float = 0.0,
    read_gate: float = -BIG,
    erase: float = BIG,
    add=None,
) -> torch.Tensor:
    """The head bias of an NTM whose head weight is zero (one head pair, max_shift 1).

    Layout (``ntm.py``): read [key W | β 1 | gate 1 | shift 3 | γ 1], then write [key W | β 1 |
    gate 1 | shift 3 | γ 1 | erase W | add W]. Write heads: zero key (uniform content), gate 0
    (keep the previous weighting), a one-hot shift, γ = oneplus(0)."""
    W = core.word_size
    assert core.num_heads == 1 and core.max_shift == 1

    def shift_logits(shift):
        logits = torch.full((3,), -BIG)
        logits[shift + 1] = BIG
        return logits

    read_key = torch.zeros(W) if read_key is None else torch.as_tensor(read_key)
    add = torch.zeros(W) if add is None else torch.as_tensor(add)
    read = [
        read_key,
        torch.tensor([read_beta, read_gate]),
        shift_logits(read_shift),
        torch.zeros(1),
    ]
    write = [
        torch.zeros(W),
        torch.tensor([0.0, -BIG]),
        shift_logits(write_shift),
        torch.zeros(1),
        torch.full((W,), erase),
        add,
    ]
    bias = torch.cat([t.to(torch.float32) for t in read + write])
    assert bias.shape == (core.heads.out_features,), "the NTM head layout changed"
    return bias.to(core.heads.bias.dtype)


def test_ntm_scripted_shifts_write_a_sequence_and_read_it_back():
    """Write head: previous weighting (gate 0) shifted by +1 each step, erase 1, add word_t ->
    word_t lands in row t+1 (the initial weighting is on row 0). Read head, same shift, reads
    after the write: it returns the word just written. Then, with erase and add 0, the read head
    shifts by -1 and reads the words back in reverse; then a content lookup (gate 1, β large,
    no shift) finds the row that holds a given word."""
    N, W, batch = 6, 3, 2
    core = build_core(
        "ntm", dtype=F64, hidden_size=4, memory_size=N, word_size=W, num_heads=1, max_shift=1
    )
    with torch.no_grad():
        core.heads.weight.zero_()
        for logits in (core.read_logits0, core.write_logits0):
            logits.copy_(BIG * one_hot(N, 0).view(1, 1, N))  # start exactly on row 0
    words = t64([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -1.0], [1.0, 1.0, -1.0]])

    def run(state, bias, steps=1):
        with torch.no_grad():
            core.heads.bias.copy_(bias)
            x = torch.zeros(steps, batch, core.input_size, dtype=F64)
            return core(x, state, return_debug=True)

    state = core.initial_state(batch)
    for t, word in enumerate(words):
        y, state, debug = run(state, _ntm_head_bias(core, read_shift=1, write_shift=1, add=word))
        target = one_hot(N, t + 1).expand(batch, 1, N)
        torch.testing.assert_close(debug["write_weights"][0], target, rtol=0, atol=1e-6)
        torch.testing.assert_close(debug["read_weights"][0], target, rtol=0, atol=1e-6)
        read = y[0, :, core.hidden_size :]
        torch.testing.assert_close(read, word.expand(batch, W), rtol=0, atol=1e-5)
    for t, word in enumerate(words):  # erase 1 then add: row t+1 is exactly word_t
        torch.testing.assert_close(state.memory[:, t + 1], word.expand(batch, W), atol=1e-5, rtol=0)
    for row in (0, 5):  # never written: still the initial 1e-6
        torch.testing.assert_close(
            state.memory[:, row], torch.full((batch, W), 1e-6, dtype=F64), rtol=0, atol=1e-9
        )

    # backwards over what was written, without writing (erase 0, add 0)
    bias = _ntm_head_bias(core, read_shift=-1, write_shift=0, erase=-BIG)
    y, s_back, debug = run(state, bias, steps=4)
    for k, row in enumerate([3, 2, 1, 0]):
        target = one_hot(N, row).expand(batch, 1, N)
        torch.testing.assert_close(debug["read_weights"][k], target, rtol=0, atol=1e-6)
    reads = y[:, :, core.hidden_size :]
    for k in range(3):
        torch.testing.assert_close(reads[k], words[2 - k].expand(batch, W), rtol=0, atol=1e-5)
    torch.testing.assert_close(s_back.memory, state.memory, rtol=0, atol=1e-12)

    # content addressing: key = word_1 (row 2), strong β, gate 1, shift 0
    bias = _ntm_head_bias(
        core,
        read_shift=0,
        write_shift=0,
        erase=-BIG,
        read_key=words[1],
        read_beta=200.0,
        read_gate=BIG,
    )
    y, _, debug = run(s_back, bias)
    torch.testing.assert_close(
        debug["read_weights"][0], one_hot(N, 2).expand(batch, 1, N), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        y[0, :, core.hidden_size :], words[1].expand(batch, W), rtol=0, atol=1e-5
    )

    # the read head addresses the memory after this step's write: the write head (on row 4)
    # shifts to row 5 and writes a new word, and a content lookup of that word finds row 5
    new_word = t64([0.0, -3.0, 3.0])
    bias = _ntm_head_bias(
        core,
        read_shift=0,
        write_shift=1,
        add=new_word,
        read_key=new_word,
        read_beta=200.0,
        read_gate=BIG,
    )
    y, _, debug = run(s_back, bias)
    torch.testing.assert_close(
        debug["write_weights"][0], one_hot(N, 5).expand(batch, 1, N), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        debug["read_weights"][0], one_hot(N, 5).expand(batch, 1, N), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        y[0, :, core.hidden_size :], new_word.expand(batch, W), rtol=0, atol=1e-5
    )


def test_allocation_ties_go_to_the_lowest_index():
    """After a reset every slot is free (an exact tie): the first write goes to slot 0, in both
    the reference and the fused allocation, so the two paths cannot diverge on rounding."""
    from memagents.cores.dnc_access import _allocation_forward

    usage = torch.zeros(3, 40)
    ref = A.allocation_weights(usage)
    fused, _ = _allocation_forward(usage)
    assert torch.equal(ref.argmax(-1), torch.zeros(3, dtype=torch.long))
    assert torch.equal(ref, fused)


def test_circular_shift_rejects_an_index_for_another_memory_size():
    index = A.shift_index(4, 1)
    with pytest.raises(ValueError, match="shift index"):
        A.circular_shift(torch.rand(1, 1, 6), torch.rand(1, 1, 3), index)
