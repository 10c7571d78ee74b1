"""Each mixture formulation (per-row, union, library kernel, by cost; merged) and the hooks against ``mixture_ref``,
the formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from logo import library_decode
from logo.errors import LogoError
from logo.library import AdapterLibrary, ModuleStack
from logo.mixture import Mixture
from logo.mixture_ops import MERGE_COST, READ_COST, ModuleMixture, Workspace, coefficients
from logo.mixture_ref import mixture_ref

N, D_IN, D_OUT, R_MAX = 6, 24, 16, 4
RANKS = [4, 1, 3, 2, 4, 2]  # mixed ranks: zero-padded to R_MAX, as the library stacks them


def make_stack(dtype=torch.float32, seed=0) -> ModuleStack:
    gen = torch.Generator().manual_seed(seed)
    a = torch.zeros(N, R_MAX, D_IN)
    bt = torch.zeros(N, R_MAX, D_OUT)
    for i, r in enumerate(RANKS):
        a[i, :r] = torch.randn(r, D_IN, generator=gen) * 0.3
        bt[i, :r] = torch.randn(r, D_OUT, generator=gen) * 0.3
    scaling = torch.rand(N, generator=gen) + 0.5
    scaling[5] = 0.0  # adapter 5 does not target this module
    return ModuleStack(a.to(dtype), bt.to(dtype), scaling)


def make_linear(dtype=torch.float32, seed=1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT).to(dtype)


CASES = {
    "shared_rows": ([[0, 2, 3]] * 3, [[0.5, 0.3, 0.2]] * 3),
    "disjoint_rows": ([[0, 1], [2, 3], [4, 5]], [[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]]),
    "overlapping_rows": ([[0, 1, 2], [1, 2, 3], [2, 0, 4]], [[0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [1.0, 0.5, 0.25]]),
    "k1": ([[3], [0], [3]], [[1.0], [1.0], [0.5]]),
    "k_equals_n": ([list(range(N)), list(reversed(range(N)))], [[1 / N] * N, [0.3, 0.1, 0.2, 0.1, 0.2, 0.1]]),
    "repeat_unused_and_base_row": ([[1, 1, 0], [2, 0, 0], [4, 3, 0]], [[0.5, 0.25, 0.0], [0.0, 0.0, 0.0],
                                                                        [0.7, 0.3, 0.0]]),
}


def _selection(case: str):
    indices, weights = CASES[case]
    return torch.tensor(indices), torch.tensor(weights)


def _ours(linear, stack, x, indices, weights, formulation, workspace=None):
    mix = ModuleMixture(stack, indices, coefficients(stack, indices, weights), formulation, workspace, "m")
    return mix.add_to(x, linear(x))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("formulation", ["rows", "union", "library", "auto"])
@pytest.mark.parametrize("tokens", [None, 1, 5], ids=["2d", "3d_one_token", "3d_five_tokens"])
def test_formulation_equals_formula(case, formulation, tokens):
    """``library`` runs the kernel for one token per row and a torch formulation for five (``auto`` likewise)."""
    if formulation == "library" and not library_decode.available():
        pytest.skip("the library-decode kernel cannot be built here (no C++ compiler or ninja)")
    stack, linear = make_stack(), make_linear()
    indices, weights = _selection(case)
    gen = torch.Generator().manual_seed(2)
    shape = (indices.shape[0], D_IN) if tokens is None else (indices.shape[0], tokens, D_IN)
    x = torch.randn(*shape, generator=gen)  # one token per row (decoding) takes the a x^T path of ``rows``
    with torch.no_grad():
        got = _ours(linear, stack, x, indices, weights, formulation, Workspace())
        want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling, indices, weights)
        base = linear(x)
    assert got.shape == base.shape
    assert (want - base).abs().max() > 0.1, "the mixture must visibly change the output for this test to bite"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def compact_and_wide(stored: torch.dtype) -> tuple[ModuleStack, ModuleStack]:
    """The test stack's values rounded to ``stored``, kept compact (stored narrow, computed in fp32) and widened."""
    stack = make_stack()
    a, bt = stack.A.to(stored), stack.Bt.to(stored)
    return ModuleStack(a, bt, stack.scaling, torch.float32), ModuleStack(a.float(), bt.float(), stack.scaling)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["overlapping_rows", "repeat_unused_and_base_row", "shared_rows"])
@pytest.mark.parametrize("formulation", ["rows", "union", "library", "auto", "merged"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_a_compact_stack_gives_the_same_bits_as_its_widened_copy(stored, case, formulation, tokens):
    """Factors kept in bf16/fp16 under fp32 (``logo.library``'s compact storage) are widened exactly wherever they
    are read (gathers, the library kernel, merging): every formulation's output equals the widened stack's bit for
    bit, and the mixture is computed in fp32."""
    compact, wide = compact_and_wide(stored)
    linear = make_linear()
    indices, weights = _selection(case)
    if formulation == "merged":
        indices, weights = indices[:1], weights[:1]
    x = torch.randn(indices.shape[0], tokens, D_IN, generator=torch.Generator().manual_seed(12))
    got = []
    for stack in (compact, wide):
        mix = ModuleMixture(stack, indices, coefficients(stack, indices, weights), formulation, Workspace(), "m")
        with torch.no_grad():
            if formulation == "merged":
                assert mix.merge_before(tokens, linear.weight)
                got.append(nn.functional.linear(x, mix.merged, linear.bias))
            else:
                got.append(mix.add_to(x, linear(x)))
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], got[1])
    if case != "repeat_unused_and_base_row":
        assert (got[0] - linear(x)).abs().max() > 0.1, "the mixture must visibly change the output for this to bite"


@pytest.mark.parametrize("formulation", ["rows", "union"])
def test_bf16_within_stated_tolerance(formulation):
    """bf16 factors and activations (8-bit mantissa): within 3e-2 of the fp32 formula on the same bf16 values."""
    stack, linear = make_stack(torch.bfloat16), make_linear(torch.bfloat16)
    indices, weights = _selection("overlapping_rows")
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        got = _ours(linear, stack, x, indices, weights, formulation)
        want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling, indices, weights)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("formulation", ["rows", "union"])
def test_repeated_rows_follow_their_mixture(formulation):
    """generate repeats each row for num_return_sequences: row b's copies keep row b's mixture."""
    stack, linear = make_stack(), make_linear()
    indices, weights = _selection("disjoint_rows")
    x = torch.randn(6, 4, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = _ours(linear, stack, x, indices, weights, formulation)
        want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling,
                           indices.repeat_interleave(2, 0), weights.repeat_interleave(2, 0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("formulation", ["rows", "union"])
def test_requires_grad_gives_the_formulas_gradient(formulation):
    stack, linear = make_stack(), make_linear()
    indices, weights = _selection("overlapping_rows")
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(5), requires_grad=True)
    got = _ours(linear, stack, x, indices, weights, formulation)
    (got ** 2).sum().backward()
    grad, x.grad = x.grad.clone(), None
    want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling, indices, weights)
    (want ** 2).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-4, rtol=1e-4)


def test_cost_choice():
    stack = make_stack()
    coeff = lambda idx: coefficients(stack, idx, torch.ones(idx.shape))  # noqa: E731
    disjoint = torch.tensor([[0, 1], [2, 3], [4, 0]])
    shared = torch.tensor([[0, 1]] * 3)
    assert ModuleMixture(stack, shared[:1], coeff(shared[:1])).choose(64) == "union"  # one broadcast row
    assert ModuleMixture(stack, shared, coeff(shared)).choose(64) == "union"  # U = k: same work, fewer reads
    assert ModuleMixture(stack, disjoint, coeff(disjoint)).choose(64) == "rows"  # prefill: union does 3x work
    assert ModuleMixture(stack, disjoint, coeff(disjoint), "union").choose(64) == "union"  # forced
    with pytest.raises(ValueError, match="formulation"):
        ModuleMixture(stack, shared, coeff(shared), "fused")
    with pytest.raises(ValueError, match="merged formulation needs one mixture shared by every row, got 3 rows"):
        ModuleMixture(stack, shared, coeff(shared), "merged")


def test_workspace_is_reused_without_stale_factors():
    stack, linear, ws = make_stack(), make_linear(), Workspace()
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pointers = set()
        for case in ("overlapping_rows", "disjoint_rows", "k1"):  # the first is the largest
            indices, weights = _selection(case)
            mix = ModuleMixture(stack, indices, coefficients(stack, indices, weights), "rows", ws, "m")
            got = mix.add_to(x, linear(x))
            pointers.add(mix.row_factors()[0].data_ptr())
            want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling, indices, weights)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(pointers) == 1


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = make_linear()

    def forward(self, x):
        return self.lin(x)


def _net_and_mixture(dtype=torch.float32) -> tuple[_Net, ModuleStack, Mixture]:
    """A one-layer net, the stack of its ``lin`` module and a :class:`Mixture` over them."""
    net, stack = _Net().to(dtype), make_stack(dtype)
    library = AdapterLibrary(names=[f"a{i}" for i in range(N)], paths=[], configs=[], stacks={"lin": stack})
    return net, stack, Mixture(net, library)


@pytest.mark.parametrize("case", ["shared_rows", "disjoint_rows", "repeat_unused_and_base_row"])
def test_mixture_hooks_equal_formula_and_base_comes_back(case):
    net, stack, mixture = _net_and_mixture()
    indices, weights = _selection(case)
    x = torch.randn(indices.shape[0], 5, D_IN, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = net(x)
        mixture.set(indices, weights)
        got = net(x)
        with mixture.suspended():
            torch.testing.assert_close(net(x), base, atol=0, rtol=0)
        mixture.clear()
        after = net(x)
    want = mixture_ref(x, net.lin.weight, net.lin.bias, stack.A, stack.B, stack.scaling, indices, weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, base, atol=0, rtol=0)
    mixture.remove()


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("case", ["shared_rows", "k1", "k_equals_n", "repeat_unused_and_base_row"])
def test_merged_weight_equals_formula(case):
    """``(W + sum_j c_j B_j A_j) x`` against the formula, for one row's mixture (mixed ranks, repeats, unused slots)."""
    stack, linear = make_stack(), make_linear()
    indices, weights = (t[:1] for t in _selection(case))
    x = torch.randn(1, 5, D_IN, generator=torch.Generator().manual_seed(8))
    mix = ModuleMixture(stack, indices, coefficients(stack, indices, weights), "merged", Workspace(), "m")
    with torch.no_grad():
        assert mix.merge_before(5, linear.weight)
        got = nn.functional.linear(x, mix.merged, linear.bias)
        want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling, indices, weights)
    assert (want - linear(x)).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ski_rental_merges_once_the_factor_calls_cost_as_much_as_merging():
    """d_in = d_out = 256: merging costs MERGE_COST * 128 = 76.8 units, a one-token call READ_COST + 1 = 17."""
    assert (MERGE_COST, READ_COST) == (0.6, 16), "the call counts below follow from these constants"
    stack = make_stack()
    weight = torch.zeros(256, 256)
    big = ModuleStack(torch.randn(N, R_MAX, 256), torch.randn(N, R_MAX, 256), stack.scaling)
    one = torch.tensor([[0, 2]])

    def mixture(formulation="auto", rows=one):
        return ModuleMixture(big, rows, coefficients(big, rows, torch.ones(rows.shape)), formulation)

    decode = mixture()
    assert [decode.merge_before(1, weight) for _ in range(6)] == [False, False, False, False, True, True]
    assert decode.merged is not None and decode.spent == 4 * 17
    assert mixture().merge_before(64, weight), "a long prefill costs more than merging: merge before it"
    per_row = torch.tensor([[0, 2], [1, 3]])
    assert not any(mixture(rows=per_row).merge_before(1, weight) for _ in range(50)), "per-row mixtures never merge"
    assert not any(mixture("union").merge_before(64, weight) for _ in range(50)), "a forced formulation never merges"
    assert mixture("merged").merge_before(1, weight), "forced merging merges on the first call"


def test_mixture_merges_a_shared_mixture_and_puts_the_base_weight_back():
    net, stack, mixture = _net_and_mixture()
    base_weight, snapshot = net.lin.weight, net.lin.weight.detach().clone()
    indices, weights = _selection("shared_rows")
    x = torch.randn(3, 1, D_IN, generator=torch.Generator().manual_seed(9))
    want = mixture_ref(x, net.lin.weight, net.lin.bias, stack.A, stack.B, stack.scaling, indices, weights)
    with torch.no_grad():
        base = net(x)
        mixture.set(indices, weights)
        assert mixture.hooked_modules == ["lin"] and mixture.merged_modules == []
        first = net(x)  # tiny layer: merging is cheaper than one call, so it merges before the first
        assert mixture.merged_modules == ["lin"] and net.lin.weight is not base_weight
        assert mixture.hooked_modules == [], "a merged module runs hook-free"
        second = net(x)
        with mixture.suspended():
            assert net.lin.weight is base_weight
            torch.testing.assert_close(net(x), base, atol=0, rtol=0)
        assert mixture.merged_modules == ["lin"] and mixture.hooked_modules == []
        third = net(x)
        mixture.set(indices[:, :1], weights[:, :1])  # a new mixture: the old merged weight is gone
        assert net.lin.weight is base_weight and mixture.merged_modules == [] and mixture.hooked_modules == ["lin"]
        mixture.clear()
        after = net(x)
    for got in (first, second, third):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert net.lin.weight is base_weight and torch.equal(net.lin.weight, snapshot)
    torch.testing.assert_close(after, base, atol=0, rtol=0)
    mixture.remove()


def test_mixture_does_not_merge_per_row_bf16_or_with_autograd():
    indices, weights = _selection("shared_rows")
    net, stack, mixture = _net_and_mixture(torch.bfloat16)
    with torch.no_grad():
        mixture.set(indices, weights)
        net(torch.randn(3, 1, D_IN).to(torch.bfloat16))
    assert mixture.merged_modules == [], "merging would round the mixture to the bf16 weight"
    net, stack, mixture = _net_and_mixture()
    with torch.no_grad():
        mixture.set(*_selection("disjoint_rows"))
        net(torch.randn(3, 1, D_IN))
    assert mixture.merged_modules == []
    mixture.set(indices, weights)
    x = torch.randn(3, 1, D_IN, requires_grad=True)
    net(x).sum().backward()
    assert mixture.merged_modules == [] and x.grad is not None


# ------------------------------------------------------------------------------- rows that follow the batch
def _gathered_rows(monkeypatch, stack: ModuleStack) -> list[int]:
    """A list that collects how many adapters' ``A`` factors each gather copies from ``stack``."""
    counts: list[int] = []
    real = torch.index_select

    def spy(source, dim, index, *args, **kwargs):
        if source is stack.A:
            counts.append(index.numel())
        return real(source, dim, index, *args, **kwargs)

    monkeypatch.setattr(torch, "index_select", spy)
    return counts


def _check(net, stack, mixture, x, indices, weights, window=False):
    """The net's output equals the formula for rows ``(indices, weights)``, which are the mixture's (or the
    rows of its ``rows_from`` window)."""
    with torch.no_grad():
        got = net(x)
    with mixture.suspended():  # the base weight (a shared mixture may have merged into a copy of it)
        want = mixture_ref(x, net.lin.weight, net.lin.bias, stack.A, stack.B, stack.scaling, indices, weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if not window:
        torch.testing.assert_close(mixture.indices, indices, atol=0, rtol=0)


@pytest.mark.parametrize("tokens", [1, 5])
def test_added_and_dropped_rows_keep_their_gathered_factors(monkeypatch, tokens):
    """A server's batch: rows join (only theirs are gathered; their prefill runs alone), rows leave (each hole takes
    the last row: one row moved, nothing gathered); every output equals the formula for the rows as they are."""
    net, stack, mixture = _net_and_mixture()
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(6, tokens, D_IN, generator=gen)
    indices = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 3], [2, 4], [3, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [1.0, 0.25]])
    counts = _gathered_rows(monkeypatch, stack)
    mixture.formulation = "rows"  # the per-row formulation is the one whose factors stay in place
    mixture.set(indices[:3], weights[:3])
    _check(net, stack, mixture, x[:3], indices[:3], weights[:3])
    assert counts == [6]  # 3 rows x k = 2

    mixture.add_rows(indices[3:], weights[3:])
    with mixture.rows_from(3):
        _check(net, stack, mixture, x[3:], indices[3:], weights[3:], window=True)  # the newcomers' prefill
    _check(net, stack, mixture, x, indices, weights)
    assert counts == [6, 6], "only the 3 new rows were gathered"

    order = torch.tensor([0, 5, 2, 4])  # rows 1 and 3 finished: rows 5 and 4 fill their places
    mixture.keep_rows(order)
    _check(net, stack, mixture, x[order], indices[order], weights[order])
    assert counts == [6, 6], "rows that stay or move are not gathered again"

    mixture.keep_rows(torch.tensor([3, 2, 1, 0]))  # any order works (all rows move)
    _check(net, stack, mixture, x[order.flip(0)], indices[order.flip(0)], weights[order.flip(0)])
    assert counts == [6, 6]
    mixture.remove()


@pytest.mark.parametrize("case", ["shared_then_different", "different_then_shared", "wider_k", "base_rows"])
def test_row_changes_that_lay_the_mixture_out_again(case):
    """Changes after which rows cannot keep their places (a shared mixture is kept as one row; a wider k changes
    every row's width; base rows gather nothing) are set afresh, with the same outputs as the formula."""
    net, stack, mixture = _net_and_mixture()
    x = torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(11))
    one, two = ([[0, 2]], [[0.5, 0.5]]), ([[1, 3]], [[0.3, 0.7]])
    first, added = {
        "shared_then_different": ((one[0] * 2, one[1] * 2), (two[0] * 2, two[1] * 2)),
        "different_then_shared": ((one[0] + two[0], one[1] + two[1]), (one[0] * 2, one[1] * 2)),
        "wider_k": ((one[0] * 2, one[1] * 2), ([[1, 3, 4]] * 2, [[0.2, 0.3, 0.5]] * 2)),
        "base_rows": (([[0, 0]] * 2, [[0.0, 0.0]] * 2), (two[0] * 2, two[1] * 2)),
    }[case]
    first, added = [tuple(torch.tensor(t) for t in pair) for pair in (first, added)]
    mixture.set(*first)
    mixture.add_rows(*added)
    k = max(first[0].shape[1], added[0].shape[1])
    pad = lambda t: nn.functional.pad(t, (0, k - t.shape[1]))  # noqa: E731
    indices = torch.cat([pad(first[0]), pad(added[0])])
    weights = torch.cat([pad(first[1]), pad(added[1])])
    with mixture.rows_from(2):
        _check(net, stack, mixture, x[2:], indices[2:], weights[2:], window=True)
    _check(net, stack, mixture, x, indices, weights)
    if case == "different_then_shared":  # keep only the rows with the same mixture: shared again
        mixture.keep_rows(torch.tensor([2, 0, 3]))
        _check(net, stack, mixture, x[:3], indices[[2, 0, 3]], weights[[2, 0, 3]])
    mixture.keep_rows(torch.tensor([], dtype=torch.long))
    assert not mixture.active and mixture.hooked_modules == []
    mixture.remove()


def test_row_changes_refuse_bad_rows():
    _net, _stack, mixture = _net_and_mixture()
    with pytest.raises(LogoError, match="keep_mixture_rows needs a mixture"):
        mixture.keep_rows(torch.tensor([0]))
    mixture.set(*_selection("disjoint_rows"))
    for bad in ([0, 0], [3], [-1]):
        with pytest.raises(LogoError, match=r"distinct row numbers in \[0, 3\)"):
            mixture.keep_rows(torch.tensor(bad))
    with pytest.raises(LogoError, match="outside the mixture's 3 rows"):
        with mixture.rows_from(4):
            pass
    mixture.remove()


def test_workspace_keeps_the_values_it_is_asked_to_when_it_grows():
    ws, like = Workspace(), torch.zeros(1)
    ws.take(("k",), (2, 3), like).copy_(torch.arange(6.0).view(2, 3))
    grown = ws.take(("k",), (4, 3), like, keep=6)
    torch.testing.assert_close(grown[:2], torch.arange(6.0).view(2, 3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not hold the 30 values to keep"):
        ws.take(("k",), (20, 3), like, keep=30)
