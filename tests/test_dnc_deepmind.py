"""The DNC's memory access against DeepMind's reference semantics, in every execution path.

:func:`deepmind_access_step` below is one access step written from the equations of DeepMind's
DNC release (``deepmind/dnc``: ``MemoryAccess`` in ``dnc/access.py``; ``CosineWeights``,
``TemporalLinkage`` and ``Freeness`` in ``dnc/addressing.py``; Graves et al. 2016, Nature 538,
Methods) in plain float64 torch, using nothing of memagents. Every path of the project is compared
with it, one step at a time, to 1e-9 (values and the gradients of the previous access state):

- ``reference``: ``DNCCore(fused=False).step`` (the :mod:`~memagents.cores.addressing` functions
  under autograd);
- ``step-torch``: ``DNCCore.step`` with the per-step node
  :class:`~memagents.cores.dnc_access.DNCAccessStep` on its torch implementation;
- ``step-native``: the same node on the C++ kernel;
- ``sequence``: ``DNCCore.forward`` on the CPU, the sequence node
  :class:`~memagents.cores.dnc_access.DNCSequence` (C++ kernels);
- ``DNCAccessStep`` on the activated interface (torch and C++) and the whole-step node
  :class:`~memagents.cores.dnc_access.DNCStep` (C++).

The three points of DeepMind's semantics checked here (issue #15): free slots ranked by
``top_k(1 - u')`` (ties to the lowest slot), cosine ``k·M / (|k| |M| + 1e-6)``, and no usage
gradient to the previous write weights (``tf.stop_gradient`` in ``Freeness``) unless
``usage_gradient=True``. The project's deliberate differences are mapped, not tested: strengths
are passed to the reference already transformed (the project's ``oneplus``; DeepMind applies
``softplus`` inside ``CosineWeights``), read modes are reordered from the project's
``[backward x H, content, forward x H]`` to DeepMind's ``[backward x H, forward x H, content]``,
and the "zero state" is the project's initial state (memory ``1e-6``, the rest zeros).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_NATIVE, needs_native

from memagents.cores import addressing as A
from memagents.cores import dnc, dnc_access
from memagents.cores.dnc import AccessState, DNCCore
from memagents.cores.dnc_access import DNCAccessStep, DNCSequence, DNCStep

F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-9}
#: DeepMind's ``_EPSILON``.
EPS = 1e-6
#: The access state's fields (memagents' ``AccessState`` order) and the read vectors.
FIELDS = (*AccessState._fields, "read_words")


# ================================================================================================
# DeepMind's access step, from its equations (plain torch, float64)
# ================================================================================================


def _cosine_weights(memory, keys, strengths):
    """``CosineWeights``: softmax over slots of ``β · k·M / (|k| |M| + eps)``, with the norms
    ``sqrt(sum x^2 + eps)``. ``strengths`` already transformed."""
    dot = keys @ memory.transpose(1, 2)  # [B, K, N]
    memory_norms = torch.sqrt((memory * memory).sum(2, keepdim=True) + EPS)  # [B, N, 1]
    key_norms = torch.sqrt((keys * keys).sum(2, keepdim=True) + EPS)  # [B, K, 1]
    norm = key_norms @ memory_norms.transpose(1, 2)  # [B, K, N]
    similarity = dot / (norm + EPS)
    return torch.softmax(similarity * strengths.unsqueeze(-1), dim=-1)


def _top_k_order(values):
    """``tf.nn.top_k`` over the whole row: indices by descending value, equal values lowest
    index first (in Python, independent of torch.sort)."""
    rows = values.detach().tolist()
    order = [sorted(range(len(r)), key=lambda i, r=r: (-r[i], i)) for r in rows]
    return torch.tensor(order, dtype=torch.long)


def _allocation(usage):
    """``Freeness._allocation``: rank by nonusage ``1 - u'``, ``u' = eps + (1 - eps) u``."""
    N = usage.shape[1]
    usage = EPS + (1 - EPS) * usage
    nonusage = 1 - usage
    indices = _top_k_order(nonusage)
    sorted_nonusage = nonusage.gather(1, indices)
    sorted_usage = 1 - sorted_nonusage
    prods = [torch.ones_like(sorted_usage[:, 0])]  # exclusive cumulative product
    for j in range(1, N):
        prods.append(prods[-1] * sorted_usage[:, j - 1])
    sorted_allocation = sorted_nonusage * torch.stack(prods, 1)
    inverse = torch.empty_like(indices).scatter_(1, indices, torch.arange(N).expand_as(indices))
    return sorted_allocation.gather(1, inverse)


def deepmind_access_step(prev, iface, usage_gradient=False):
    """One ``MemoryAccess`` step. ``prev``: memagents' six ``AccessState`` tensors (memory
    ``[B,N,W]``, usage ``[B,N]``, link ``[B,H,N,N]``, precedence ``[B,H,N]``, read weights
    ``[B,R,N]``, write weights ``[B,H,N]``); ``iface``: DeepMind's activated inputs by name
    (``read_mode`` in DeepMind's order). Returns a dict of :data:`FIELDS` plus ``allocation``."""
    memory0, usage0, link0, prec0, read0, write0 = prev
    H, N = write0.shape[1], write0.shape[2]
    # Freeness: usage after write (write weights stop_gradient'ed), then after read
    write_weights = write0 if usage_gradient else write0.detach()
    written = 1 - torch.prod(1 - write_weights, 1)
    usage = usage0 + (1 - usage0) * written
    phi = torch.prod(1 - iface["free_gate"].unsqueeze(-1) * read0, 1)
    usage = usage * phi
    # write weights: content on the previous memory, allocation head after head
    content = _cosine_weights(
        memory0, iface["write_content_keys"], iface["write_content_strengths"]
    )
    gates = (iface["allocation_gate"] * iface["write_gate"]).unsqueeze(-1)
    allocations, u = [], usage
    for i in range(H):
        allocations.append(_allocation(u))
        u = u + (1 - u) * gates[:, i] * allocations[i]
    allocation = torch.stack(allocations, 1)
    g_a = iface["allocation_gate"].unsqueeze(-1)
    write = iface["write_gate"].unsqueeze(-1) * (g_a * allocation + (1 - g_a) * content)
    # erase and write
    reset_gate = torch.prod(1 - write.unsqueeze(3) * iface["erase_vectors"].unsqueeze(2), 1)
    memory = memory0 * reset_gate + write.transpose(1, 2) @ iface["write_vectors"]
    # temporal linkage
    w_i, w_j = write.unsqueeze(3), write.unsqueeze(2)
    link = (1 - w_i - w_j) * link0 + w_i * prec0.unsqueeze(2)
    link = link * (1 - torch.eye(N, dtype=link.dtype))  # matrix_set_diag(link, 0)
    precedence = (1 - write.sum(2, keepdim=True)) * prec0 + write
    # read weights: content on the new memory, forward and backward through the links
    read_content = _cosine_weights(
        memory, iface["read_content_keys"], iface["read_content_strengths"]
    )
    expanded = torch.stack([read0] * H, 1)  # [B, H, R, N]
    forward = (expanded @ link.transpose(2, 3)).transpose(1, 2)  # [B, R, H, N]
    backward = (expanded @ link).transpose(1, 2)
    mode = iface["read_mode"]
    read = (
        mode[:, :, 2 * H].unsqueeze(2) * read_content
        + (mode[:, :, H : 2 * H].unsqueeze(3) * forward).sum(2)
        + (mode[:, :, :H].unsqueeze(3) * backward).sum(2)
    )
    return {
        "memory": memory, "usage": usage, "link": link, "precedence": precedence,
        "read_weights": read, "write_weights": write, "read_words": read @ memory,
        "allocation": allocation,
    }  # fmt: skip


# ================================================================================================
# From memagents' interface to DeepMind's inputs (layout only)
# ================================================================================================


def _modes_to_deepmind(modes, H):
    """memagents' ``[backward x H, content, forward x H]`` -> ``[backward, forward, content]``."""
    return torch.cat([modes[..., :H], modes[..., H + 1 :], modes[..., H : H + 1]], dim=-1)


def _modes_from_deepmind(modes, H):
    return torch.cat([modes[..., :H], modes[..., 2 * H :], modes[..., H : 2 * H]], dim=-1)


def _split_xi(xi, R, H, W):
    """memagents' ξ layout: read keys, write keys, write vectors, read strengths, write
    strengths, erase, free gates, allocation gates, write gates, read modes."""
    sizes = [R * W, H * W, H * W, R, H, H * W, R, H, H, R * (1 + 2 * H)]
    assert xi.shape[1] == sum(sizes)
    return xi.split(sizes, dim=-1)


def interface_from_xi(xi, R, H, W):
    """DeepMind's activated inputs from memagents' ξ: keys and vectors as they are, strengths
    ``oneplus`` (memagents' choice), erase and gates sigmoid, read modes softmax (reordered)."""
    B = xi.shape[0]
    kr, kw, v, br, bw, erase, free, g_a, g_w, modes = _split_xi(xi, R, H, W)
    modes = torch.softmax(modes.reshape(B, R, 1 + 2 * H), dim=-1)
    return {
        "read_content_keys": kr.reshape(B, R, W), "read_content_strengths": 1 + F.softplus(br),
        "write_content_keys": kw.reshape(B, H, W), "write_content_strengths": 1 + F.softplus(bw),
        "write_vectors": v.reshape(B, H, W), "erase_vectors": torch.sigmoid(erase).reshape(B, H, W),
        "free_gate": torch.sigmoid(free), "allocation_gate": torch.sigmoid(g_a),
        "write_gate": torch.sigmoid(g_w), "read_mode": _modes_to_deepmind(modes, H),
    }  # fmt: skip


def access_step_inputs(iface, H):
    """The ten activated inputs of ``DNCAccessStep`` (memagents' order) from DeepMind's."""
    return (
        iface["read_content_keys"], iface["read_content_strengths"],
        iface["write_content_keys"], iface["write_content_strengths"], iface["write_vectors"],
        iface["erase_vectors"], iface["free_gate"], iface["allocation_gate"],
        iface["write_gate"], _modes_from_deepmind(iface["read_mode"], H),
    )  # fmt: skip


# ================================================================================================
# States, interfaces, cores and paths
# ================================================================================================

B, N, W, R, H, HD = 3, 6, 4, 2, 2, 8


def random_access_state(seed, batch=B, n=N, w=W, r=R, h=H, memory="random"):
    """A valid access state far from the initial one; usages spread ``1/N`` apart (no two
    slots near a tie, where the allocation is discontinuous). ``memory="zero-rows"``: rows 0 and
    2 all zero, the others small (norms ~1e-3, where the cosine's epsilons matter)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    def weighting(*shape):
        return torch.softmax(2 * torch.randn(*shape, generator=gen, dtype=F64), -1) * rand(
            *shape[:-1], 1
        )

    link = rand(batch, h, n, n) / n * (1 - torch.eye(n, dtype=F64))
    usage = (torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)]) + 0.5) / n
    m = torch.randn(batch, n, w, generator=gen, dtype=F64)
    if memory == "zero-rows":
        m = 1e-3 * m
        m[:, [0, 2]] = 0.0
    return (
        m, usage.to(F64), link, weighting(batch, h, n), weighting(batch, r, n),
        weighting(batch, h, n),
    )  # fmt: skip


def zero_access_state(batch=B, n=N, w=W, r=R, h=H):
    """memagents' initial access state (memory 1e-6, the rest zeros)."""
    return (
        torch.full((batch, n, w), 1e-6, dtype=F64), torch.zeros(batch, n, dtype=F64),
        torch.zeros(batch, h, n, n, dtype=F64), torch.zeros(batch, h, n, dtype=F64),
        torch.zeros(batch, r, n, dtype=F64), torch.zeros(batch, h, n, dtype=F64),
    )  # fmt: skip


def random_interface(seed, batch=B, r=R, h=H, w=W, key_scale=1.0):
    """DeepMind's activated inputs from a random ξ."""
    X = r * w + 2 * h * w + r + h + h * w + r + 2 * h + r * (1 + 2 * h)
    gen = torch.Generator().manual_seed(seed)
    xi = 2 * torch.randn(batch, X, generator=gen, dtype=F64)
    xi[:, : r * w + h * w] *= key_scale  # the keys
    return interface_from_xi(xi, r, h, w)


def make_core(seed, fused=True, usage_gradient=False, gates=None, **sizes):
    """A float64 DNC with random parameters; ``gates``: a bias on the allocation and write gates
    (large: those heads write to the allocated slots)."""
    kw = {"hidden_size": HD, "memory_size": N, "word_size": W, "num_reads": R, "num_writes": H}
    kw.update(sizes)
    torch.manual_seed(seed)
    core = DNCCore(3, fused=fused, usage_gradient=usage_gradient, **kw).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in core.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
        if gates is not None:
            r, h, w = core.num_reads, core.num_writes, core.word_size
            start = r * w + 2 * h * w + r + h + h * w + r  # allocation gates, then write gates
            core.interface.bias[start : start + 2 * h] = gates
    return core


PATHS = [
    "reference",
    "step-torch",
    pytest.param("step-native", marks=needs_native),
    pytest.param("sequence", marks=needs_native),
]


@contextlib.contextmanager
def kernel(on: bool):
    """The DNC kernels on or off (``dnc_access.lib``) for the duration; after it the library is
    loaded (a native node's backward, run later, needs it)."""
    dnc_access._kernel()
    saved = dnc_access.lib
    dnc_access.lib = dnc_access._kernel() if on else None
    if on:
        assert dnc_access.lib is not None, "the DNC kernel did not load"
    try:
        yield
    finally:
        dnc_access.lib = saved


@pytest.fixture
def calls(monkeypatch):
    """Counts of the native per-step forward and of sequence-node calls (which path ran)."""
    counts = {"native": 0, "sequence": 0}
    native_forward = dnc_access._native_forward

    def counting_native(*args):
        counts["native"] += 1
        return native_forward(*args)

    class CountingSequence:
        @staticmethod
        def apply(*args):
            counts["sequence"] += 1
            return DNCSequence.apply(*args)

        @staticmethod
        def forward(*args):
            counts["sequence"] += 1
            return DNCSequence.forward(*args)

    monkeypatch.setattr(dnc_access, "_native_forward", counting_native)
    monkeypatch.setattr(dnc, "DNCSequence", CountingSequence)
    return counts


def core_for(path, seed, usage_gradient=False, **kwargs):
    return make_core(seed, fused=path != "reference", usage_gradient=usage_gradient, **kwargs)


def run_steps(core, path, x, state):
    """``core`` over ``x [T, B, I]`` from ``state`` on ``path``, one call per step (the sequence
    node with T = 1 each time): ``([y_t], [state_t])``."""
    ys, states = [], []
    for t in range(x.shape[0]):
        if path == "sequence":
            with kernel(True):
                y, state = core(x[t : t + 1], state)
            y = y[0]
        else:
            with kernel(path == "step-native"):
                y, state = core.step(x[t], state)
        ys.append(y)
        states.append(state)
    return ys, states


def check_paths_ran(path, calls):
    if path == "sequence":
        assert calls["sequence"] > 0 and calls["native"] == 0
    elif path == "step-native":
        assert calls["native"] > 0 and calls["sequence"] == 0
    else:
        assert calls["native"] == 0 and calls["sequence"] == 0


def projection(fields, seed):
    """A random linear function of the step's outputs (the same for every path)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for name in FIELDS:
        t = fields[name]
        total = total + (t * torch.randn(t.shape, generator=gen, dtype=F64)).sum()
    return total


def assert_close_or_zero(a, b, what):
    """``None`` (no gradient) compares as zeros."""
    if a is None and b is None:
        return
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}", **TOL)


def state_with(core, access, seed):
    """A state of ``core`` with the given access tensors and a random controller state and read
    vectors (drawn from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    s0 = core.initial_state(access[0].shape[0])
    return s0._replace(
        controller=type(s0.controller)(
            *(torch.randn(t.shape, generator=gen, dtype=F64) for t in s0.controller)
        ),
        access=AccessState(*access),
        read_vectors=torch.randn(s0.read_vectors.shape, generator=gen, dtype=F64),
    )


def check_step(core, path, x, access, seed, usage_gradient):
    """One step of ``core`` on ``path`` from ``access`` (with a random controller state) against
    :func:`deepmind_access_step` on the ξ the step computed: every field to 1e-9, and the
    gradients of a random projection w.r.t. the previous access state. Returns
    ``(fields, reference fields, path gradients, DeepMind's inputs)``."""
    leaves = [t.clone().requires_grad_(True) for t in access]
    (y,), (s1,) = run_steps(core, path, x.unsqueeze(0), state_with(core, leaves, seed))
    Rr, Ww, Hh = core.num_reads, core.word_size, core.num_writes
    fields = dict(zip(AccessState._fields, s1.access, strict=True))
    fields["read_words"] = y[:, core.hidden_size :].reshape(-1, Rr, Ww)
    # the ξ this step computed (h_t depends on the controller state only, not on the access)
    with torch.no_grad():
        iface = interface_from_xi(core.interface(y[:, : core.hidden_size]), Rr, Hh, Ww)
    ref_leaves = [t.clone().requires_grad_(True) for t in access]
    ref = deepmind_access_step(ref_leaves, iface, usage_gradient)
    for name in FIELDS:
        torch.testing.assert_close(
            fields[name], ref[name], msg=lambda m, n=name: f"{n}: {m}", **TOL
        )
    grads = torch.autograd.grad(projection(fields, seed + 1), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(projection(ref, seed + 1), ref_leaves, allow_unused=True)
    for name, g, g_ref in zip(AccessState._fields, grads, ref_grads, strict=True):
        assert_close_or_zero(g, g_ref, f"gradient of the previous {name}")
    assert (grads[5] is None or not grads[5].any()) != usage_gradient
    return fields, ref, grads, iface


# ================================================================================================
# The reference itself: DeepMind's rules, by hand
# ================================================================================================


def test_deepmind_allocation_ranks_by_nonusage_ties_to_the_lowest_index():
    """Usages 3e-17, 1e-17, 0, 0.5: ``1 - u'`` rounds the first three to one value, so top_k
    takes them in slot order; ranking ``u'`` itself (the project's old rule) takes slot 2."""
    usage = torch.tensor([[3e-17, 1e-17, 0.0, 0.5]], dtype=F64)
    a = _allocation(usage)[0]
    assert int(a.argmax()) == 0
    u = EPS + (1 - EPS) * usage[0]
    assert int(torch.argmin(u)) == 2  # the old rule's first slot
    torch.testing.assert_close(a, _allocation(torch.tensor([[0, 0, 0, 0.5]], dtype=F64))[0])


def test_deepmind_cosine_hand_computed():
    """Key and row ``1e-3 (3, 4)``: norms ``sqrt(25e-6 + 1e-6)``, cosine
    ``25e-6 / (26e-6 + 1e-6) = 25/27``."""
    memory = torch.tensor([[[3e-3, 4e-3]]], dtype=F64)
    keys = memory.clone()
    w = _cosine_weights(
        torch.cat([memory, torch.zeros_like(memory)], 1), keys, torch.ones(1, 1, dtype=F64)
    )
    e = torch.exp(torch.tensor([25 / 27, 0.0], dtype=F64))
    torch.testing.assert_close(w[0, 0], e / e.sum(), rtol=1e-12, atol=1e-12)
    sim = A.cosine_similarity(memory, keys, denominator_eps=A.EPSILON)
    torch.testing.assert_close(sim, torch.full((1, 1, 1), 25 / 27, dtype=F64), rtol=1e-12, atol=0)


# ================================================================================================
# The addressing functions
# ================================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_allocation_near_zero_usages_are_exact_ties_in_slot_order(dtype):
    """Rounding noise on never-used slots (below ~8e-17 in float64, ~4e-8 in float32) does not
    change the allocation at all: it equals that of exact zeros, bit for bit, lowest slot first,
    in the addressing function and in the per-step node's torch allocation."""
    from memagents.cores.dnc_access import _allocation_forward

    noise = 7e-17 if dtype == F64 else 3e-8
    gen = torch.Generator().manual_seed(0)
    usage = noise * torch.rand(4, 9, generator=gen, dtype=F64).to(dtype)
    usage[:, 7] = 0.25  # one used slot
    clean = torch.zeros_like(usage)
    clean[:, 7] = 0.25
    expected = A.allocation_weights(clean)
    assert torch.equal(A.allocation_weights(usage), expected)
    assert torch.equal(_allocation_forward(usage)[0], expected)
    assert torch.equal(expected.argmax(-1), torch.zeros(4, dtype=torch.long))


def test_allocation_matches_deepmind_on_ties_and_spread_usages():
    gen = torch.Generator().manual_seed(1)
    spread = torch.rand(5, 8, generator=gen, dtype=F64)
    ties = (torch.arange(8, dtype=F64) // 3 / 8).expand(5, 8).contiguous()
    noisy = 1e-17 * torch.randint(0, 6, (5, 8), generator=gen).to(F64)
    for usage in (spread, ties, noisy, torch.zeros(5, 8, dtype=F64)):
        torch.testing.assert_close(A.allocation_weights(usage), _allocation(usage), **TOL)


def test_write_allocation_is_sequential_as_deepminds():
    """Head h allocates from ``u + (1 - u) g a`` of the heads before it (DeepMind's
    ``write_allocation_weights``), from the zero usage (ties) and from spread usages."""
    gen = torch.Generator().manual_seed(2)
    gates = torch.rand(4, 3, generator=gen, dtype=F64)
    for usage in (torch.zeros(4, 7, dtype=F64), torch.rand(4, 7, generator=gen, dtype=F64)):
        expected, u = [], usage
        for h in range(3):
            expected.append(_allocation(u))
            u = u + (1 - u) * gates[:, h : h + 1] * expected[-1]
        got = A.write_allocation_weights(usage, gates)
        torch.testing.assert_close(got, torch.stack(expected, 1), **TOL)


# ================================================================================================
# DNCCore, every path, one step against DeepMind's
# ================================================================================================


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("usage_gradient", [False, True], ids=["stopped", "usage-gradient"])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_from_random_states_matches_deepmind(path, usage_gradient, seed, calls):
    core = core_for(path, seed, usage_gradient)
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    check_step(core, path, x, random_access_state(seed), seed, usage_gradient)
    check_paths_ran(path, calls)


@pytest.mark.parametrize("path", PATHS)
def test_zero_state_two_write_heads_allocate_like_deepmind(path, calls):
    """From the initial state with two write heads: head 0 takes slot 0; head 1 then sees usages
    ``g a_0[j] ~ g eps^j`` (slot j). Ranked by ``1 - u'`` (DeepMind) slots 3, 4, 5 tie and head 1
    takes slot 3; ranked by ``u'`` (the old rule) slots 4 and 5 tie below slot 3 and head 1 took
    slot 4: an allocation different by 1.0. Every path now writes where DeepMind's does."""
    core = core_for(path, 3, gates=4.0)
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    _, ref, _, iface = check_step(core, path, x, zero_access_state(), 3, False)
    alloc = ref["allocation"].detach()
    assert torch.equal(alloc.argmax(-1), torch.tensor([[0, 3]] * B))
    assert (alloc[:, 1, 3] > 0.99).all()
    # the old rule, on the usage head 1 allocated from
    gate = (iface["allocation_gate"] * iface["write_gate"])[:, :1]
    u1 = gate * alloc[:, 0]
    old_first = torch.sort(EPS + (1 - EPS) * u1, dim=-1, stable=True).indices[:, 0]
    assert torch.equal(old_first, torch.full((B,), 4))
    check_paths_ran(path, calls)


@pytest.mark.parametrize("path", PATHS)
def test_zero_and_tiny_memory_rows_use_deepminds_cosine(path, calls):
    """Memory rows all zero or of norm ~1e-3 and keys of norm ~1e-3 (read key 0 zero): the
    product of norms is of the order of the epsilon, where ``|k||M| + 1e-6`` and ``|k||M|``
    differ by percents; every path matches DeepMind's, with finite gradients."""
    core = core_for(path, 4)
    with torch.no_grad():  # keys of norm ~1e-3: scale the key rows of the interface
        rows = R * W + H * W
        core.interface.weight[:rows] *= 2e-3
        core.interface.bias[:rows] *= 2e-3
        core.interface.weight[:W] = 0.0  # read key 0 of every element: zero
        core.interface.bias[:W] = 0.0
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    access = random_access_state(4, memory="zero-rows")
    _, _, grads, iface = check_step(core, path, x, access, 4, False)
    for g in grads:
        assert g is None or torch.isfinite(g).all()
    # the epsilon matters here: the write content lookup on this memory, with and without it
    keys = iface["write_content_keys"]
    with_eps = A.cosine_similarity(access[0], keys, denominator_eps=EPS)
    without = A.cosine_similarity(access[0], keys)
    assert (with_eps - without).abs().max() > 1e-2
    check_paths_ran(path, calls)


@pytest.mark.parametrize("path", PATHS)
def test_a_run_from_the_zero_state_matches_deepmind_step_by_step(path, calls):
    """Eight steps from the initial state (never-written slots keep usages that differ only by
    rounding): each step of each path equals DeepMind's step from the same previous state."""
    core = core_for(path, 5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, B, 3, generator=gen, dtype=F64)
    state = core.initial_state(B)
    with torch.no_grad():
        ys, states = run_steps(core, path, x, state)
    previous = [state, *states[:-1]]
    for y, s_prev, s_next in zip(ys, previous, states, strict=True):
        xi = core.interface(y[:, :HD]).detach()
        ref = deepmind_access_step(s_prev.access, interface_from_xi(xi, R, H, W))
        for name, value in zip(AccessState._fields, s_next.access, strict=True):
            torch.testing.assert_close(value, ref[name], msg=lambda m, n=name: f"{n}: {m}", **TOL)
        torch.testing.assert_close(y[:, HD:].view(B, R, W), ref["read_words"], **TOL)
    check_paths_ran(path, calls)


# ================================================================================================
# The per-step nodes on their own: DNCAccessStep (activated interface) and DNCStep
# ================================================================================================


@pytest.mark.parametrize(
    "native", [False, pytest.param(True, marks=needs_native)], ids=["torch", "native"]
)
@pytest.mark.parametrize("state", ["random", "zero", "zero-rows"])
@pytest.mark.parametrize("usage_gradient", [False, True], ids=["stopped", "usage-gradient"])
def test_access_node_matches_deepmind(native, state, usage_gradient, calls):
    """``DNCAccessStep`` on the activated interface; ``w^w_{t-1}`` detached (as ``DNCCore.step``
    passes it by default) or not."""
    access = {
        "random": random_access_state(6),
        "zero": zero_access_state(),
        "zero-rows": random_access_state(6, memory="zero-rows"),
    }[state]
    iface = random_interface(6, key_scale=1e-3 if state == "zero-rows" else 1.0)
    leaves = [t.clone().requires_grad_(True) for t in access]
    write0 = leaves[5] if usage_gradient else leaves[5].detach()
    with kernel(native):
        out = DNCAccessStep.apply(*leaves[:5], write0, *access_step_inputs(iface, H))
    fields = dict(zip(FIELDS, (*out[:6], out[6]), strict=True))
    ref_leaves = [t.clone().requires_grad_(True) for t in access]
    ref = deepmind_access_step(ref_leaves, iface, usage_gradient)
    for name in FIELDS:
        torch.testing.assert_close(
            fields[name], ref[name], msg=lambda m, n=name: f"{n}: {m}", **TOL
        )
    torch.testing.assert_close(out[7], ref["allocation"], **TOL)
    with kernel(native):  # (the backward runs on the path the forward took)
        grads = torch.autograd.grad(projection(fields, 7), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(projection(ref, 7), ref_leaves, allow_unused=True)
    for name, g, g_ref in zip(AccessState._fields, grads, ref_grads, strict=True):
        assert_close_or_zero(g, g_ref, f"gradient of the previous {name}")
    assert (grads[5] is None) != usage_gradient
    assert (calls["native"] > 0) == native


@needs_native
@pytest.mark.parametrize("state", ["random", "zero"])
@pytest.mark.parametrize("usage_gradient", [False, True], ids=["stopped", "usage-gradient"])
def test_whole_step_node_matches_deepmind(state, usage_gradient):
    """``DNCStep`` (controller, ξ and access in one kernel call): its access outputs equal
    DeepMind's step on ``ξ = h W_ξ + b``, and so do the gradients of the previous access state
    (``w^w_{t-1}`` passed detached or not: the kernel then skips its gradient)."""
    gen = torch.Generator().manual_seed(8)
    X = R * W + 2 * H * W + R + H + H * W + R + 2 * H + R * (1 + 2 * H)
    ctrl = (
        torch.randn(B, 4 * HD, generator=gen, dtype=F64), torch.randn(B, HD, generator=gen, dtype=F64),
        torch.randn(B, HD, generator=gen, dtype=F64), torch.randn(B, R * W, generator=gen, dtype=F64),
        0.3 * torch.randn(R * W + HD, 4 * HD, generator=gen, dtype=F64),
        0.3 * torch.randn(HD, X, generator=gen, dtype=F64), torch.randn(X, generator=gen, dtype=F64),
    )  # fmt: skip
    access = random_access_state(8) if state == "random" else zero_access_state()
    leaves = [t.clone().requires_grad_(True) for t in access]
    write0 = leaves[5] if usage_gradient else leaves[5].detach()
    with kernel(True):
        out = DNCStep.apply(*ctrl, *leaves[:5], write0)
        fields = dict(zip(FIELDS, out[2:9], strict=True))
        grads = torch.autograd.grad(projection(fields, 9), leaves, allow_unused=True)
    xi = (out[0] @ ctrl[5] + ctrl[6]).detach()
    ref_leaves = [t.clone().requires_grad_(True) for t in access]
    ref = deepmind_access_step(ref_leaves, interface_from_xi(xi, R, H, W), usage_gradient)
    for name in FIELDS:
        torch.testing.assert_close(
            fields[name], ref[name], msg=lambda m, n=name: f"{n}: {m}", **TOL
        )
    torch.testing.assert_close(out[9], ref["allocation"], **TOL)
    ref_grads = torch.autograd.grad(projection(ref, 9), ref_leaves, allow_unused=True)
    for name, g, g_ref in zip(AccessState._fields, grads, ref_grads, strict=True):
        assert_close_or_zero(g, g_ref, f"gradient of the previous {name}")
    assert (grads[5] is None) != usage_gradient


# ================================================================================================
# The usage gradient: stopped by default, exact with usage_gradient=True
# ================================================================================================


def _two_steps(core, path, access, seed=9):
    """A loss of two steps of ``core`` from ``access`` (random controller state) as a function
    of the six access tensors."""
    x = torch.randn(2, B, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(B, core.output_size, generator=gen, dtype=F64) for _ in range(2)]

    def loss(*leaves):
        state = state_with(core, leaves, seed)
        if path == "sequence":
            with kernel(True):
                y, s = core(x, state)
            ys = list(y)
        else:
            ys, states = run_steps(core, path, x, state)
            s = states[-1]
        total = sum((y * w).sum() for y, w in zip(ys, weights, strict=True))
        return total + (s.usage * s.memory.sum(-1)).sum() + s.write_weights.square().sum()

    return loss


@pytest.mark.parametrize("path", PATHS)
def test_usage_gradient_option_gives_the_exact_derivative(path, calls):
    """``usage_gradient=True``: float64 gradcheck through two steps w.r.t. every previous access
    tensor, the previous write weights included (the second step's usage sees the first step's
    write weights inside the sequence node)."""
    core = core_for(path, 10, usage_gradient=True, memory_size=4, word_size=3, hidden_size=3)
    access = random_access_state(10, n=4, w=3)
    inputs = tuple(t.clone().requires_grad_(True) for t in access)
    assert torch.autograd.gradcheck(_two_steps(core, path, access), inputs)
    check_paths_ran(path, calls)


@pytest.mark.parametrize("path", PATHS)
def test_usage_gradient_is_stopped_by_default(path, calls):
    """By default the previous write weights get no gradient (they reach the step only through
    the usage) although the loss depends on them (a finite difference is far from 0), and the
    gradients of the other access tensors through two steps equal those of a run whose every
    step detaches ``w^w_{t-1}`` (DeepMind's ``tf.stop_gradient``), the exact ones otherwise
    differing."""
    sizes = {"memory_size": 4, "word_size": 3, "hidden_size": 3}
    core = core_for(path, 11, **sizes)
    exact = core_for(path, 11, usage_gradient=True, **sizes)
    access = random_access_state(11, n=4, w=3)
    inputs = [t.clone().requires_grad_(True) for t in access]
    loss = _two_steps(core, path, access)
    grads = torch.autograd.grad(loss(*inputs), inputs, allow_unused=True)
    assert grads[5] is None or torch.count_nonzero(grads[5]) == 0
    with torch.no_grad():  # but the loss does depend on w^w_{t-1}
        bumped = list(access)
        bumped[5] = access[5] + 1e-4 * torch.rand(access[5].shape, dtype=F64)
        assert abs(float(loss(*bumped) - loss(*access))) > 1e-8
    # the same gradients as a stepwise run with w^w_{t-1} detached at each step (the reference
    # path's DNCCore.step, checked against DeepMind's above)
    stepwise = core_for("reference", 11, **sizes)
    ref_inputs = [t.clone().requires_grad_(True) for t in access]
    ref_grads = torch.autograd.grad(
        _two_steps(stepwise, "reference", access)(*ref_inputs), ref_inputs, allow_unused=True
    )
    for name, g, g_ref in zip(AccessState._fields, grads, ref_grads, strict=True):
        assert_close_or_zero(g, g_ref, f"gradient of the previous {name}")
    exact_inputs = [t.clone().requires_grad_(True) for t in access]
    exact_grads = torch.autograd.grad(
        _two_steps(exact, path, access)(*exact_inputs), exact_inputs, allow_unused=True
    )
    assert (exact_grads[5].abs().max()) > 1e-6
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(grads[:5], exact_grads[:5], strict=True))
    check_paths_ran(path, calls)


@needs_native
@pytest.mark.parametrize("usage_gradient", [False, True], ids=["stopped", "usage-gradient"])
def test_sequence_node_with_resets_matches_the_stepwise_reference(usage_gradient):
    """Six steps with episode starts inside the sequence node (step 0 and mid-sequence): outputs
    and the gradients of input, starting access state and parameters equal the reference path's
    step loop, with either setting of the option."""
    fused = make_core(12, usage_gradient=usage_gradient)
    reference = make_core(12, fused=False, usage_gradient=usage_gradient)
    gen = torch.Generator().manual_seed(12)
    T = 6
    x = torch.randn(T, B, 3, generator=gen, dtype=F64)
    starts = torch.zeros(T, B)
    starts[0, 1] = starts[3, 2] = 1
    access = random_access_state(12)
    results = []
    for core, on in ((fused, True), (reference, False)):
        leaves = [t.clone().requires_grad_(True) for t in access]
        x_in = x.clone().requires_grad_(True)
        state = state_with(core, leaves, 12)
        with kernel(on):
            y, s = core(x_in, state, starts)
            loss = (
                y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
            ).sum()
            loss = loss + s.write_weights.sum() + s.usage.square().sum()
            params = [p for p in core.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, [x_in, *leaves, *params], allow_unused=True)
        results.append((y.detach(), grads))
    (y_f, g_f), (y_r, g_r) = results
    torch.testing.assert_close(y_f, y_r, **TOL)
    for i, (a, b) in enumerate(zip(g_f, g_r, strict=True)):
        assert_close_or_zero(a, b, f"gradient {i}")
    assert (g_f[6] is None) != usage_gradient  # the starting write weights


def test_native_tests_are_expected_here():
    """Documents whether this run covers the native paths (see ``-rs`` for skips)."""
    if not HAS_NATIVE:
        pytest.skip("no C++ compiler, or MEMAGENTS_NATIVE=0: native paths not covered")
    assert dnc_access._kernel() is not None
