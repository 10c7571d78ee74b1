"""One target module's share of a batch of per-row LoRA mixtures: two formulations chosen by cost, and merging.

Every row ``b`` adds ``sum_j c_bj B_{i_bj} A_{i_bj} x`` with ``c = weight * scaling`` (``logo.mixture_ref``
writes it out). Both formulations gather factors straight from the library's stacks (``A [N, r, d_in]`` and
``Bt [N, r, d_out]``) with one contiguous ``index_select`` each, into buffers that are reused from batch to
batch (a fresh gigabyte-sized allocation per batch costs more in page faults than the copy itself), and
apply the coefficients to the rank-space activations instead of to copies of ``B``:

- ``rows``: each row's own k adapters, ``a [B, k*r, d_in]``, ``bt [B, k*r, d_out]``;
  ``y += ((x a^T) * c_row) bt`` with batched matmuls. Work and factor reads grow with ``B * k``. With one token
  per row (decoding) ``x a^T`` is computed as ``a x^T``: the same numbers, but the CPU kernel then streams ``a``
  row by row (2.7x faster over the 60 modules of the smollm2-135m shape at batch 16: ``BENCHMARKS.md``).
- ``union``: the union U of the batch's adapters, gathered once, ``a [U*r, d_in]``, ``bt [U*r, d_out]``, and a
  coefficient matrix ``C [B, U*r]`` (0 where a row does not use an adapter); ``y += ((x a^T) * C) bt`` with
  2-D GEMMs over all ``B*T`` tokens. Factor reads grow with ``U`` only, work with ``B * U``. A shared mixture
  (one row for the whole batch) is the union with ``U = k``; its coefficient row broadcasts.

The ``rows`` factors keep their places when a batch changes a few rows at a time (a server): a mixture that
follows another one row for row is told how many leading rows are ``ready`` in the buffers and gathers only the
others; :meth:`ModuleMixture.move_rows` copies rows that change place (one per hole when the last rows fill the
holes); :meth:`ModuleMixture.tail` runs the newest rows alone on those same factors (their prefill).

Which is cheaper depends on the tokens per row ``T`` of each forward (prompt prefill or one decode token), so
it is chosen per call: in units of one factor value, ``rows = B*k*(READ_COST + T)`` and
``union = U*(READ_COST + B*T)``, where ``READ_COST`` is how many multiply-adds take as long as reading one
value from memory. Each formulation's factors are gathered the first time it is used for a mixture.

At one token per row (decoding) a third way reads the factors straight from the library: ``library``
(``logo.library_decode``, a small C++ kernel) reads each of the batch's U adapters once and does only the rows'
own work, with no gathered copy; in the units above it costs ``U*READ_COST + B*k``, never more than either
formulation, so ``auto`` takes it for every decode call it covers (several rows, fp32 on CPU, the kernel built).
Other calls (a prefill, rows repeated for several return sequences) take the cheaper torch formulation.

A fourth way applies to a shared mixture only: ``merged``, the weight ``W + sum_j c_j B_j A_j`` computed once
(one GEMM, ``U*r*d_in*d_out`` multiply-adds) and used instead of ``W``, so every later call costs what the base
layer costs. It pays only after enough tokens, and the number of tokens still to come is unknown, so the
choice is the ski-rental rule: keep applying the factors until their cost so far plus the next call's would
reach the cost of merging, then merge (never more than twice the better choice in hindsight). Per unit of
``U*r*(d_in+d_out)``, a union call costs ``READ_COST + B*T`` and merging ``MERGE_COST * d_in*d_out/(d_in+d_out)``.
The caller (``logo.mixture``) swaps the merged tensor in for the module's weight and back; the base weight itself
is never written. Merging rounds differently from adding the factors' product (``W x + B(A x)`` vs ``(W+BA) x``),
within the fp32 tolerances of the equivalence tests, which is why it is only done for fp32 weights.
"""

from __future__ import annotations

import math

import torch

from logo import library_decode
from logo.errors import LogoError
from logo.library import ModuleStack

READ_COST = 16
"""Multiply-adds per factor value read, at equal time: an estimate for a 2-core CPU (about 40 G multiply-adds/s
against 10 GB/s), not a fit. ``BENCHMARKS.md`` (rows vs union over the 60 modules of the smollm2-135m shape)
checks the choices it makes: union at a shared pool of 40 adapters, rows at 16 disjoint rows (U = 178)."""

MERGE_COST = 0.6
"""Cost units (as above) per multiply-add of merging, one large GEMM. Fitted to one measurement on the 2-core CPU of
``BENCHMARKS.md`` (smollm2-135m shape inside the model, k*r = 320, 60 modules: merging took 59 ms, the union
factors 7.4 ms per decode step, i.e. 8 steps, where these units give 2.55 G against 0.31 G per step)."""

FORMULATIONS = ("auto", "rows", "union", "library", "merged")


def persistent_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised flat buffer that later calls will write in place: allocated outside ``torch.inference_mode``
    even when called inside it, because an inference tensor can never be written outside inference mode again (one
    ``inference_mode`` call would break every later plain call), while a normal tensor may be written in both."""
    with torch.inference_mode(False):
        return torch.empty(numel, dtype=dtype, device=device)


class Workspace:
    """Reusable flat buffers, one per key, grown as needed and never shrunk (until :meth:`release`).

    The buffers are normal tensors even when taken inside ``torch.inference_mode`` (see :func:`persistent_empty`).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, key: tuple, shape: tuple[int, ...], like: torch.Tensor, keep: int = 0,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """A contiguous ``shape`` tensor on ``like``'s device, of ``dtype`` (default ``like``'s). Its first ``keep``
        values are those the buffer held (carried over when it has to grow); the rest are garbage."""
        numel = math.prod(shape)
        dtype = dtype or like.dtype
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != like.device:
            grown = persistent_empty(numel, dtype, like.device)
            if keep:
                if buf is None or buf.numel() < keep or buf.dtype != dtype or buf.device != like.device:
                    raise ValueError(f"workspace buffer {key!r} does not hold the {keep} values to keep")
                grown[:keep].copy_(buf[:keep])
            buf = self._buffers[key] = grown
        return buf[:numel].view(shape)

    def release(self) -> None:
        self._buffers = {}

    @property
    def buffers(self) -> dict[tuple, torch.Tensor]:
        """The buffers held, by key (a copy of the mapping: for diagnostics and tests)."""
        return dict(self._buffers)


WIDEN_SCRATCH = ("widen",)
"""The workspace key of the one buffer that every module's gather from a compact stack passes through."""


def gather(source: torch.Tensor, ids: torch.Tensor, workspace: Workspace | None, key: tuple,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """``source[ids]`` (``[n, r, d]``) as ``dtype`` (default ``source``'s), written into the workspace's buffer for
    ``key`` if given: one copy, or two where a compact stack's factors are widened (exact, see ``logo.library``)."""
    dtype = dtype or source.dtype
    if workspace is None:
        return source.index_select(0, ids).to(dtype)
    out = workspace.take(key, (ids.numel(), *source.shape[1:]), source, dtype=dtype)
    return gather_into(source, ids, out, workspace)


def gather_into(source: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """``out[:] = source[ids]``, widened to ``out``'s dtype through the workspace's scratch buffer if need be."""
    if out.dtype == source.dtype:
        return torch.index_select(source, 0, ids, out=out)
    stored = workspace.take(WIDEN_SCRATCH, tuple(out.shape), source)  # reused at once: one buffer serves all modules
    return out.copy_(torch.index_select(source, 0, ids, out=stored))


def coefficients(stack: ModuleStack, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``c = weight * scaling`` per row and slot, fp32 ``[B, k]`` (0 for unused slots and absent modules)."""
    return weights.float() * stack.scaling[indices]


class ModuleMixture:
    """Per-row mixtures ``(indices [B, k], coefficients [B, k])`` at one module; ``add_to`` is the hook's work.

    ``formulation``: ``auto`` (by cost, per call), ``rows``, ``union``, ``library`` or ``merged`` (forced: for tests
    and measurements; ``library`` for every call the kernel covers, the cheaper torch one for the others;
    ``merged`` needs one shared row). ``ready``: how many leading rows already have their factors in the
    workspace's row buffers for ``key`` (left there, at the same ``k``, by the mixture this one follows: see
    :meth:`move_rows` and ``Mixture.add_rows``); only the other rows are gathered. ``gathered``: the rows' factors
    ``(a, bt, c)`` as :meth:`row_factors` gives them, already gathered elsewhere (see :meth:`tail`). ``pair_cache``:
    a dict shared by the module mixtures of one mixture, so the library kernel's pair index is sorted once.
    """

    def __init__(self, stack: ModuleStack, indices: torch.Tensor, coeff: torch.Tensor, formulation: str = "auto",
                 workspace: Workspace | None = None, key: object = None, ready: int = 0,
                 gathered: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 pair_cache: dict | None = None) -> None:
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        self.stack, self.indices, self.coeff = stack, indices, coeff
        self.formulation, self.workspace, self.key = formulation, workspace, key
        self.rows, self.k = indices.shape
        if formulation == "merged" and self.rows != 1:
            raise ValueError(f"the merged formulation needs one mixture shared by every row, got {self.rows} rows")
        self.merged: torch.Tensor | None = None  # W + the mixture, once merged (see merge_before)
        self.spent = 0.0  # cost of the calls that applied the factors, per unit of U*r*(d_in+d_out)
        self.rank = stack.A.shape[1]
        self.ready = min(ready, self.rows) if workspace is not None else 0
        """Leading rows whose factors are in the workspace's row buffers (all of them once gathered)."""
        used = indices[coeff != 0]
        self.union_ids = torch.unique(used)
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = gathered
        self._union: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._pairs: library_decode.PairIndex | None = None  # the library formulation's index, built on first use
        self.pair_cache = pair_cache  # shared by the modules of one mixture (see library_decode.PairIndex.build)
        self._choices: dict[int, str] = {}  # tokens per row -> formulation

    # ---------------------------------------------------------------- choice
    def choose(self, tokens: int) -> str:
        """The cheapest formulation for a forward with ``tokens`` tokens per row (``rows``, ``union`` or
        ``library``; a ``library`` call the kernel does not cover falls back to :meth:`choose_torch`)."""
        if self.formulation == "library" or (self.formulation == "auto" and tokens == 1 and self.rows > 1
                                              and library_decode.serves(self.stack.A.device, self.stack.dtype)):
            return "library"
        return self.choose_torch(tokens)

    def choose_torch(self, tokens: int) -> str:
        """The cheaper of the two torch formulations (``rows`` or ``union``) for ``tokens`` tokens per row."""
        if self.formulation in ("rows", "union"):
            return self.formulation
        if self.rows == 1:
            return "union"  # one mixture for every row: U <= k, and the coefficient row broadcasts
        union = self.union_ids.numel() * (READ_COST + self.rows * tokens)
        rows = self.rows * self.k * (READ_COST + tokens)
        return "union" if union <= rows else "rows"

    @property
    def mergeable(self) -> bool:
        """Whether this mixture may ever be merged: one row shared by the batch, formulation not forced otherwise."""
        return self.rows == 1 and self.formulation not in ("rows", "union")

    def merge_before(self, tokens: int, weight: torch.Tensor) -> bool:
        """Whether the next call, over ``tokens`` tokens in all (rows x tokens per row), runs on merged weights.

        Called before each forward of the module (``weight``: the base weight ``[d_out, d_in]``, fp32, of a plain
        linear layer; the caller checks that). Merges, once, when the ski-rental rule says so (module docstring);
        otherwise counts the call as one that applies the factors. Never merges a per-row (unshared) mixture.
        """
        if self.merged is not None:
            return True
        if not self.mergeable:
            return False
        d_out, d_in = weight.shape
        call = READ_COST + tokens
        if self.formulation == "merged" or self.spent + call >= MERGE_COST * d_in * d_out / (d_in + d_out):
            self.merged = self.merged_weight(weight)
            return True
        self.spent += call
        return False

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + sum_j c_j B_j A_j`` (``[d_out, d_in]``) for a shared mixture, in the workspace if there is one."""
        a, bt, _ = self._union or self.union_factors()  # one row: the coefficients are folded into bt
        out = None
        if self.workspace is not None:
            out = self.workspace.take((self.key, "merged"), tuple(weight.shape), weight)
        return torch.addmm(weight, bt.T.to(weight.dtype), a.to(weight.dtype), out=out)

    # --------------------------------------------------------------- factors
    @torch.no_grad()
    def row_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``a [B, k*r, d_in]``, ``bt [B, k*r, d_out]`` and ``c [B, 1, k*r]`` (gathered once per mixture)."""
        if self._rows is None:
            flat = self.indices.reshape(-1)
            if self.workspace is None:
                a = gather(self.stack.A, flat, None, (), self.stack.dtype)
                bt = gather(self.stack.Bt, flat, None, (), self.stack.dtype)
            else:  # rows [ready:] only; the first ready rows' factors are already in place
                a, bt = self._row_buffer("A", self.rows), self._row_buffer("Bt", self.rows)
                start = self.ready * self.k
                if start < flat.numel():
                    gather_into(self.stack.A, flat[start:], a[start:], self.workspace)
                    gather_into(self.stack.Bt, flat[start:], bt[start:], self.workspace)
                self.ready = self.rows
            c = self.coeff.repeat_interleave(self.rank, 1)[:, None, :].to(bt.dtype)
            self._rows = (a.view(self.rows, self.k * self.rank, -1), bt.view(self.rows, self.k * self.rank, -1), c)
        return self._rows

    def _row_buffer(self, name: str, rows: int) -> torch.Tensor:
        """The workspace's ``[rows * k, r, d]`` buffer of factor ``name`` (``A`` or ``Bt``); the ready rows kept."""
        source = self.stack.A if name == "A" else self.stack.Bt
        keep = self.ready * self.k * source[0].numel()
        return self.workspace.take((self.key, "rows", name), (rows * self.k, *source.shape[1:]), source, keep,
                                   dtype=self.stack.dtype)

    @torch.no_grad()
    def move_rows(self, order: torch.Tensor) -> int:
        """Rearrange the gathered rows in the workspace for a mixture of rows ``order`` of this one (``order[p]`` is
        the row that goes to place ``p``; distinct), moving only rows that change place. Returns how many leading
        rows of the new mixture then hold their factors (its ``ready``). This mixture is stale afterwards.

        Rows decoded by the library kernel need no gathered factors: then nothing moves and none is ready (a
        newcomer's prefill later gathers its own rows alone, see :meth:`tail`)."""
        if self.choose(1) == "library":
            self.ready, self._rows = 0, None
            return 0
        position = torch.arange(order.numel(), device=order.device)
        valid = order < self.ready
        ready = int(valid.long().cumprod(0).sum()) if order.numel() else 0  # <= self.ready: order is distinct
        move = (order != position) & (position < ready)
        if bool(move.any()):
            destination, source = position[move], order[move]
            for name in ("A", "Bt"):
                rows = self._row_buffer(name, self.ready).view(self.ready, self.k * self.rank, -1)
                rows.index_copy_(0, destination, rows.index_select(0, source))  # sources read before any write
        self.ready, self._rows = 0, None
        return ready

    def tail(self, first: int) -> ModuleMixture:
        """Rows ``first:`` as a mixture of their own: for a forward over those rows alone, e.g. the prefill of rows
        just added. On this mixture's gathered row factors when the rows before ``first`` hold theirs (only the new
        rows are gathered); else (rows decoded by the library kernel never gather) on a gather of those rows alone."""
        if self._rows is None and self.ready < first:
            return ModuleMixture(self.stack, self.indices[first:], self.coeff[first:], self.formulation,
                                 self.workspace, (self.key, "tail"))
        a, bt, c = self.row_factors()
        return ModuleMixture(self.stack, self.indices[first:], self.coeff[first:], "rows",
                             gathered=(a[first:], bt[first:], c[first:]))

    @torch.no_grad()
    def union_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``a [U*r, d_in]``, ``bt [U*r, d_out]`` and ``C [B, 1, U*r]`` (gathered once per mixture).

        With one row (a shared mixture) its coefficients are folded into ``bt`` instead and ``C`` is None.
        """
        if self._union is None:
            ids = self.union_ids
            s, key = self.stack, (self.key, "union")
            a = gather(s.A, ids, self.workspace, (*key, "A"), s.dtype).view(-1, s.A.shape[2])
            bt = gather(s.Bt, ids, self.workspace, (*key, "Bt"), s.dtype).view(-1, s.Bt.shape[2])
            position = torch.searchsorted(ids, self.indices).clamp(max=max(ids.numel() - 1, 0))
            matrix = torch.zeros(self.rows, ids.numel(), dtype=torch.float32, device=self.coeff.device)
            if ids.numel():  # an adapter twice in one row: its coefficients add up; unused slots add 0
                matrix.scatter_add_(1, position, self.coeff.float())
            c = matrix.repeat_interleave(self.rank, 1)[:, None, :]
            if self.rows == 1:
                bt.mul_(c[0, 0, :, None])
                self._union = (a, bt, None)
            else:
                self._union = (a, bt, c.to(bt.dtype))
        return self._union

    # ------------------------------------------------------------------ apply
    def add_to(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + mixture(x)`` for ``x [B', T, d_in]`` or ``[B', d_in]``, in place when autograd allows it.

        ``B'`` may be a multiple of the mixture's rows (``generate`` repeats rows for ``num_return_sequences``).
        """
        if x.shape[0] % self.rows:
            raise LogoError(f"the mixture has {self.rows} rows but the batch has {x.shape[0]}; give one selection "
                            "per row")
        inplace = not (output.requires_grad or x.requires_grad) and output.is_contiguous()
        tokens = x.shape[1] if x.dim() == 3 else 1
        kind = self._choices.get(tokens)
        if kind is None:
            kind = self._choices[tokens] = self.choose(tokens)
        if kind == "library":
            if inplace and library_decode.applies(x, self.stack.A, self.stack.Bt, output, self.rows):
                if self._pairs is None:
                    self._pairs = library_decode.PairIndex.build(self.indices, self.coeff, self.pair_cache)
                return library_decode.add_to(x, self.stack.A, self.stack.Bt, self._pairs, output)
            kind = self.choose_torch(tokens)  # a call the kernel does not cover (see library_decode.applies)
        if kind == "union":
            return self._add_union(x, output, inplace)
        return self._add_rows(x, output, inplace)

    def _add_union(self, x: torch.Tensor, output: torch.Tensor, inplace: bool) -> torch.Tensor:
        a, bt, c = self._union or self.union_factors()
        low = x.reshape(-1, x.shape[-1]) @ a.T  # [B' * T, U*r]
        if c is not None:
            if x.shape[0] != c.shape[0]:
                c = c.repeat_interleave(x.shape[0] // c.shape[0], 0)
            low3 = low.view(x.shape[0], -1, low.shape[-1])
            low = (low3.mul_(c) if inplace else low3 * c).view(low.shape)
        if inplace:
            output.view(-1, output.shape[-1]).addmm_(low, bt)
            return output
        return torch.addmm(output.reshape(-1, output.shape[-1]), low, bt).view(output.shape)

    def _add_rows(self, x: torch.Tensor, output: torch.Tensor, inplace: bool) -> torch.Tensor:
        a, bt, c = self._rows or self.row_factors()
        if x.shape[0] != a.shape[0]:
            repeat = x.shape[0] // a.shape[0]
            a, bt, c = (t.repeat_interleave(repeat, 0) for t in (a, bt, c))
        x3 = x if x.dim() == 3 else x[:, None]
        out3 = output if output.dim() == 3 else output[:, None]
        if x3.shape[1] == 1:  # one token per row (decoding): a matrix-vector product per row, read row by row
            low = torch.bmm(a, x3.transpose(1, 2)).transpose(1, 2)
        else:
            low = torch.bmm(x3, a.transpose(1, 2))
        low = low.mul_(c) if inplace else low * c
        if inplace:
            out3.baddbmm_(low, bt)
            return output
        return torch.baddbmm(out3, low, bt).view(output.shape)
