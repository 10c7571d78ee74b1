"""The library-decode kernel (one token per row, factors read straight from the stacked library) against its fp32
twin (``library_decode.reference``) and the formula (``mixture_ref``); where the mixture uses it."""

from __future__ import annotations

import platform

import pytest
import torch

from logo import library_decode
from logo.mixture_ops import ModuleMixture, Workspace, coefficients
from logo.mixture_ref import mixture_ref
from tests.test_mixture_ops import (
    CASES,
    D_IN,
    N,
    _gathered_rows,
    _net_and_mixture,
    _selection,
    compact_and_wide,
    make_linear,
    make_stack,
)

needs_kernel = pytest.mark.skipif(not library_decode.available(), reason="the library-decode kernel cannot be built "
                                  "here (no C++ compiler or ninja)")

MORE_CASES = {
    "sixteen_rows_random": None,  # 16 rows x 4 of 6 adapters, random weights: many rows per adapter
}


def _random_rows(rows: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(rows)])
    return indices, torch.rand(rows, k, generator=gen) + 0.1


def _case(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _random_rows(16, 4, 7) if case == "sixteen_rows_random" else _selection(case)


def test_pair_index_sorts_the_used_slots_by_adapter():
    indices = torch.tensor([[3, 1, 3], [0, 3, 2]])
    coeff = torch.tensor([[0.5, 0.0, 0.25], [1.0, 2.0, 3.0]])
    pairs = library_decode.PairIndex.build(indices, coeff)
    assert pairs.group_adapter.tolist() == [0, 2, 3]
    assert pairs.group_ptr.tolist() == [0, 1, 2, 5]  # adapter 3: three pairs (twice in row 0, once in row 1)
    assert pairs.pair_row.tolist() == [1, 1, 0, 0, 1]
    assert pairs.pair_coeff.tolist() == [1.0, 3.0, 0.5, 0.25, 2.0]
    assert pairs.row_ptr.tolist() == [0, 2, 5]  # the 0-coefficient slot is left out
    assert pairs.row_pair.tolist() == [2, 3, 0, 4, 1]  # row 0: slots 0, 2; row 1: slots 0, 1, 2 (as pairs)


def test_modules_with_the_same_used_slots_share_one_sorted_index():
    indices = torch.tensor([[3, 1, 3], [0, 3, 2]])
    coeff = torch.tensor([[0.5, 0.0, 0.25], [1.0, 2.0, 3.0]])
    shared: dict = {}
    first = library_decode.PairIndex.build(indices, coeff, shared)
    scaled = library_decode.PairIndex.build(indices, coeff * 4, shared)  # another module, another scaling
    assert scaled.group_adapter is first.group_adapter and scaled.row_pair is first.row_pair
    assert scaled.pair_coeff.tolist() == [4 * c for c in first.pair_coeff.tolist()]
    absent = coeff.clone()
    absent[1, 2] = 0.0  # adapter 2 lacks this module: other used slots, its own index
    for got, want in ((scaled, coeff * 4), (library_decode.PairIndex.build(indices, absent, shared), absent)):
        fresh = library_decode.PairIndex.build(indices, want)
        assert all(torch.equal(getattr(got, f), getattr(fresh, f)) for f in fresh.__dataclass_fields__)
    assert len(shared) == 2


@needs_kernel
@pytest.mark.parametrize("case", [*CASES, *MORE_CASES])
def test_kernel_equals_its_twin_and_the_formula(case):
    """Shared, disjoint and overlapping rows, k=1, k=N, an adapter twice in a row, unused slots, a base row, an
    adapter that lacks the module (scaling 0) and mixed ranks (zero-padded): kernel = twin = formula."""
    stack, linear = make_stack(), make_linear()
    indices, weights = _case(case)
    x = torch.randn(indices.shape[0], D_IN, generator=torch.Generator().manual_seed(8))
    coeff = coefficients(stack, indices, weights)
    pairs = library_decode.PairIndex.build(indices, coeff)
    with torch.no_grad():
        base = linear(x)
        got = library_decode.add_to(x, stack.A, stack.Bt, pairs, base.clone())
        twin = base + library_decode.reference(x, stack.A, stack.Bt, pairs)
        want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling, indices, weights)
    torch.testing.assert_close(twin, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if case != "repeat_unused_and_base_row":  # (its middle row is the base model)
        assert (want - base).abs().max() > 0.1, "the mixture must visibly change the output for this test to bite"


@needs_kernel
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [*CASES, *MORE_CASES])
def test_the_kernel_reads_compact_factors_to_the_same_bits(stored, case):
    """bf16/fp16 stacks (widened as read) against the same values held in fp32: equal bit for bit; the twin agrees."""
    compact, wide = compact_and_wide(stored)
    indices, weights = _case(case)
    x = torch.randn(indices.shape[0], D_IN, generator=torch.Generator().manual_seed(13))
    pairs = library_decode.PairIndex.build(indices, coefficients(wide, indices, weights))
    got, want = (library_decode.add_to(x, s.A, s.Bt, pairs, torch.zeros(pairs.rows, s.Bt.shape[2]))
                 for s in (compact, wide))
    assert torch.equal(got, want)
    torch.testing.assert_close(got, library_decode.reference(x, compact.A, compact.Bt, pairs), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch_or_the_threads():
    """Each pair lands in its own slot and a row adds its slots in order: bit-identical alone, in any batch, with
    any number of threads."""
    stack = make_stack()
    indices, weights = _random_rows(16, 4, 9)
    coeff = coefficients(stack, indices, weights)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(10))

    def run(rows: slice | list[int]) -> torch.Tensor:
        pairs = library_decode.PairIndex.build(indices[rows], coeff[rows])
        return library_decode.add_to(x[rows], stack.A, stack.Bt, pairs, torch.zeros(pairs.rows, stack.Bt.shape[2]))

    whole = run(slice(None))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run(slice(None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, one_thread)
    assert torch.equal(run([5]), whole[5:6])
    assert torch.equal(run([12, 5, 0]), whole[[12, 5, 0]])


@needs_kernel
def test_auto_takes_the_kernel_for_decode_and_torch_for_the_rest():
    stack = make_stack()
    indices, weights = _selection("overlapping_rows")
    mix = ModuleMixture(stack, indices, coefficients(stack, indices, weights), "auto", Workspace(), "m")
    assert mix.choose(1) == "library"  # decoding several rows
    assert mix.choose(5) in ("rows", "union")  # a prefill
    shared = ModuleMixture(stack, indices[:1], coefficients(stack, indices[:1], weights[:1]))
    assert shared.choose(1) == "union"  # one shared row: the union, which merging builds on


@needs_kernel
@pytest.mark.parametrize("shape", ["repeated_rows", "autograd", "five_tokens"])
def test_calls_the_kernel_does_not_cover_take_the_torch_formulation(monkeypatch, shape):
    """Rows repeated for several return sequences, autograd, more than one token: forced ``library`` still gives the
    formula (on a torch formulation)."""
    stack, linear = make_stack(), make_linear()
    indices, weights = _selection("disjoint_rows")
    rows = {"repeated_rows": 6, "autograd": 3, "five_tokens": 3}[shape]
    x = torch.randn(rows, 5 if shape == "five_tokens" else 1, D_IN, generator=torch.Generator().manual_seed(11),
                    requires_grad=shape == "autograd")
    mix = ModuleMixture(stack, indices, coefficients(stack, indices, weights), "library", Workspace(), "m")
    kernel_calls = []
    monkeypatch.setattr(library_decode, "add_to", lambda *args: kernel_calls.append(args))
    got = mix.add_to(x, linear(x))
    repeat = rows // indices.shape[0]
    want = mixture_ref(x, linear.weight, linear.bias, stack.A, stack.B, stack.scaling,
                       indices.repeat_interleave(repeat, 0), weights.repeat_interleave(repeat, 0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert kernel_calls == [], "the kernel did not run"


@needs_kernel
def test_rows_decoded_by_the_kernel_gather_only_a_newcomers_factors_for_its_prefill(monkeypatch):
    """A server's batch under the kernel: decode steps gather nothing, rows that leave move nothing, and a newcomer's
    prefill gathers its own rows only; every output equals the formula."""
    net, stack, mixture = _net_and_mixture()
    gen = torch.Generator().manual_seed(12)
    indices, weights = _random_rows(8, 2, 13)
    counts = _gathered_rows(monkeypatch, stack)
    copies: list[int] = []
    real_copy = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, *a: copies.append(1) or real_copy(self, *a))

    def check(x, rows):
        with torch.no_grad():
            got = net(x)
        with mixture.suspended():
            want = mixture_ref(x, net.lin.weight, net.lin.bias, stack.A, stack.B, stack.scaling, indices[rows],
                               weights[rows])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    mixture.set(indices[:4], weights[:4])
    check(torch.randn(4, 5, D_IN, generator=gen), [0, 1, 2, 3])  # the first rows' prefill: their factors gathered
    assert counts == [8]
    check(torch.randn(4, 1, D_IN, generator=gen), [0, 1, 2, 3])  # a decode step: the kernel, nothing gathered
    assert counts == [8]

    mixture.keep_rows(torch.tensor([0, 3, 2]))  # row 1 finished: row 3 takes its place
    check(torch.randn(3, 1, D_IN, generator=gen), [0, 3, 2])
    assert counts == [8] and copies == [], "nothing is gathered or moved when a row leaves"

    mixture.add_rows(indices[4:6], weights[4:6])
    with mixture.rows_from(3):
        check(torch.randn(2, 5, D_IN, generator=gen), [4, 5])  # the newcomers' prefill
    assert sum(counts) - 8 <= 4, f"only the 2 newcomers' adapters (2 each) were gathered, got {counts}"
    check(torch.randn(5, 1, D_IN, generator=gen), [0, 3, 2, 4, 5])
    mixture.remove()


def test_switched_off_the_kernel_is_unavailable_and_auto_decodes_with_torch(monkeypatch):
    monkeypatch.setenv(library_decode.SWITCH, "0")
    assert not library_decode.available()
    with pytest.raises(RuntimeError, match="LOGO_LIBRARY_DECODE=0"):
        library_decode.load()
    stack = make_stack()
    indices, weights = _selection("overlapping_rows")
    assert ModuleMixture(stack, indices, coefficients(stack, indices, weights)).choose(1) in ("rows", "union")


@needs_kernel
@pytest.mark.parametrize(("rank", "d_in", "d_out"), [(5, 40, 72), (16, 64, 128), (1, 7, 3)])
def test_kernel_blocks_and_tails_equal_the_twin(rank, d_in, d_out):
    """Shapes that run the kernel's full blocks (128 output columns at a time) and its tails."""
    gen = torch.Generator().manual_seed(14)
    A, Bt = torch.randn(9, rank, d_in, generator=gen), torch.randn(9, rank, d_out, generator=gen)
    indices = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(5)])
    pairs = library_decode.PairIndex.build(indices, torch.rand(5, 3, generator=gen) + 0.1)
    x = torch.randn(5, d_in, generator=gen)
    got = library_decode.add_to(x, A, Bt, pairs, torch.zeros(5, d_out))
    torch.testing.assert_close(got, library_decode.reference(x, A, Bt, pairs), atol=1e-4, rtol=1e-5)


def test_status_says_what_decoding_will_use(monkeypatch):
    assert library_decode.status("cuda", torch.float32) == "library-decode kernel: not used (it serves fp32 on CPU)"
    assert library_decode.status("cpu", torch.bfloat16) == "library-decode kernel: not used (it serves fp32 on CPU)"
    if library_decode.available():
        assert library_decode.status("cpu", torch.float32) == "library-decode kernel: on"
    monkeypatch.setenv(library_decode.SWITCH, "0")
    assert library_decode.status("cpu", torch.float32) == "the library-decode kernel is off (LOGO_LIBRARY_DECODE=0)"


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    assert not library_decode.clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.write_text("")
    now = lock.stat().st_mtime
    assert not library_decode.clear_stale_lock(tmp_path, now=now + 30) and lock.exists()  # a build under way
    assert library_decode.clear_stale_lock(tmp_path, now=now + library_decode.STALE_LOCK_S + 1)
    assert not lock.exists()


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the portable build differs on x86 only")
def test_the_portable_build_gives_the_same_bits():
    """The kernel built without AVX-512 (its plain loops, as on CPUs without it) against the build in use: the same
    bits for fp32, bf16 and fp16 factors, full blocks and tails, adapters shared by several rows (taken two at a
    time) and used by one."""
    portable = library_decode.build(portable=True)
    gen = torch.Generator().manual_seed(15)
    for rank, d_in, d_out in [(16, 64, 200), (5, 40, 72)]:
        A, Bt = torch.randn(9, rank, d_in, generator=gen), torch.randn(9, rank, d_out, generator=gen)
        indices = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(7)])
        pairs = library_decode.PairIndex.build(indices, torch.rand(7, 4, generator=gen) + 0.1)
        x = torch.randn(7, d_in, generator=gen)
        for stored in (torch.float32, torch.bfloat16, torch.float16):
            a, bt = A.to(stored), Bt.to(stored)
            want = library_decode.add_to(x, a, bt, pairs, torch.zeros(7, d_out))
            got = library_decode.add_to(x, a, bt, pairs, torch.zeros(7, d_out), kernel=portable)
            assert torch.equal(got, want), (rank, d_in, d_out, stored)
