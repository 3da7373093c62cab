"""Which torch device a command or a training process runs on."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch

from dino_scale.errors import InputError, Unavailable


def resolve_device(requested: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    With ``local_rank`` (a training process started by a launcher) CUDA means this process's GPU, ``cuda:local_rank``,
    which is also made the current device.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable(f"device {requested!r} was asked for, but torch sees no CUDA GPU here", argument="device")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N", argument="device") from None
    if device.type == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return device


# Per autocast dtype: oneDNN's check for native CPU kernels (as torch's inductor asks it), and what the CPU needs.
CPU_KERNELS = {
    "bfloat16": ("_is_mkldnn_bf16_supported", "AVX512-BF16 or AMX"),
    "float16": ("_is_mkldnn_fp16_supported", "AVX512-FP16 or AMX-FP16"),
}


def _native_cpu_kernels(dtype: str) -> bool:
    """Whether this CPU's oneDNN has native kernels for ``dtype`` (what CPU_KERNELS names)."""
    return bool(getattr(torch.ops.mkldnn, CPU_KERNELS[dtype][0])())


def autocast_is_emulated(device: torch.device, dtype: str | None) -> bool:
    """Whether autocast to ``dtype`` ("bfloat16", "float16"; None: no autocast) runs emulated on ``device``: a CPU
    without native kernels for it, where the low-precision matmuls are slower than fp32 ones. With them it pays: one
    thread of the AVX512-BF16 EPYC here ran ViT-S/16's forward and backward (96 px, batch 16) in 0.35 s in bf16
    autocast against 0.82 s in fp32 (benchmarks/RESULTS.md)."""
    return dtype is not None and device.type == "cpu" and not _native_cpu_kernels(dtype)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask under SLURM / taskset / containers, else all)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def set_threads(requested: int | None, workers: int = 0, processes: int = 1) -> int:
    """Set this process's intra-op threads (torch.set_num_threads) and return the number set.

    ``requested`` wins when given; then an OMP_NUM_THREADS in the environment (which torch has already applied: the
    user's explicit choice stays). Otherwise the cores are shared out so that nothing oversubscribes them: the
    ``processes`` training processes on this machine each get ``cores / processes`` cores, from which their
    ``workers`` DataLoader workers take one each (torch runs every DataLoader worker on one thread), and
    the rest (at least one) go to the process's own intra-op threads. Why: on a 2-core machine under load, a training
    process with torch's default of 2 intra-op threads plus 2 DataLoader workers ran 6-17 img/s, with one thread each
    50-105 img/s (identical losses); a plain timm forward ran 9.9 against 353 img/s.
    """
    if requested is None and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        requested = max(int(os.environ["OMP_NUM_THREADS"]), 1)
    if requested is None:
        share = max(available_cores() // max(processes, 1), 1)
        requested = max(share - max(workers, 0), 1)
    torch.set_num_threads(requested)
    return requested


# --- host synchronisation counting ---------------------------------------------------------------------------------

# The aten ops that make the host wait for the device: reading a value (item(), bool(), float(), int(), an `if` on
# a tensor all end in _local_scalar_dense) and ops whose output shape depends on the data.
_HOST_READ_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::unique_consecutive",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::repeat_interleave",
        "aten::equal",
        "aten::is_nonzero",
    }
)


class HostReadCounter:
    """Counts the host reads of tensor values (each one a device synchronisation on a GPU) while it is active, with
    where each came from. CUDA-free, so the tests count a training step's synchronisations on a CPU:

    - every aten op in _HOST_READ_OPS, seen by a TorchDispatchMode (below autograd, so backward is included);
    - `Tensor.tolist()` and `Tensor.numpy()`, which read memory without dispatching (patched while active);
    - copies to the CPU from another device.

    On a CPU run every tensor is a host tensor, so only read *values* count: creating a tensor from Python numbers
    (an H2D copy on a GPU, asynchronous from pinned memory) is not counted. `reads` lists (what, where) pairs, where
    is the innermost dino_scale frame."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, str]] = []
        self._mode: Any = None
        self._patched: dict[str, Any] = {}

    def _record(self, what: str) -> None:
        where = "?"
        for frame in reversed(traceback.extract_stack()[:-2]):
            if f"{os.sep}dino_scale{os.sep}" in frame.filename and "devices.py" not in frame.filename:
                where = f"{frame.filename.rsplit(os.sep + 'dino_scale' + os.sep, 1)[-1]}:{frame.lineno} {frame.name}"
                break
        self.reads.append((what, where))

    def __enter__(self) -> HostReadCounter:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                name = func._schema.name
                if name in _HOST_READ_OPS:
                    counter._record(name)
                elif name in ("aten::_to_copy", "aten::copy_"):
                    source = args[1] if name == "aten::copy_" else args[0]
                    target = args[0].device if name == "aten::copy_" else (kwargs or {}).get("device")
                    if target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu":
                        counter._record(f"{name} to cpu")
                return func(*args, **(kwargs or {}))

        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._patched[method] = original

            def patched(tensor: torch.Tensor, *args: Any, _original: Any = original, _method: str = method) -> Any:
                counter._record(f"Tensor.{_method}")
                return _original(tensor, *args)

            setattr(torch.Tensor, method, patched)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        self._patched.clear()
