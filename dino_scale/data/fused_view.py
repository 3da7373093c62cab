"""The fused C kernel for a view's per-pixel stage (fused_view.c), built at first use and loaded with ctypes.

``augment._render_views`` crops and resizes each view with torch, then runs colour jitter, grayscale, Gaussian blur,
the rounding to uint8 and solarize. In torch that is ~40 tensor ops per view, each a pass over the crop plus a
dispatch: with them the ten views of an image at 224 / 96 px (2 + 8 crops) take ~3.9 ms on one core, crops and
resizes included. The C kernel computes the same formulas in a few vectorised passes per view: the views take
~1.5 ms, and the data path (decode included) runs at 4.5-5x the official PIL pipeline's speed per core instead of
~2.6x (benchmarks/RESULTS.md). It agrees with the torch path to within 1 grey level (on ~1e-5 of the values: a
float32 mean and a BLAS blur sum in another order).

Why by hand: no library fuses these ops on a CPU. torch.compile fuses the hue (6x) but not the blur, and pays ~13 us
per call (2.5-2.7x in all, measured in benchmarks/augment_compile_probe.py); OpenCV has per-op kernels (hue 0.39 ms at
224 px against 0.04 ms here). Why ctypes and not ``torch.utils.cpp_extension``: the kernel takes raw pointers, so it
needs no torch headers, and builds in ~0.3 s (a file that only includes torch/extension.h took 19 s to compile here).

The build uses ``$CC`` (default ``cc``) with ``-march=native`` (the library is cached per CPU model and instruction
set), ``-ffp-contract=off`` and no fast-math, so every float32 operation is rounded as IEEE demands and the output is
the same on every x86 machine. ``-fno-trapping-math`` only declares that no floating-point exception is observed,
which lets gcc vectorise the hue's min / max / trunc (0.22 -> 0.04 ms per 224 px crop). The library is written
atomically to ``$DINO_SCALE_CACHE`` (default ``$XDG_CACHE_HOME/dino_scale``, else ``~/.cache/dino_scale``), under
``kernels/``, named by a hash of the source, the flags and the machine, so an edited source or another CPU builds its
own.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import torch

from dino_scale.config import ViewKernel
from dino_scale.errors import Unavailable
from dino_scale.io import atomic_write

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_view.c")
# data.view_kernel: "auto" = the C kernel where it builds, else the torch ops with a warning; "c" = the C kernel or an
# error before any work starts; "torch" = the torch ops (bit-identical to the batched device path on CPU).
KERNEL_CHOICES: tuple[str, ...] = get_args(ViewKernel)
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared")
# Tried in order: the host's vector units first; a compiler that refuses -march=native still builds portable code.
_ARCH_FLAGS: tuple[tuple[str, ...], ...] = (("-march=native",), ())
_COMPILE_TIMEOUT_S = 120
MAX_OPS = 4


def cache_root() -> Path:
    """``$DINO_SCALE_CACHE``, else ``$XDG_CACHE_HOME/dino_scale``, else ``~/.cache/dino_scale``."""
    if os.environ.get("DINO_SCALE_CACHE"):
        return Path(os.environ["DINO_SCALE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dino_scale"


def _machine_tag() -> str:
    """What a ``-march=native`` build depends on: the architecture, and on Linux the CPU model and its instruction
    set flags (so that a cache on a home folder shared by several hosts keeps one library per kind of CPU)."""
    tag = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features")):
                    tag.append(line.strip())
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        tag.append(platform.processor())
    return "\n".join(tag)


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def library_path(arch_flags: Sequence[str]) -> Path:
    """Where the library built with ``arch_flags`` for this source, compiler command and machine is cached."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_compiler()).encode(), " ".join((*_FLAGS, *arch_flags)).encode()):
        key.update(part)
        key.update(b"\0")
    key.update(_machine_tag().encode())
    return cache_root() / "kernels" / f"fused_view-{key.hexdigest()[:20]}.so"


def _compile(output: Path, arch_flags: Sequence[str]) -> None:
    command = [*_compiler(), *_FLAGS, *arch_flags, "-o", str(output), str(SOURCE), "-lm"]
    done: subprocess.CompletedProcess | Exception
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        done = error
    if isinstance(done, Exception):  # raised outside the except block: atomic_write would report an OSError in the
        raise Unavailable(f"cannot run the C compiler {command[0]!r} ({done}); set CC")  # chain as a failed write
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        raise Unavailable(f"the C compiler {shlex.join(_compiler())!r} failed on {SOURCE.name}: {first}")


class FusedViewKernel:
    """The loaded library: :meth:`render` runs one view's per-pixel stage in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._render = ctypes.CDLL(str(path)).dino_render_view
        self._render.argtypes = [
            ctypes.c_void_p,  # uint8 [3, size, size]
            ctypes.c_int,  # size
            ctypes.c_int,  # number of colour-jitter ops
            ctypes.POINTER(ctypes.c_int),  # op ids, in application order
            ctypes.POINTER(ctypes.c_float),  # their factors
            ctypes.c_int,  # grayscale
            ctypes.c_int,  # blur radius (0: no blur)
            ctypes.POINTER(ctypes.c_float),  # blur taps, centre first
            ctypes.c_int,  # solarize
        ]
        self._render.restype = ctypes.c_int

    def render(
        self,
        view: torch.Tensor,
        jitter: Sequence[tuple[int, float]],
        grayscale: bool,
        blur_taps: Sequence[float],
        solarize: bool,
    ) -> None:
        """Colour jitter ``(op id, factor)`` in order, grayscale, blur with the one-sided taps ``blur_taps`` (centre
        first; empty: no blur), rounding and solarize, in place on ``view``, a contiguous uint8 [3, S, S] CPU tensor."""
        size = view.shape[-1]
        if view.dtype != torch.uint8 or view.device.type != "cpu" or view.shape != (3, size, size):
            raise ValueError(f"expected a uint8 [3, S, S] CPU tensor, got {view.dtype} {tuple(view.shape)}")
        if not view.is_contiguous():
            raise ValueError("the view must be contiguous: the kernel writes 3 * S * S bytes from its first pixel")
        if len(jitter) > MAX_OPS or len(blur_taps) > size:
            raise ValueError(f"at most {MAX_OPS} colour ops and a blur radius below the crop size {size}")
        ops = (ctypes.c_int * MAX_OPS)(*(op for op, _ in jitter))
        factors = (ctypes.c_float * MAX_OPS)(*(factor for _, factor in jitter))
        taps = (ctypes.c_float * max(1, len(blur_taps)))(*blur_taps)
        radius = max(0, len(blur_taps) - 1)
        if self._render(view.data_ptr(), size, len(jitter), ops, factors, grayscale, radius, taps, solarize) != 0:
            raise MemoryError(f"the fused view kernel could not allocate its scratch for a {size} px crop")


@functools.cache
def _build() -> FusedViewKernel | Unavailable:
    """One attempt per process (a failure too: a missing compiler is not looked for again in every worker)."""
    reasons = []
    for arch_flags in _ARCH_FLAGS:
        path = library_path(arch_flags)
        try:
            if not path.is_file():
                atomic_write(path, lambda tmp, flags=arch_flags: _compile(tmp, flags))
                log.debug("built %s", path)
            return FusedViewKernel(path)
        except (Unavailable, OSError) as error:  # OSError: an unloadable library or an unwritable cache
            reasons.append(str(error))
    return Unavailable(f"the fused C view kernel is unavailable: {reasons[0]} (data.view_kernel=torch runs without it)")


def build_kernel() -> FusedViewKernel:
    """The kernel, built into the cache on first use in any process (a cached library is only loaded). Raises
    :class:`~dino_scale.errors.Unavailable` with a one-line reason when it cannot be built or loaded."""
    kernel = _build()
    if isinstance(kernel, Unavailable):
        raise Unavailable(str(kernel))
    return kernel


_warned = False


def resolve_kernel(choice: str) -> FusedViewKernel | None:
    """The kernel for ``data.view_kernel`` = ``choice``: None for "torch"; for "c" the kernel or
    :class:`~dino_scale.errors.Unavailable`; for "auto" the kernel, or None after one warning per process."""
    global _warned
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"view kernel must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "torch":
        return None
    if choice == "c":
        return build_kernel()
    try:
        return build_kernel()
    except Unavailable as error:
        if not _warned:
            log.warning("%s; rendering the views with torch ops (the same formulas, ~1.7x slower per core)", error)
            _warned = True
        return None
