"""Build TensorRT engines from our exported ONNX files, and run them on torch CUDA tensors.

:func:`build_engine` parses an ONNX file, builds a serialized engine for one dynamic batch range (one
optimisation profile) and writes it atomically, optionally reusing a timing cache across builds.
:class:`TensorRTRunner` loads such an engine and follows the runner contract of :mod:`dino_scale.export.runtimes`:
``runner(images) -> tuple[Tensor, ...]`` on ``runner.device``, returning before the GPU is done.

TensorRT needs the ``tensorrt`` Python package (10 or newer) and an NVIDIA GPU. This module imports it lazily,
so it imports fine without either; the tests that need them are skipped where they are missing.

Precision and TensorRT 10 vs 11: TensorRT 10 builds "weakly typed" networks by default, where the FP16 / BF16
builder flags let it run an fp32 ONNX in lower precision. TensorRT 11 removed those flags: every network is
strongly typed, i.e. each layer runs in the types the ONNX itself declares. So an fp16 / bf16 engine on
TensorRT 11 (or with ``strongly_typed=True`` on 10) needs an ONNX exported at that precision, and
:func:`build_engine` checks the ONNX for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from dino_scale.errors import InputError, NotFound, Unavailable
from dino_scale.export.graph import PRECISIONS
from dino_scale.io import atomic_write_bytes

__all__ = [
    "TensorRTRunner",
    "build_engine",
    "has_precision_flags",
    "import_tensorrt",
    "validate_build_options",
]

log = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
# The first TensorRT whose networks are always strongly typed (weak-typing precision flags removed).
ALWAYS_STRONGLY_TYPED_MAJOR = 11
_GIB = 1 << 30


def import_tensorrt() -> ModuleType:
    """Import and return the ``tensorrt`` module, or raise :class:`Unavailable` saying what is missing.

    Checks the package imports, is TensorRT 10 or newer, and that torch sees a CUDA GPU.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as error:  # OSError: the wheel is there but libnvinfer cannot be loaded
        raise Unavailable(
            "TensorRT needs the `tensorrt` Python package (pip install tensorrt, TensorRT 10 or newer) and an "
            f"NVIDIA GPU; import failed: {error}"
        ) from None
    major = _major_version(trt)
    if major < MIN_TENSORRT_MAJOR:
        raise Unavailable(
            f"TensorRT {trt.__version__} is too old: this tool uses the TensorRT {MIN_TENSORRT_MAJOR} API "
            "(pip install -U tensorrt)"
        )
    if not torch.cuda.is_available():
        raise Unavailable("TensorRT needs an NVIDIA GPU; torch sees none")
    return trt


def has_precision_flags(trt: ModuleType, precision: str) -> bool:
    """Whether this TensorRT can lower an fp32 ONNX to ``precision`` with a builder flag (weak typing, TRT 10).

    When it cannot (TensorRT 11+), the ONNX must be exported at ``precision`` and built strongly typed.
    """
    flag = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
    if flag is None:
        return True
    return _major_version(trt) < ALWAYS_STRONGLY_TYPED_MAJOR and hasattr(trt.BuilderFlag, flag)


def _major_version(trt: ModuleType) -> int:
    """The major version of a tensorrt module ("10.9.0.34" -> 10; 0 when unreadable)."""
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


# TensorRT keeps one process-wide logger and warns when a builder or runtime brings a different one, so every
# call here shares one instance per tensorrt module and only its severity changes.
_LOGGER: tuple[ModuleType, Any] | None = None


def _trt_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """The shared ``trt.Logger``, set to VERBOSE or WARNING."""
    global _LOGGER
    if _LOGGER is None or _LOGGER[0] is not trt:
        _LOGGER = (trt, trt.Logger(trt.Logger.WARNING))
    logger = _LOGGER[1]
    # A binding without a writable severity keeps the one the logger was created with.
    with contextlib.suppress(AttributeError):
        logger.min_severity = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    return logger


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------


def validate_build_options(
    input_shape: Sequence[int],
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    precision: str,
    workspace_gib: float | None = None,
) -> None:
    """Raise ValueError, naming the command-line flag at fault, for an impossible engine build request."""
    for flag, value in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value!r}")
    if min_batch > max_batch:
        raise InputError(f"--min-batch {min_batch} is larger than --max-batch {max_batch}")
    if not min_batch <= opt_batch <= max_batch:
        raise InputError(
            f"--opt-batch {opt_batch} must lie between --min-batch {min_batch} and --max-batch {max_batch}"
        )
    if precision not in PRECISIONS:
        raise InputError(f"--precision: unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if workspace_gib is not None and not workspace_gib > 0:
        raise InputError(f"--workspace-gib must be positive, got {workspace_gib!r}")
    if not input_shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape):
        raise InputError(f"input_shape must be positive integers without the batch axis, got {tuple(input_shape)}")


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    input_name: str,
    input_shape: tuple[int, ...],
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    precision: str,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    strongly_typed: bool = False,
    log_verbose: bool = False,
) -> dict[str, Any]:
    """Build a TensorRT engine from ``onnx_path`` and write it atomically to ``engine_path``.

    The engine takes ``input_name`` of shape ``(batch, *input_shape)`` for any batch in
    ``[min_batch, max_batch]``, tuned for ``opt_batch``.

    ``precision``: ``fp32``, ``fp16`` or ``bf16``. On a weakly typed build (TensorRT 10's default) fp16 / bf16
    set the builder flag that lets TensorRT pick lower-precision kernels for an fp32 ONNX; fp32 turns TF32 off.
    A strongly typed build (``strongly_typed=True``, or always on TensorRT 11,
    which removed those flags) runs every layer in the ONNX's own types, so the ONNX must have been exported at
    ``precision``; this is checked and a mismatch raises ValueError.

    ``timing_cache``: a file of tactic timings, loaded if it exists (a stale one is replaced) and written back
    after the build, which makes rebuilds on the same GPU and TensorRT version much faster.

    Returns ``{"tensorrt", "precision", "profile": {"min", "opt", "max"}, "strongly_typed", "build_s"}``;
    ``build_s`` is the time TensorRT spent in ``build_serialized_network``.

    Raises ValueError for bad options (before TensorRT is imported, so it works anywhere),
    Unavailable when TensorRT or a GPU is missing, RuntimeError when parsing or building fails.
    """
    validate_build_options(input_shape, min_batch, opt_batch, max_batch, precision, workspace_gib)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise NotFound(f"ONNX file {onnx_path} does not exist")
    trt = import_tensorrt()
    major = _major_version(trt)

    precision_flag = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
    weak_flag_missing = precision_flag is not None and not hasattr(trt.BuilderFlag, precision_flag)
    is_strongly_typed = strongly_typed or major >= ALWAYS_STRONGLY_TYPED_MAJOR or weak_flag_missing
    if is_strongly_typed:
        why = "requested" if strongly_typed else f"TensorRT {trt.__version__} has no weakly typed precision flags"
        _check_onnx_precision(onnx_path, precision, why)

    logger = _trt_logger(trt, log_verbose)
    builder = trt.Builder(logger)
    network_flags = 0  # explicit batch is the only mode since TensorRT 10
    # TensorRT 11 is strongly typed whatever the flags, and deprecates the flag; only 10 needs it set.
    if strongly_typed and major < ALWAYS_STRONGLY_TYPED_MAJOR:
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (rather than parse(bytes)) resolves external-data weight files next to the ONNX.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(
            f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors or ["(no error reported)"])
        )
    _check_network_input(network, input_name, input_shape, onnx_path)

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, *input_shape), (opt_batch, *input_shape), (max_batch, *input_shape))
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"TensorRT rejected the optimisation profile for {input_name!r} (see the log above)")
    if precision_flag is not None and not is_strongly_typed:
        config.set_flag(getattr(trt.BuilderFlag, precision_flag))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 (on by default on Ampere and newer) rounds matmul inputs to 10 mantissa bits: an "fp32" engine
        # would then miss the fp32 parity bound (relative error 1e-4) by design.
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * _GIB))
    cache = _attach_timing_cache(config, Path(timing_cache)) if timing_cache is not None else None

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build the engine for {onnx_path}; see the log above")
    atomic_write_bytes(engine_path, memoryview(serialized))
    if cache is not None:
        atomic_write_bytes(Path(timing_cache), memoryview(cache.serialize()))
    return {
        "tensorrt": str(trt.__version__),
        "precision": precision,
        "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "strongly_typed": bool(is_strongly_typed),
        "build_s": build_s,
    }


def _check_network_input(network: Any, input_name: str, input_shape: Sequence[int], onnx_path: Path) -> None:
    """The named input exists, has rank 1 + len(input_shape), and its fixed dims agree with input_shape."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if input_name not in inputs:
        raise InputError(f"{onnx_path} has no input {input_name!r}; its inputs are {sorted(inputs)}")
    declared = tuple(inputs[input_name].shape)
    wanted = (-1, *input_shape)
    # -1 marks a dynamic axis in the ONNX; any fixed axis must match what the profile asks for.
    if len(declared) != len(wanted) or any(d != -1 and d != w for d, w in zip(declared[1:], wanted[1:], strict=True)):
        raise InputError(
            f"{onnx_path}: input {input_name!r} has shape {declared} (-1 = dynamic), which does not fit "
            f"(batch, *{tuple(input_shape)})"
        )


def _attach_timing_cache(config: Any, path: Path) -> Any:
    """Give ``config`` the timing cache stored at ``path`` (or an empty one) and return the cache object."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    # A cache from another TensorRT version or GPU is refused (ignore_mismatch=False, so that wrong timings are
    # never reused); start from an empty one then, which the build repopulates and the caller overwrites.
    if cache is None or not config.set_timing_cache(cache, False):
        if not blob:
            raise RuntimeError("TensorRT could not create an empty timing cache (see the log above)")
        log.warning("timing cache %s does not match this TensorRT version or GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise RuntimeError("TensorRT could not create an empty timing cache (see the log above)")
    return cache


def _check_onnx_precision(onnx_path: Path, precision: str, why: str) -> None:
    """For a strongly typed build: the ONNX must compute in ``precision``, since TensorRT will not change it."""
    found = _onnx_float_types(onnx_path)
    if found is None:
        log.warning("onnx is not installed: cannot check that %s was exported at %s", onnx_path, precision)
        return
    low = found & {"fp16", "bf16"}
    expected = set() if precision == "fp32" else {precision}
    if low == expected:
        return
    if precision == "fp32":
        problem = f"it computes in {'/'.join(sorted(low))}, so the engine would not be fp32"
    else:
        problem = f"it has no {precision} tensors ({'/'.join(sorted(low)) or 'fp32 only'})"
    raise InputError(
        f"--precision {precision}: a strongly typed TensorRT build ({why}) runs each layer in the ONNX's own "
        f"types, and {onnx_path} does not match: {problem}. Export the ONNX with --precision {precision}, or "
        "build it at the precision it was exported in."
    )


def _onnx_float_types(onnx_path: Path) -> set[str] | None:
    """Which of fp32 / fp16 / bf16 an ONNX graph uses (weights, declared types, Cast targets); None without onnx.

    Reads the graph only (external weight files are not loaded), so it is cheap even for large models.
    """
    try:
        import onnx
    except ImportError:
        return None
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    found: set[str] = set()

    def note(elem_type: int) -> None:
        if elem_type in names:
            found.add(names[elem_type])

    def visit_nodes(nodes: Any) -> None:
        for node in nodes:
            for attribute in node.attribute:
                if node.op_type == "Cast" and attribute.name == "to":
                    note(attribute.i)
                elif attribute.type == onnx.AttributeProto.TENSOR:
                    note(attribute.t.data_type)
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    visit_graph(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for graph in attribute.graphs:
                        visit_graph(graph)

    def visit_graph(graph: Any) -> None:
        for initializer in graph.initializer:
            note(initializer.data_type)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type"):
                note(value.type.tensor_type.elem_type)
        visit_nodes(graph.node)

    model = onnx.load(str(onnx_path), load_external_data=False)
    visit_graph(model.graph)
    for function in model.functions:
        visit_nodes(function.node)
    return found


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


def _torch_dtypes(trt: ModuleType) -> dict[Any, torch.dtype]:
    """TensorRT DataType -> torch dtype, for the types an engine's IO can have here (members that exist)."""
    pairs = (
        ("FLOAT", torch.float32),
        ("HALF", torch.float16),
        ("BF16", torch.bfloat16),
        ("INT8", torch.int8),
        ("UINT8", torch.uint8),
        ("INT32", torch.int32),
        ("INT64", torch.int64),
        ("BOOL", torch.bool),
    )
    return {getattr(trt.DataType, name): dtype for name, dtype in pairs if hasattr(trt.DataType, name)}


class TensorRTRunner:
    """A serialized TensorRT engine, run on torch CUDA tensors (one execution context, optimisation profile 0).

    ``output_names`` chooses which engine outputs are returned, in that order. The engine must have been built
    by the same TensorRT version for the same GPU model.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, output_names: Sequence[str]) -> None:
        trt = import_tensorrt()
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise NotFound(f"TensorRT engine {self.engine_path} does not exist")
        self.device = torch.device("cuda")
        self._device = torch.device("cuda", torch.cuda.current_device())  # the GPU the engine is loaded on
        self._runtime = trt.Runtime(_trt_logger(trt))  # kept: the engine must not outlive its runtime
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not load the engine {self.engine_path}; it may have been built "
                "by another TensorRT version or for another GPU (rebuild it here). See the log above."
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.engine_path} (GPU memory?)")

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise InputError(f"{self.engine_path} has inputs {inputs}; this runner drives single-input engines")
        self.input_name = inputs[0]
        self._engine_outputs = [n for n in names if n != self.input_name]
        unknown = [n for n in output_names if n not in self._engine_outputs]
        if unknown or not output_names:
            raise InputError(
                f"output names {list(output_names)} do not fit {self.engine_path}, whose outputs are "
                f"{self._engine_outputs}"
            )
        self.output_names = tuple(output_names)

        to_torch = _torch_dtypes(trt)
        self._dtypes: dict[str, torch.dtype] = {}
        for tensor in names:
            trt_dtype = self.engine.get_tensor_dtype(tensor)
            if trt_dtype not in to_torch:
                raise InputError(f"{self.engine_path}: tensor {tensor!r} has type {trt_dtype}, unsupported here")
            self._dtypes[tensor] = to_torch[trt_dtype]
        self._input_shape = tuple(self.engine.get_tensor_shape(self.input_name))  # -1 on dynamic axes
        profile_min, _, profile_max = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_range = (int(profile_min[0]), int(profile_max[0]))
        # TensorRT synchronises internally on the legacy default stream, which torch uses unless told otherwise;
        # a stream of our own, ordered against the caller's, keeps the call asynchronous.
        self._stream = torch.cuda.Stream(device=self._device)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the engine on ``images`` (any device and float dtype; moved and cast to what the engine takes).

        Returns the outputs in ``output_names`` order, as CUDA tensors. Does not synchronise: the work is queued
        after whatever the caller's current stream has pending, and that stream waits for it, so callers time
        it with CUDA events on their stream or call ``torch.cuda.synchronize()`` before reading the results.
        Raises ValueError when the batch is outside the engine's profile or a fixed axis does not match.
        """
        if images.dim() != len(self._input_shape):
            raise InputError(
                f"{self.input_name!r} takes {len(self._input_shape)}-d input {self._input_shape} (-1 = any), "
                f"got shape {tuple(images.shape)}"
            )
        batch = int(images.shape[0])
        low, high = self.batch_range
        if not low <= batch <= high:
            raise InputError(
                f"batch {batch} is outside the range this engine was built for: {low}..{high} "
                "(rebuild with other --min-batch / --max-batch)"
            )
        if any(want not in (-1, got) for want, got in zip(self._input_shape[1:], images.shape[1:], strict=True)):
            raise InputError(
                f"{self.input_name!r} takes shape {self._input_shape} (-1 = any), got {tuple(images.shape)}"
            )

        caller = torch.cuda.current_stream(self._device)
        images = images.to(self._device, dtype=self._dtypes[self.input_name]).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(images.shape)):
            raise InputError(f"TensorRT rejected input shape {tuple(images.shape)} for {self.input_name!r}")
        outputs: dict[str, torch.Tensor] = {}
        for tensor in self._engine_outputs:  # every output needs a buffer, returned or not
            shape = tuple(self.context.get_tensor_shape(tensor))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output {tensor!r} has a data-dependent shape {shape}; not supported here")
            outputs[tensor] = torch.empty(shape, dtype=self._dtypes[tensor], device=self._device)
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        for tensor, buffer in outputs.items():
            self.context.set_tensor_address(tensor, buffer.data_ptr())

        self._stream.wait_stream(caller)  # the input (and the output allocations) belong to the caller's stream
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.engine_path} (see the log above)")
        # The caching allocator must not hand these buffers out again before our stream is done with them.
        for buffer in (images, *outputs.values()):
            buffer.record_stream(self._stream)
        caller.wait_stream(self._stream)
        return tuple(outputs[name] for name in self.output_names)
