"""Per-row weighted LoRA mixtures inside the model.

Every target linear layer computes ``W x + sum_i w_i * scaling_i * B_i A_i x`` where each row of the
batch has its own selection ``(indices, weights)``. The arithmetic of one module lives in
``logo.mixture_ops`` (per-row factors, the union of the batch's adapters, or at decode the library kernel, by cost
on every call; gathered from the stacked library into reused buffers); ``logo.mixture_ref`` is the formula
written out, the oracle the tests compare against. When every row shares one mixture it is kept once and
broadcast.

Hooks are attached only while a mixture is set, and only to modules that a selected adapter targets:
the base model (and the LoGo probe) run hook-free. A mixture shared by every row of an fp32 linear layer is merged
into a copy of its weight once the ski-rental rule of ``logo.mixture_ops`` says it pays (after a few decode
steps); that copy stands in for the module's weight parameter while the mixture is attached, and the base
parameter is put back on suspend and clear. No base weight is ever modified.

A running batch can also change a few rows at a time (``add_rows``, ``keep_rows``, ``rows_from``: the server's
scheduler) without every row's factors being gathered again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from logo.errors import LogoError
from logo.library import AdapterLibrary, ModuleStack
from logo.mixture_ops import ModuleMixture, Workspace, coefficients, gather


class Mixture:
    """The current batch's per-row LoRA mixture, added by forward hooks to the target modules."""

    def __init__(self, model: nn.Module, library: AdapterLibrary, formulation: str = "auto") -> None:
        self.library = library
        self.formulation = formulation  # auto | rows | union | library (see logo.mixture_ops)
        self.workspace = Workspace()  # gathered factors of the current mixture; reused by the next one
        self.factors: dict[str, ModuleMixture] = {}
        self._modules = {name: m for name, m in model.named_modules() if name in library.stacks}
        self._handles: dict[str, list[torch.utils.hooks.RemovableHandle]] = {}  # per module, while attached
        self._base_weights: dict[str, nn.Parameter] = {}  # modules whose weight is a merged copy right now
        self.indices: torch.Tensor | None = None  # the rows' selections [B, k], as set (None: no mixture)
        self.weights: torch.Tensor | None = None
        self._shared = False  # every row has the same mixture: it is kept once (one row) and broadcast

    @property
    def active(self) -> bool:
        return bool(self.factors)

    def clear(self) -> None:
        """Back to the base model (hook-free)."""
        self._detach()
        self.factors = {}
        self.indices = self.weights = None
        self._shared = False

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the plain base model inside the block; the mixture comes back afterwards."""
        self._detach()
        try:
            yield
        finally:
            self._attach()

    @torch.no_grad()
    def set(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Set per-row mixtures: ``indices [B, k]`` (long) and ``weights [B, k]``; weight 0 = unused slot.

        A row whose weights are all zero runs the base model.
        """
        _check_selection(indices, weights)
        self.clear()
        self.indices, self.weights = indices, weights
        if indices.numel() == 0 or not bool((weights != 0).any()):
            return
        self._shared = _shared(indices, weights)
        if self._shared:
            indices, weights = indices[:1], weights[:1]
        self._build(indices, weights, {}, lambda old: 0)

    # A server's batch changes a few rows at a time. Gathering every row's factors again on each change costs about
    # half a decode step at paper scale, so rows keep their place in the gathered buffers: rows that join are
    # gathered alone, rows that stay where they are are not touched, and rows moved into a hole are copied once.
    @torch.no_grad()
    def add_rows(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Append rows (``indices``, ``weights`` ``[n, k]``) after the current ones; only theirs are gathered."""
        _check_selection(indices, weights)
        if self.indices is None:
            self.set(indices, weights)
            return
        k = max(self.indices.shape[1], indices.shape[1])
        same_width = k == self.indices.shape[1]  # else every row is laid out again at the new width
        self._follow(*_concat(_padded(self.indices, self.weights, k), _padded(indices, weights, k)),
                     lambda old: old.ready if same_width else 0)

    @torch.no_grad()
    def keep_rows(self, order: torch.Tensor) -> None:
        """Keep rows ``order`` of the current mixture, in that order (distinct; ``order[p]`` goes to place ``p``).

        Only rows that change place are moved, so a caller that fills each hole with a row from the end of the batch
        moves one row per hole and gathers nothing.
        """
        if self.indices is None:
            raise LogoError("keep_mixture_rows needs a mixture: none is set")
        order = torch.as_tensor(order, dtype=torch.long, device=self.indices.device)
        rows = self.indices.shape[0]
        in_range = order.numel() == 0 or (int(order.min()) >= 0 and int(order.max()) < rows)
        if order.dim() != 1 or not in_range or order.unique().numel() != order.numel():
            raise LogoError(f"keep_mixture_rows needs distinct row numbers in [0, {rows}), got {order.tolist()}")
        self._follow(self.indices[order], self.weights[order], lambda old: old.move_rows(order.to(old.indices.device)))

    def _follow(self, indices: torch.Tensor, weights: torch.Tensor, ready: Callable[[ModuleMixture], int]) -> None:
        """Set the mixture ``(indices, weights)`` that follows the current one, row by row in place: ``ready(old)``
        tells how many leading rows keep the factors the old module mixture gathered. Where the old or the new
        mixture is kept once for every row (shared), or none was set up, it is set afresh."""
        if self._shared or not self.factors or _shared(indices, weights) or not bool((weights != 0).any()):
            self.set(indices, weights)
            return
        self._detach()
        self.indices, self.weights = indices, weights
        self._build(indices, weights, self.factors, ready)

    def _build(self, indices: torch.Tensor, weights: torch.Tensor, old: dict[str, ModuleMixture],
               ready: Callable[[ModuleMixture], int]) -> None:
        """One module mixture per module that a selected adapter touches, then the hooks; ``ready(old[name])``: how
        many leading rows keep the factors that module's previous mixture gathered."""
        self.factors = {}
        pair_cache: dict = {}  # the library kernel's pair index, sorted once for the modules that share it
        for name, stack in self.library.stacks.items():
            idx = indices.to(stack.A.device)
            coeff = coefficients(stack, idx, weights.to(stack.A.device))
            if bool((coeff != 0).any()):  # else no selected adapter touches the module
                kept = ready(old[name]) if name in old else 0
                self.factors[name] = ModuleMixture(stack, idx, coeff, self.formulation, self.workspace, name, kept,
                                                   pair_cache=pair_cache)
        self._attach()

    @contextmanager
    def rows_from(self, first: int) -> Iterator[None]:
        """Run the block on rows ``first:`` of the mixture alone (a batch of just those rows), e.g. to prefill rows
        that :meth:`add_rows` just appended; the whole mixture comes back afterwards."""
        if self.indices is not None and not 0 <= first <= self.indices.shape[0]:
            raise LogoError(f"mixture_rows_from({first}) is outside the mixture's {self.indices.shape[0]} rows")
        if first == 0 or self._shared or not self.factors:  # the same mixture for any rows, or none
            yield
            return
        whole = self.factors
        self._detach()
        # a module none of these rows uses stays off, as in a mixture set for them alone (its tail would be empty)
        self.factors = {name: factors.tail(first) for name, factors in whole.items()
                        if bool((factors.coeff[first:] != 0).any())}
        self._attach()
        try:
            yield
        finally:
            self._detach()
            self.factors = whole
            self._attach()

    def remove(self) -> None:
        """Detach from the model and free the gathered factors."""
        self.clear()
        self.workspace.release()

    @property
    def merged_modules(self) -> list[str]:
        """The modules that run on a merged weight right now."""
        return list(self._base_weights)

    @property
    def hooked_modules(self) -> list[str]:
        """The modules that carry this mixture's hooks right now (a merged module carries none)."""
        return list(self._handles)

    def _attach(self) -> None:
        self._detach()
        for name, factors in self.factors.items():
            if factors.merged is not None:  # the merged weight carries the mixture: no hook at all
                self._swap_in(name, factors.merged)
                continue
            module = self._modules[name]
            handles = [module.register_forward_hook(_hook(factors))]
            if factors.mergeable and type(module) is nn.Linear and module.weight.dtype == torch.float32:
                handles.append(module.register_forward_pre_hook(self._pre_hook(name, factors)))
            self._handles[name] = handles  # per-row mixtures, bf16 and other layers never merge: no pre-hook

    def _detach(self) -> None:
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self._handles = {}
        for name, weight in self._base_weights.items():
            self._modules[name].weight = weight
        self._base_weights = {}

    def _pre_hook(self, name: str, factors: ModuleMixture):
        module = self._modules[name]

        def maybe_merge(_module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled():
                return
            x = args[0]
            if factors.merge_before(x.numel() // x.shape[-1], module.weight):
                self._swap_in(name, factors.merged)

        return maybe_merge

    def _swap_in(self, name: str, merged: torch.Tensor) -> None:
        """Run the module on its merged weight from now on, and drop its hooks (the forward hook, removed by the
        pre-hook that merged, is not called for that very forward either: torch reads its hooks after forward)."""
        module = self._modules[name]
        self._base_weights[name] = module.weight
        module.weight = nn.Parameter(merged, requires_grad=False)
        for handle in self._handles.pop(name, ()):
            handle.remove()


def _check_selection(indices: torch.Tensor, weights: torch.Tensor) -> None:
    if indices.dim() != 2 or indices.shape != weights.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be [B, k]")


def _shared(indices: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether every row has the same selection (then it is kept once, as one row, and broadcast)."""
    return indices.shape[0] == 1 or (bool((indices == indices[:1]).all()) and bool((weights == weights[:1]).all()))


def _padded(indices: torch.Tensor, weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selections widened to ``k`` slots (unused slots: adapter 0 at weight 0)."""
    extra = k - indices.shape[1]
    if extra == 0:
        return indices, weights
    return nn.functional.pad(indices, (0, extra)), nn.functional.pad(weights, (0, extra))


def _concat(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1].to(parts[0][1].dtype) for p in parts]))


def _hook(factors: ModuleMixture):
    def add_mixture(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return factors.add_to(args[0], output)  # never called once merged: the merge removes this hook

    return add_mixture


class _Switch:
    """Shared on/off state of a :class:`StaticMixture`'s hooks (a plain bool, so compiled graphs guard on it)."""

    def __init__(self) -> None:
        self.on = False


class _StaticSlot:
    """One module's persistent hook: adds ``(x A_row^T) B_row^T`` from fixed buffers while the switch is on."""

    def __init__(self, switch: _Switch) -> None:
        self.switch = switch
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.a: torch.Tensor | None = None  # [B, width, d_in]
        self.b: torch.Tensor | None = None  # [B, width, d_out], coefficients folded in

    def __call__(self, _module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.switch.on:
            return output
        x = args[0]
        if x.shape[0] != self.a.shape[0]:
            raise LogoError(f"the mixture has {self.a.shape[0]} rows but the batch has {x.shape[0]}; give one "
                            "selection per row")
        return torch.baddbmm(output, torch.bmm(x, self.a.transpose(1, 2)), self.b)


def _static_buffers(stack: ModuleStack, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's zeroed ``a [rows, width, d_in]`` and ``b [rows, width, d_out]``, marked as static addresses.

    Allocated outside ``torch.inference_mode`` even inside it: every later :meth:`StaticMixture.set` writes them in
    place, which an inference tensor forbids outside inference mode (a normal tensor may be written in both)."""
    with torch.inference_mode(False):
        a = stack.A.new_zeros(rows, width, stack.A.shape[2], dtype=stack.dtype)
        b = stack.Bt.new_zeros(rows, width, stack.Bt.shape[2], dtype=stack.dtype)
    torch._dynamo.mark_static_address(a)
    torch._dynamo.mark_static_address(b)
    return a, b


class StaticMixture:
    """Per-row mixtures for the static-cache / compiled decoder (``logo.static_decode``).

    Same arithmetic as :class:`Mixture`, but shaped for ``torch.compile`` and CUDA graphs: every target
    module keeps one hook for its whole life, and the gathered factors are copied into fixed buffers
    (one pair per batch size and width, marked as static addresses) instead of new tensors. A mixture
    change is then a copy, never a new graph. Each row always carries ``width = k_cap * r_max``
    columns: unused slots and base rows hold zeros. The hooks are switched off (not removed) for the
    base model and the probe, so the eager base model stays exact.
    """

    def __init__(self, model: nn.Module, library: AdapterLibrary, k_cap: int = 1) -> None:
        self.library = library
        self.switch = _Switch()
        self.k_cap = k_cap  # grows if a mixture of more adapters is set (then new buffers, a new graph)
        self.slots: dict[str, _StaticSlot] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in model.named_modules():
            if name in library.stacks:
                slot = _StaticSlot(self.switch)
                self.slots[name] = slot
                self._handles.append(module.register_forward_hook(slot))

    @property
    def active(self) -> bool:
        return self.switch.on

    def clear(self) -> None:
        """Back to the base model (the hooks stay, switched off)."""
        self.switch.on = False

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the plain base model inside the block; the mixture comes back afterwards."""
        was_on = self.switch.on
        self.switch.on = False
        try:
            yield
        finally:
            self.switch.on = was_on

    @torch.no_grad()
    def set(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Set per-row mixtures: ``indices [B, k]`` (long) and ``weights [B, k]``; weight 0 = unused slot."""
        _check_selection(indices, weights)
        self.switch.on = False
        rows, k = indices.shape
        if k == 0 or not bool((weights != 0).any()):
            return
        self.k_cap = max(self.k_cap, k)
        flat = indices.reshape(-1)
        for name, stack in self.library.stacks.items():
            slot = self.slots[name]
            r = stack.A.shape[1]
            width = self.k_cap * r
            key = (rows, width)
            if key not in slot.buffers:
                slot.buffers[key] = _static_buffers(stack, rows, width)
            a, b = slot.buffers[key]
            idx = flat.to(stack.A.device)
            coeff = coefficients(stack, idx.view(rows, k), weights.to(stack.A.device))
            used = k * r if bool((coeff != 0).any()) else 0
            if used:
                a[:, :used].copy_(gather(stack.A, idx, None, ()).view(rows, used, -1))
                bt = gather(stack.Bt, idx, None, ()).view(rows, used, -1)
                b[:, :used].copy_(bt.float() * coeff.repeat_interleave(r, 1)[:, :, None])
            a[:, used:].zero_()  # unused slots (and modules no selected adapter touches) add nothing
            b[:, used:].zero_()
            slot.a, slot.b = a, b
        self.switch.on = True

    def remove(self) -> None:
        """Detach the hooks from the model for good."""
        self.switch.on = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
