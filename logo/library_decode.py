"""One decode token per row under per-row mixtures, read straight from the stacked library: a small C++ kernel.

At one token per row a mixture costs what reading its factors costs. The ``rows`` formulation of
``logo.mixture_ops`` reads each row's own copy of its k adapters (``B * k`` adapters a step); the ``union`` reads
the batch's U distinct adapters once but multiplies every row by all of them. This kernel reads each of the U
adapters once, straight from the library's stacks ``A [N, r, d_in]`` and ``Bt [N, r, d_out]`` (no gathered copy
at all), and does only the rows' own work: the pairs ``(row, adapter, coefficient)`` of the batch are sorted by
adapter (:class:`PairIndex`), so rows that share an adapter find it in cache. At paper scale (16 rows x 20 of 260
rank-16 adapters, smollm2-135m shape) that is about 0.7 GB a step instead of 1.18 GB, and 0.35 GB from a compact
library (bf16 files: ``logo.library``), whose values the kernel widens to fp32 as it reads them. Its sums run in
fixed lanes and a fixed order, so a compact library gives the same bits as a widened one.

Each pair's contribution ``c B_u (A_u x_b)`` lands in its own slot, and a row adds its contributions in slot order,
so a row's result does not depend on the other rows or on the number of threads. An adapter's pairs are taken two
at a time (each value of its factors loaded and widened once for both), and the next adapter's factors are
prefetched while one is read; on x86 CPUs with AVX-512 the inner loops are written with its intrinsics, elsewhere
they are plain loops the compiler vectorises (:func:`build` ``portable=True`` builds those here): the same fused
multiply-adds in the same order, so the same bits. :func:`reference` is the same computation in plain torch (fp32),
the twin the tests hold the kernel to (and ``logo.mixture_ref`` both).

The kernel is compiled on first use with torch's extension builder (a C++ compiler and ``ninja``; about 30 s
once per machine, announced on stderr, then cached under logo's cache directory, ``kernels/``). Where it cannot
be built, or where ``LOGO_LIBRARY_DECODE=0``, :func:`available` is False, the reason is logged once, and the
mixture uses its torch formulations; forcing this formulation then raises with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from subprocess import SubprocessError
from types import ModuleType

import torch

from logo.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "library_decode.cpp"
SWITCH = "LOGO_LIBRARY_DECODE"
"""Environment variable: ``0`` keeps the kernel off (the torch formulations are used)."""

_kernel: ModuleType | None = None
_failure: str | None = None


@dataclass(frozen=True)
class PairIndex:
    """A batch's mixture as pairs ``(row, adapter, coefficient)``, sorted by adapter (slots with coefficient 0 left
    out): ``group_adapter [U]`` and ``group_ptr [U+1]`` delimit each adapter's pairs; ``pair_row [P]``,
    ``pair_coeff [P]`` (fp32); ``row_ptr [B+1]`` and ``row_pair [P]`` list each row's pairs in slot order;
    ``pair_slot [P]``: each pair's place in the flattened ``[B, k]`` selection."""

    group_ptr: torch.Tensor
    group_adapter: torch.Tensor
    pair_row: torch.Tensor
    pair_coeff: torch.Tensor
    row_ptr: torch.Tensor
    row_pair: torch.Tensor
    pair_slot: torch.Tensor

    @property
    def rows(self) -> int:
        return self.row_ptr.numel() - 1

    @classmethod
    def build(cls, indices: torch.Tensor, coeff: torch.Tensor, shared: dict | None = None) -> PairIndex:
        """From ``indices [B, k]`` (adapter numbers) and ``coeff [B, k]`` (``weight * scaling``; 0 = unused).

        ``shared``: a dict kept by the caller across the modules of one mixture (same ``indices``); modules whose
        used slots are the same share the sorted structure and only take their own coefficients."""
        rows, k = indices.shape
        used = (coeff != 0).reshape(-1)
        key = bytes(used.cpu().numpy()) if shared is not None else None
        if key is not None and key in shared:
            return replace(shared[key], pair_coeff=coeff.reshape(-1)[shared[key].pair_slot].float().contiguous())
        slot = used.nonzero().squeeze(1)
        adapter = indices.reshape(-1)[slot].long()
        order = torch.argsort(adapter, stable=True)  # pair p is the order[p]-th used slot, in row-major order
        group_adapter, counts = torch.unique_consecutive(adapter[order], return_counts=True)
        zero = torch.zeros(1, dtype=torch.long, device=indices.device)
        place = torch.empty_like(order)
        place[order] = torch.arange(order.numel(), device=indices.device)  # used slot -> its pair
        per_row = used.view(rows, k).sum(1)
        pairs = cls(group_ptr=torch.cat([zero, counts.cumsum(0)]).contiguous(),
                    group_adapter=group_adapter.contiguous(), pair_row=(slot[order] // k).contiguous(),
                    pair_coeff=coeff.reshape(-1)[slot[order]].float().contiguous(),
                    row_ptr=torch.cat([zero, per_row.cumsum(0)]).contiguous(), row_pair=place.contiguous(),
                    pair_slot=slot[order].contiguous())
        if key is not None:
            shared[key] = pairs
        return pairs


def reference(x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, pairs: PairIndex) -> torch.Tensor:
    """The kernel's result in plain torch, fp32: ``sum`` over each row's pairs of ``c B_u A_u x_b``, ``[B, d_out]``."""
    adapter = pairs.group_adapter.repeat_interleave(pairs.group_ptr.diff())  # per pair
    x = x.float()
    low = torch.einsum("prd,pd->pr", A[adapter].float(), x[pairs.pair_row]) * pairs.pair_coeff[:, None]
    part = torch.einsum("pr,pro->po", low, Bt[adapter].float())
    return torch.zeros(pairs.rows, Bt.shape[2], dtype=torch.float32, device=x.device).index_add_(
        0, pairs.pair_row, part)


STORED = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the kernel reads factors in (widened to fp32 as it reads them: a compact library, ``logo.library``)."""


def applies(x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, output: torch.Tensor, rows: int) -> bool:
    """Whether the kernel can add this call's mixture: one token per row for exactly the mixture's rows, fp32 CPU
    activations, factors stored in one of :data:`STORED`, no autograd, an output it may write in place."""
    tokens = x.shape[1] if x.dim() == 3 else 1
    return (tokens == 1 and x.shape[0] == rows and x.device.type == "cpu"
            and x.dtype == torch.float32 and output.dtype == torch.float32
            and A.dtype in STORED and A.dtype == Bt.dtype
            and not (x.requires_grad or output.requires_grad) and output.is_contiguous()
            and A.is_contiguous() and Bt.is_contiguous())


def add_to(x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, pairs: PairIndex, output: torch.Tensor,
           kernel: ModuleType | None = None) -> torch.Tensor:
    """``output += mixture(x)`` in place, for a call :func:`applies` accepts; raises where the kernel is unavailable.
    Once loaded it stays in use for mixtures that chose it (the switch applies to the next choice). ``kernel``: another
    build to run instead (:func:`build`, e.g. ``portable=True``)."""
    kernel = kernel or (_kernel if _kernel is not None else load())
    y = output.view(pairs.rows, Bt.shape[2])
    kernel.library_decode(x.reshape(pairs.rows, A.shape[2]).contiguous(), A, Bt, pairs.group_ptr,
                          pairs.group_adapter, pairs.pair_row, pairs.pair_coeff, pairs.row_ptr, pairs.row_pair, y)
    return output


def _kind_served(device: torch.device | str, dtype: torch.dtype) -> bool:
    """The mixtures the kernel is for: computed in fp32 (factors stored in any of :data:`STORED`), on CPU."""
    return torch.device(device).type == "cpu" and dtype == torch.float32


def serves(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether decoding mixtures computed in ``dtype`` on ``device`` goes through the kernel: fp32 on CPU, once it is
    built."""
    return _kind_served(device, dtype) and available()


def status(device: torch.device | str, dtype: torch.dtype) -> str:
    """One line on whether decoding on ``device`` in ``dtype`` uses the kernel, building it now if it will (so a
    server builds it before its first request, not during it)."""
    if not _kind_served(device, dtype):
        return "library-decode kernel: not used (it serves fp32 on CPU)"
    try:
        load()
    except RuntimeError as error:
        return str(error)  # "the library-decode kernel is off (...)" or "... could not be built (...)"
    return "library-decode kernel: on"


def available() -> bool:
    """Whether the kernel is (or can now be) built and loaded; never raises."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def load() -> ModuleType:
    """The compiled kernel, built on first use; raises RuntimeError (with the reason) where it cannot be had."""
    global _kernel, _failure
    if os.environ.get(SWITCH, "1") == "0":
        raise RuntimeError(f"the library-decode kernel is off ({SWITCH}=0)")
    if _kernel is not None:
        return _kernel
    if _failure is not None:
        raise RuntimeError(_failure)
    try:
        _kernel = build()
    except (OSError, RuntimeError, ImportError, SubprocessError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _failure = (f"the library-decode kernel could not be built ({first}); decoding uses the torch formulations. "
                    f"It needs a C++ compiler and ninja (`pip install ninja`); set {SWITCH}=0 to skip the attempt")
        log.warning(_failure)
        raise RuntimeError(_failure) from error
    return _kernel


def build(portable: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernel for this CPU; raises where it cannot be built.

    ``portable``: build it without AVX-512 (``-mno-avx512f``), so that its plain loops run instead of the AVX-512
    intrinsics, as on CPUs without them: the tests hold both to the same bits. :func:`load` is the way in."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja was not found")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) was found")
    x86 = platform.machine() in ("x86_64", "AMD64")
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]  # the kernel writes each multiply-add as one itself
    flags += (["-march=native"] if x86 else []) + (["-mno-avx512f"] if portable and x86 else [])
    # built for this CPU (-march=native): one build per kind of CPU
    name = "logo_library_decode_" + _machine_tag() + ("_portable" if portable else "")
    directory = cache_dir() / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(directory)
    if not (directory / f"{name}.so").exists():
        print(f"logo: building the library-decode kernel for this CPU (once, about 30 s) in {directory}",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              build_directory=str(directory), verbose=False)


STALE_LOCK_S = 600
"""A build lock older than this (seconds) was left by a build that died; a build takes about 30 s."""


def clear_stale_lock(directory: Path, now: float | None = None) -> bool:
    """Remove torch's build lock in ``directory`` if a build that was killed left it behind (torch's builder would
    otherwise wait for it forever); returns whether one was removed."""
    lock = directory / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False
    print(f"logo: removing a stale kernel build lock ({lock}, {age:.0f} s old)", file=sys.stderr, flush=True)
    lock.unlink(missing_ok=True)
    return True


def _put_ninja_on_path() -> None:
    """The ``ninja`` package's binary lives beside the interpreter's scripts, which a venv that was not activated
    leaves off ``PATH``; torch's builder looks for it there."""
    try:
        import ninja
    except ImportError:
        return
    directory = getattr(ninja, "BIN_DIR", None)
    if directory and directory not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")


def _machine_tag() -> str:
    """A short hash of the CPU model and its flags (x86 Linux), so a shared cache never runs another CPU's build."""
    text = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        text += "".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    return hashlib.sha256(text.encode()).hexdigest()[:10]

