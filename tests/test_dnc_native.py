"""The DNC access step's C++ kernel (``csrc/dnc_access.cpp``) against its torch implementation
(:class:`~memagents.cores.dnc_access.DNCAccessStep` without the kernel) and against the
plain-autograd reference built from the :mod:`~memagents.cores.addressing` functions (the
``fused=False`` path of ``DNCCore``).

- one step, float64: every output and the gradient of every input agree to ~1e-10 for 1-3 write
  heads, 1-5 read heads and sizes that exercise the vector loops' tails, with the activated
  interface and with the raw interface vector ξ (the kernel then applies the activations);
- edge cases: a freshly reset state (all usages tied at zero, memory 1e-6), partial ties, an
  all-zero memory, unused outputs (null gradients), a link that needs no gradient, strided
  interface slices and batch-expanded state tensors;
- ``gradcheck`` of the native backward in float64, one and two write heads, both interfaces;
- the whole step (:class:`~memagents.cores.dnc_access.DNCStep`: controller, interface, access):
  ``gradcheck``; the whole sequence as one node (:class:`~memagents.cores.dnc_access.DNCSequence`)
  that ``DNCCore.forward`` runs on the CPU: ``gradcheck`` with resets at step 0 and mid-sequence
  (learned initial h, c, r), and a whole sequence with episode starts (step 0 and
  mid-sequence) whose outputs, final state and gradients of input, starting state and every
  parameter agree with the torch step loop and the reference (float64), with the sequence node
  called once;
- float32 agrees with float64 to ~1e-5 (one access step, and a DNCCore sequence);
- the kernel builds and loads whenever a C++ compiler is present.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_NATIVE, build_core, needs_native, randomize_initial_state

from memagents.cores import addressing as A
from memagents.cores import dnc, dnc_access, native
from memagents.cores import state as state_lib
from memagents.cores.dnc_access import DNCAccessStep, DNCSequence, DNCStep, interface_sizes

F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}

needs_kernel = needs_native


def test_kernel_loads_when_a_compiler_exists():
    if not HAS_NATIVE:
        pytest.skip("no C++ compiler, or MEMAGENTS_NATIVE=0")
    lib = dnc_access._kernel()
    assert lib is not None, native._errors.get("dnc_access")
    dims = (dnc_access.ctypes.c_long * 5)(2, 5, 3, 2, 1)
    assert lib.dnc_interface_size(dims) == sum(interface_sizes(2, 1, 3))
    assert lib.dnc_workspace_size(dims) > 0


def _run(path: str, fn, inputs, seed: int = 1, outputs: slice = slice(0, 7)):
    """Outputs of ``fn(*inputs)`` and the gradients of a random projection of the selected
    outputs w.r.t. every input, with ``path`` ``"native"`` or ``"torch"``."""
    kernel = dnc_access._kernel()
    saved = dnc_access.lib
    dnc_access.lib = kernel if path == "native" else None
    try:
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]
        outs = fn(*xs)
        gen = torch.Generator().manual_seed(seed)
        loss = sum(  # the same projection in every dtype
            (o * torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)).sum()
            for o in outs[outputs]
        )
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
    finally:
        dnc_access.lib = saved
    return [o.detach() for o in outs], grads


def _reference(memory0, usage0, link0, prec0, read0, write0, *interface):
    """The access step from the addressing functions under plain autograd (``fused=False``)."""
    kr, br, kw, bw, v, erase, free, g_alloc, g_write, modes = interface
    H = write0.shape[1]
    usage = A.usage_update(usage0, write0, free, read0)  # (exact: the step node is)
    write_content = A.content_weights(memory0, kw, bw, denominator_eps=A.EPSILON)
    alloc = A.write_allocation_weights(usage, g_alloc * g_write)
    g_a = g_alloc.unsqueeze(-1)
    write = g_write.unsqueeze(-1) * (write_content + g_a * (alloc - write_content))
    memory = A.erase_and_add(memory0, write, erase, v)
    link, fwd, bwd = A.link_update_and_read(link0, write, prec0, read0)
    precedence = A.precedence_update(prec0, write)
    read = (
        modes[..., H : H + 1] * A.content_weights(memory, kr, br, denominator_eps=A.EPSILON)
        + torch.einsum("brh,brhn->brn", modes[..., :H], bwd)
        + torch.einsum("brh,brhn->brn", modes[..., H + 1 :], fwd)
    )
    return memory, usage, link, precedence, read, write, A.read_memory(memory, read), alloc


def _activate(raw, R, H, W):
    """ξ -> the activated interface, as ``DNCCore``'s reference path does it."""
    B = raw.shape[0]
    kr, kw, v, br, bw, erase, free, g_alloc, g_write, modes = raw.split(
        interface_sizes(R, H, W), dim=-1
    )
    return (
        kr.reshape(B, R, W), A.oneplus(br), kw.reshape(B, H, W), A.oneplus(bw),
        v.reshape(B, H, W), torch.sigmoid(erase).reshape(B, H, W), torch.sigmoid(free),
        torch.sigmoid(g_alloc), torch.sigmoid(g_write),
        torch.softmax(modes.reshape(B, R, 1 + 2 * H), dim=-1),
    )  # fmt: skip


def _inputs(B, N, W, R, H, seed=0, dtype=F64, usage="spread", memory="random"):
    """A valid previous state (link with zero diagonal and sub-stochastic rows/columns,
    weightings summing to <= 1) and an activated interface."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def weighting(*shape):
        return torch.softmax(2 * randn(*shape), -1) * rand(*shape[:-1], 1)

    link = rand(B, H, N, N) / N
    link = link * (1 - torch.eye(N, dtype=dtype))
    if usage == "spread":  # well apart: a 1e-6 perturbation cannot reorder the sort
        u = (torch.stack([torch.randperm(N, generator=gen) for _ in range(B)]).to(dtype) + 0.5) / N
    elif usage == "zero":  # a fresh episode: every slot tied
        u = torch.zeros(B, N, dtype=dtype)
    else:  # "ties": pairs of exactly equal usages
        u = (torch.arange(N, dtype=dtype) // 2 / N).flip(0).expand(B, N).contiguous()
    if memory == "random":
        m = randn(B, N, W)
    elif memory == "fresh":
        m = torch.full((B, N, W), 1e-6, dtype=dtype)
    else:
        m = torch.zeros(B, N, W, dtype=dtype)
    return (
        m, u, link, weighting(B, H, N), weighting(B, R, N), weighting(B, H, N),
        randn(B, R, W), A.oneplus(randn(B, R)), randn(B, H, W), A.oneplus(randn(B, H)),
        randn(B, H, W), rand(B, H, W), rand(B, R), rand(B, H), rand(B, H),
        torch.softmax(randn(B, R, 1 + 2 * H), -1),
    )  # fmt: skip


def _assert_all_close(a, b, what, **tol):
    tol = tol or TOL
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert (x is None) == (y is None), f"{what} {i}: one is None"
        if x is not None:
            torch.testing.assert_close(x, y, msg=lambda m, i=i: f"{what} {i}: {m}", **tol)


SHAPES = [  # B, N, W, R, H
    (3, 5, 3, 1, 1),
    (2, 4, 3, 2, 2),
    (2, 7, 4, 3, 2),
    (2, 9, 5, 5, 3),  # five read heads: the row passes' chunks of four plus one
    (2, 37, 17, 4, 1),  # past the vector width, with tails
    (1, 64, 16, 4, 1),  # the benchmark's word size and reads
]


@needs_kernel
@pytest.mark.parametrize(("B", "N", "W", "R", "H"), SHAPES)
def test_one_step_matches_torch_and_reference(B, N, W, R, H):
    inputs = _inputs(B, N, W, R, H, seed=N + R + H)
    native_out, native_grad = _run("native", DNCAccessStep.apply, inputs)
    torch_out, torch_grad = _run("torch", DNCAccessStep.apply, inputs)
    ref_out, ref_grad = _run("torch", _reference, inputs)
    _assert_all_close(native_out, torch_out, "output (native vs torch)")
    _assert_all_close(native_out, ref_out, "output (native vs reference)")
    _assert_all_close(native_grad, torch_grad, "gradient (native vs torch)")
    _assert_all_close(native_grad, ref_grad, "gradient (native vs reference)")
    # invariants of the new state
    _memory, usage, link, precedence, read, write, _rv, alloc = native_out
    assert torch.all(link.diagonal(dim1=-2, dim2=-1) == 0)
    assert torch.all((usage >= 0) & (usage <= 1))
    for w in (precedence, read, write, alloc):
        assert torch.all(w >= 0) and torch.all(w.sum(-1) <= 1 + 1e-12)


@needs_kernel
@pytest.mark.parametrize(("B", "N", "W", "R", "H"), SHAPES[:5])
def test_raw_interface_matches_torch_and_reference(B, N, W, R, H):
    """ξ passed whole: the kernel's activations and their gradients (raw values past softplus'
    threshold of 20 included) agree with torch's and with the reference's."""
    state = _inputs(B, N, W, R, H, seed=N)[:6]
    gen = torch.Generator().manual_seed(N)
    raw = 3 * torch.randn(B, sum(interface_sizes(R, H, W)), generator=gen, dtype=F64)
    raw[:, R * W + 2 * H * W] = 25.0  # a read strength past the threshold
    inputs = (*state, raw)

    def reference(*args):
        return _reference(*args[:6], *_activate(args[6], R, H, W))

    native_out, native_grad = _run("native", DNCAccessStep.apply, inputs)
    torch_out, torch_grad = _run("torch", DNCAccessStep.apply, inputs)
    ref_out, ref_grad = _run("torch", reference, inputs)
    _assert_all_close(native_out, torch_out, "output (native vs torch)")
    _assert_all_close(native_out, ref_out, "output (native vs reference)")
    _assert_all_close(native_grad, torch_grad, "gradient (native vs torch)")
    _assert_all_close(native_grad, ref_grad, "gradient (native vs reference)")


@needs_kernel
@pytest.mark.parametrize(
    ("usage", "memory"), [("zero", "fresh"), ("ties", "random"), ("spread", "zero")]
)
@pytest.mark.parametrize("H", [1, 2])
def test_edge_states_match(usage, memory, H):
    """Tied usages (a reset: every slot at 0; or pairs of equal values) rank like
    torch.sort(1 - u', descending=True, stable=True), and an all-zero or all-1e-6 memory gives
    the same finite values and gradients on every path."""
    inputs = _inputs(3, 6, 4, 2, H, seed=5, usage=usage, memory=memory)
    if usage == "zero":  # a fresh episode: nothing written or read yet
        inputs = (inputs[0], inputs[1], torch.zeros_like(inputs[2]), *inputs[3:])
    native_out, native_grad = _run("native", DNCAccessStep.apply, inputs)
    torch_out, torch_grad = _run("torch", DNCAccessStep.apply, inputs)
    ref_out, ref_grad = _run("torch", _reference, inputs)
    _assert_all_close(native_out, torch_out, "output")
    _assert_all_close(native_out, ref_out, "output (reference)")
    _assert_all_close(native_grad, torch_grad, "gradient")
    _assert_all_close(native_grad, ref_grad, "gradient (reference)")
    for g in native_grad:
        assert torch.isfinite(g).all()


@needs_kernel
@pytest.mark.parametrize("used", [slice(6, 7), slice(0, 1), slice(2, 3)])
def test_unused_outputs_and_a_link_without_gradient(used):
    """Only some outputs reach the loss (the others' gradients arrive as None), and the previous
    link needs no gradient (as the all-zero initial link): the kernel skips what is not needed
    and the rest still agrees."""
    inputs = list(_inputs(2, 8, 4, 3, 2, seed=9))

    def fn(*args):  # the link enters as a constant
        return DNCAccessStep.apply(*args[:2], inputs[2], *args[2:])

    others = inputs[:2] + inputs[3:]
    native_out, native_grad = _run("native", fn, others, outputs=used)
    torch_out, torch_grad = _run("torch", fn, others, outputs=used)
    _assert_all_close(native_out, torch_out, "output")
    _assert_all_close(native_grad, torch_grad, "gradient")


@needs_kernel
def test_strided_and_expanded_inputs():
    """Interface tensors that are slices of one wider tensor (batch stride larger than a row) and
    state tensors expanded along the batch (stride 0) are read in place and give the same
    results as contiguous copies."""
    B, N, W, R, H = 3, 6, 4, 2, 2
    inputs = _inputs(B, N, W, R, H, seed=3)
    wide = torch.randn(B, 7, 5 * W, dtype=F64)
    strided = list(inputs)
    strided[6] = wide[:, :R, :W].copy_(inputs[6])  # read keys: batch stride 35 W
    strided[11] = wide[:, 3 : 3 + H, W : 2 * W].copy_(inputs[11])  # erase
    strided[15] = torch.randn(B, R, 9, dtype=F64)[:, :, 2 : 3 + 2 * H].copy_(inputs[15])
    strided[0] = inputs[0][:1].expand(B, N, W)  # one memory shared by the batch
    contiguous = [t.contiguous() for t in strided]
    assert not strided[6].is_contiguous() and strided[0].stride(0) == 0

    def fn(*args):
        return DNCAccessStep.apply(*args)

    with torch.no_grad():
        a = fn(*strided) if dnc_access._kernel() else None
        saved = dnc_access.lib
        try:
            b = fn(*contiguous)
            dnc_access.lib = None
            c = fn(*contiguous)
        finally:
            dnc_access.lib = saved
    _assert_all_close(a, b, "strided vs contiguous")
    _assert_all_close(a, c, "native vs torch")
    # gradients through strided views
    _assert_all_close(_run("native", fn, strided)[1], _run("torch", fn, contiguous)[1], "gradient")


@needs_kernel
@pytest.mark.parametrize(("R", "H"), [(1, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("raw", [False, True], ids=["activated", "raw"])
def test_native_gradcheck(R, H, raw):
    """float64 gradcheck of the kernel's backward w.r.t. every input."""
    inputs = _inputs(2, 4, 3, R, H, seed=11)
    if raw:
        gen = torch.Generator().manual_seed(12)
        inputs = (
            *inputs[:6],
            torch.randn(2, sum(interface_sizes(R, H, 3)), generator=gen, dtype=F64),
        )
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs)
    assert dnc_access._kernel() is not None

    def step(*args):
        return DNCAccessStep.apply(*args)[:7]  # the allocation output carries no gradient

    assert torch.autograd.gradcheck(step, inputs)


# -- the whole step (controller, interface, access) ---------------------------------------------
def _step_inputs(B, N, W, R, H, Hd, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    X = sum(interface_sizes(R, H, W))

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=dtype)

    state = _inputs(B, N, W, R, H, seed=seed, dtype=dtype)[:6]
    return (
        randn(B, 4 * Hd), randn(B, Hd), randn(B, Hd), randn(B, R * W),
        randn(R * W + Hd, 4 * Hd, scale=0.3), randn(Hd, X, scale=0.3), randn(X), *state,
    )  # fmt: skip


def _step_reference(gates_x, h0, c0, r0, w_rh, w_xi, b_xi, *state):
    """The same step from torch ops: nn.LSTMCell's cell, the interface Linear, DNCAccessStep on
    ξ (its torch path when the kernel is switched off)."""
    i, f, g, o = (gates_x + torch.cat([r0, h0], -1) @ w_rh).chunk(4, -1)
    c = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h, c, *DNCAccessStep.apply(*state, h @ w_xi + b_xi))


@needs_kernel
@pytest.mark.parametrize(("R", "H"), [(2, 1), (3, 2), (5, 1)])
def test_whole_step_matches_torch(R, H):
    inputs = _step_inputs(3, 9, 4, R, H, Hd=6, seed=R + H)
    native_out, native_grad = _run("native", DNCStep.apply, inputs, outputs=slice(0, 9))
    torch_out, torch_grad = _run("torch", _step_reference, inputs, outputs=slice(0, 9))
    _assert_all_close(native_out, torch_out, "output")
    _assert_all_close(native_grad, torch_grad, "gradient")


@needs_kernel
@pytest.mark.parametrize(("R", "H"), [(1, 1), (2, 2)])
def test_whole_step_gradcheck(R, H):
    inputs = tuple(t.requires_grad_(True) for t in _step_inputs(2, 4, 3, R, H, Hd=3, seed=1))
    assert dnc_access._kernel() is not None

    def step(*args):
        out = DNCStep.apply(*args)
        return out[:9]  # the allocation output carries no gradient

    assert torch.autograd.gradcheck(step, inputs)


# -- whole sequences through DNCCore --------------------------------------------------------------
def _sequence(core, path, x, s0, starts, seed):
    """Outputs, final state and gradients (input, starting access state, parameters) of a random
    projection of the outputs and the final access state."""
    saved = dnc_access.lib
    dnc_access.lib = dnc_access._kernel() if path == "native" else None
    try:
        x_in = x.clone().requires_grad_(True)
        leaves = [t.clone().requires_grad_(True) for t in s0.access]
        s_in = s0._replace(access=type(s0.access)(*leaves))
        y, s_end = core(x_in, s_in, starts)
        gen = torch.Generator().manual_seed(seed)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
        for leaf in s_end.access:
            loss = loss + (leaf * torch.randn(leaf.shape, generator=gen, dtype=y.dtype)).sum()
        params = [p for p in core.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [x_in, *leaves, *params], allow_unused=True)
    finally:
        dnc_access.lib = saved
    return y.detach(), [t.detach() for t in s_end.access], grads


@needs_kernel
@pytest.mark.parametrize(("R", "H"), [(2, 1), (3, 2)])
def test_dnc_sequence_with_resets_matches(R, H, monkeypatch):
    """A DNC run over 6 steps where two of four episodes restart mid-sequence (one of them twice):
    native, torch and reference paths agree on outputs, state and every gradient (float64)."""
    kwargs = {"memory_size": 7, "word_size": 4, "num_reads": R, "num_writes": H}
    fused = build_core("dnc", seed=4, dtype=F64, **kwargs)
    randomize_initial_state(fused, seed=5)
    reference = build_core("dnc", seed=4, dtype=F64, fused=False, **kwargs)
    reference.load_state_dict(fused.state_dict())
    T, B = 6, 4
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(T, B, fused.input_size, generator=gen, dtype=F64)
    starts = torch.zeros(T, B)
    starts[2, 1] = starts[4, 1] = starts[3, 3] = starts[0, 2] = 1
    with torch.no_grad():  # a state reached by running, far from the initial one
        _, s0 = fused(torch.randn(5, B, fused.input_size, generator=gen, dtype=F64))
    calls = []

    class Counting:  # DNCCore.forward's native path: one DNCSequence call per sequence
        @staticmethod
        def apply(*args):
            calls.append(1)
            return DNCSequence.apply(*args)

    monkeypatch.setattr(dnc, "DNCSequence", Counting)
    runs = {
        "native": _sequence(fused, "native", x, s0, starts, 7),
        "torch": _sequence(fused, "torch", x, s0, starts, 7),
        "reference": _sequence(reference, "torch", x, s0, starts, 7),
    }
    assert len(calls) == 1  # the native run took the sequence node, the others did not
    y, state, grads = runs["native"]
    for other in ("torch", "reference"):
        y2, state2, grads2 = runs[other]
        torch.testing.assert_close(y, y2, **TOL)
        _assert_all_close(state, state2, f"state vs {other}")
        _assert_all_close(grads, grads2, f"gradient vs {other}")
    assert all(g is not None for g in grads[-3:])  # h0, c0, read0: reached through the resets


@needs_kernel
@pytest.mark.parametrize("H", [1, 2])
def test_sequence_gradcheck(H):
    """``gradcheck`` of :class:`DNCSequence` (float64, tiny sizes): every input of the sequence
    node, including the learned initial h, c, r reached through resets at steps 0 and 2. With
    ``usage_gradient=True``: the default stops the usage's gradient to the previous write
    weights (DeepMind's), which a numerical derivative does not (``test_dnc_deepmind.py``)."""
    B, N, W, R, Hd, T = 2, 4, 3, 2, 3, 3
    step = _step_inputs(B, N, W, R, H, Hd, seed=3)
    gen = torch.Generator().manual_seed(4)
    gates_x = torch.randn(T, B, 4 * Hd, generator=gen, dtype=F64)
    first = (step[1], step[2], step[3], *step[7:])
    init = [0.5 * torch.randn(B, n, generator=gen, dtype=F64) for n in (Hd, Hd, R * W)]
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[0, 1] = starts[2, 0] = True
    diff = [gates_x, *step[4:7], *first, *init]
    diff = [t.clone().requires_grad_(True) for t in diff]
    assert dnc_access._kernel() is not None

    def run(gates_x, w_rh, w_xi, b_xi, *rest):
        state, learned = rest[:9], rest[9:]
        return DNCSequence.apply(
            gates_x, w_rh, w_xi, b_xi, *state, *learned, starts, True, True
        )  # record, usage_gradient

    assert torch.autograd.gradcheck(run, diff)


@needs_kernel
@pytest.mark.parametrize(("N", "W", "R", "H"), [(24, 16, 4, 1), (21, 11, 2, 2)])
def test_float32_agrees_with_float64(N, W, R, H):
    """The float32 kernel against the float64 torch path, one step (values and gradients); sizes
    on and off the vector width."""
    inputs = _inputs(4, N, W, R, H, seed=2)
    out64, grad64 = _run("torch", DNCAccessStep.apply, inputs)
    out32, grad32 = _run("native", DNCAccessStep.apply, [t.float() for t in inputs])
    tol = {"rtol": 1e-4, "atol": 2e-5}
    _assert_all_close([o.double() for o in out32], out64, "float32 output", **tol)
    _assert_all_close([g.double() for g in grad32], grad64, "float32 gradient", **tol)


@needs_kernel
def test_float32_sequence_agrees_with_float64():
    """A float32 DNCCore (whole-step kernel) over 8 steps with a reset, against the same core in
    float64 on the torch path: outputs and parameter gradients."""
    kwargs = {"memory_size": 16, "word_size": 8, "num_reads": 4, "num_writes": 1}
    core64 = build_core("dnc", seed=8, dtype=F64, **kwargs)
    randomize_initial_state(core64, seed=9)
    core32 = build_core("dnc", seed=8, dtype=torch.float32, **kwargs)
    core32.load_state_dict({k: v.float() for k, v in core64.state_dict().items()})
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(8, 3, core64.input_size, generator=gen, dtype=F64)
    starts = torch.zeros(8, 3)
    starts[4, 2] = 1
    results = []
    for core, path in ((core64, "torch"), (core32, "native")):
        saved = dnc_access.lib
        dnc_access.lib = dnc_access._kernel() if path == "native" else None
        try:
            y, _ = core(x.to(next(core.parameters()).dtype), None, starts)
            params = [p for p in core.parameters() if p.requires_grad]
            grads = torch.autograd.grad(y.square().sum(), params)
        finally:
            dnc_access.lib = saved
        results.append((y.double(), [g.double() for g in grads]))
    (y64, g64), (y32, g32) = results
    torch.testing.assert_close(y32, y64, rtol=1e-4, atol=1e-5)
    _assert_all_close(g32, g64, "float32 parameter gradient", rtol=1e-4, atol=1e-4)


@needs_kernel
def test_rollout_weight_cache_follows_parameter_updates():
    """``DNCCore.forward`` without grad reuses ``b_ih + b_hh`` and ``W_rh`` while the controller's
    parameters are unchanged; an optimizer step, ``load_state_dict`` and ``.to(dtype)`` must
    each invalidate them: the no-grad output always equals the with-grad output (which builds
    the weights afresh), float64 to ~1e-12."""
    torch.manual_seed(0)
    core = dnc.DNCCore(3, hidden_size=6, memory_size=5, word_size=4, num_reads=2).double()
    x, starts = torch.randn(2, 3, 3, dtype=F64), torch.zeros(2, 3)
    s0 = core.initial_state(3)

    def both():
        with torch.no_grad():
            y_cached = core(x, s0, starts)[0]
        return y_cached, core(x, s0, starts)[0].detach()

    y0, fresh = both()
    torch.testing.assert_close(y0, fresh, rtol=0, atol=1e-12)
    weights = core._weights_cache["weights"]
    with torch.no_grad():
        core(x, s0, starts)
    assert core._weights_cache["weights"] is weights  # reused while nothing changed

    opt = torch.optim.SGD(core.parameters(), lr=0.5)
    core(x, s0, starts)[0].square().sum().backward()
    opt.step()
    y1, fresh = both()
    torch.testing.assert_close(y1, fresh, rtol=0, atol=1e-12)
    assert (y1 - y0).abs().max() > 1e-3  # the step changed the output: the cache was rebuilt

    state = {k: v.clone() for k, v in core.state_dict().items()}
    with torch.no_grad():
        core.controller.weight_hh.add_(0.3)
    y2, fresh = both()
    torch.testing.assert_close(y2, fresh, rtol=0, atol=1e-12)
    core.load_state_dict(state)
    torch.testing.assert_close(both()[0], y1, rtol=0, atol=1e-12)

    core.float()
    x32, s32 = x.float(), core.initial_state(3)
    with torch.no_grad():
        y32 = core(x32, s32, starts)[0]
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, y1.float(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_no_grad_sequence_matches_recorded_one():
    """Without grad ``DNCCore.forward`` calls the sequence node's forward as a plain function
    (no autograd bookkeeping): output and final state equal the recorded run's, float64, with
    resets at step 0 and mid-sequence."""
    torch.manual_seed(3)
    core = dnc.DNCCore(3, hidden_size=6, memory_size=5, word_size=4, num_reads=2, num_writes=2)
    core = core.double()
    randomize_initial_state(core)
    x = torch.randn(4, 3, 3, dtype=F64)
    starts = torch.zeros(4, 3)
    starts[0, 0], starts[2, 1:] = 1, 1
    s0 = core.initial_state(3)
    with torch.no_grad():
        y, s = core(x, s0, starts)
    y_ref, s_ref = core(x, s0, starts)
    assert y.grad_fn is None and y_ref.grad_fn is not None
    torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=1e-12)
    for a, b in zip(state_lib.leaves(s), state_lib.leaves(s_ref), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-12)
