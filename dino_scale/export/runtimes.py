"""Runners: one callable per inference runtime, all with the same contract.

``runner(images) -> tuple[Tensor, ...]``: ``images`` in the artifact's input layout/dtype (any device), outputs
in the artifact's output order, on ``runner.device``. On CUDA the call may return before the GPU is done
(callers synchronise or time with CUDA events), so that benchmarks measure device time, not launch overhead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from dino_scale.errors import Unavailable

CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class Runner(Protocol):
    name: str
    device: torch.device

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class TorchRunner:
    """The PyTorch model itself, eager or through ``torch.compile``."""

    def __init__(self, model: nn.Module, device: torch.device, compile_model: bool = False) -> None:
        self.device = device
        self.model = model.to(device).eval()
        self.name = "torch.compile" if compile_model else "pytorch-eager"
        self._forward = torch.compile(self.model, dynamic=False) if compile_model else self.model

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._forward(images.to(self.device, non_blocking=True)))


def import_onnxruntime():  # noqa: ANN201 - returns the module
    try:
        import onnxruntime
    except ImportError as error:
        raise Unavailable(
            f"ONNX Runtime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA): {error}"
        ) from None
    return onnxruntime


def onnxruntime_providers() -> list[str]:
    """The execution providers of the installed ONNX Runtime that can run here (CUDA ones need a GPU)."""
    ort = import_onnxruntime()
    providers = list(ort.get_available_providers())
    if not torch.cuda.is_available():
        providers = [p for p in providers if p not in CUDA_PROVIDERS]
    # Providers we do not drive (OpenVINO, DirectML, ...) are left out rather than half-supported.
    return [p for p in providers if p in (*CUDA_PROVIDERS, "CPUExecutionProvider")]


_ORT_TYPE_TO_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(uint8)": torch.uint8,
}


class OnnxRuntimeRunner:
    """An ONNX file in one ONNX Runtime execution provider.

    On CUDA providers the input and outputs are bound to torch CUDA tensors (IO binding), so no host copies are
    timed; on CPU, numpy arrays are passed directly (zero-copy from torch).
    """

    def __init__(
        self,
        path: str | Path,
        provider: str = "CPUExecutionProvider",
        output_shapes: dict[str, Sequence[int | str]] | None = None,
        fp16: bool = False,
        cache_dir: str | Path | None = None,
        strict_fp32: bool = False,
    ) -> None:
        ort = import_onnxruntime()
        if provider not in ort.get_available_providers():
            raise Unavailable(f"ONNX Runtime here has no {provider} (it has {ort.get_available_providers()})")
        if provider in CUDA_PROVIDERS and not torch.cuda.is_available():
            raise Unavailable(f"{provider} needs an NVIDIA GPU; torch sees none")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT warns about every node it assigns to the CPU
        # The CPU kernels get the process's intra-op thread count (what --threads / devices.set_threads chose), not
        # ORT's default of one thread per core, which oversubscribes the cores the DataLoader workers use.
        options.intra_op_num_threads = torch.get_num_threads()
        provider_options: dict[str, str] = {}
        if provider == "CUDAExecutionProvider" and strict_fp32:
            provider_options["use_tf32"] = "0"  # TF32 matmuls would miss the fp32 parity bound (1e-4) by design
        if provider == "TensorrtExecutionProvider":
            provider_options = {"trt_fp16_enable": str(fp16), "trt_engine_cache_enable": str(cache_dir is not None)}
            if cache_dir is not None:
                provider_options["trt_engine_cache_path"] = str(cache_dir)
        providers: list = [(provider, provider_options)]
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")  # ORT runs nodes the GPU provider lacks on the CPU
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.name = f"onnxruntime:{provider.removesuffix('ExecutionProvider')}"
        self.device = torch.device("cuda" if provider in CUDA_PROVIDERS else "cpu")
        self.input = self.session.get_inputs()[0]
        self.outputs = self.session.get_outputs()
        self.output_names = [o.name for o in self.outputs]
        self.output_shapes = output_shapes

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.device.type == "cpu":
            results = self.session.run(self.output_names, {self.input.name: images.cpu().contiguous().numpy()})
            return tuple(torch.from_numpy(r) for r in results)
        return self._run_on_gpu(images)

    def _run_on_gpu(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.output_shapes is None:
            raise ValueError("OnnxRuntimeRunner on a GPU needs output_shapes (from the sidecar) to bind outputs")
        images = images.to(self.device).contiguous()
        binding = self.session.io_binding()
        binding.bind_input(
            self.input.name,
            "cuda",
            images.device.index or 0,
            _numpy_dtype(images.dtype),
            tuple(images.shape),
            images.data_ptr(),
        )
        results = []
        for output in self.outputs:
            shape = [images.shape[0] if d == "batch" else int(d) for d in self.output_shapes[output.name]]
            tensor = torch.empty(shape, dtype=_ORT_TYPE_TO_TORCH[output.type], device=self.device)
            binding.bind_output(
                output.name, "cuda", tensor.device.index or 0, _numpy_dtype(tensor.dtype), shape, tensor.data_ptr()
            )
            results.append(tensor)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        return tuple(results)


def _numpy_dtype(dtype: torch.dtype):  # noqa: ANN202
    return {torch.float32: np.float32, torch.float16: np.float16, torch.uint8: np.uint8}[dtype]


class AotiRunner:
    """An AOTInductor package (``.pt2``) compiled by :func:`dino_scale.export.export_aoti`."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        self.device = device
        self.name = "aoti"
        try:
            self.module = torch._inductor.aoti_load_package(str(path))
        except Exception as error:  # compiled for another device, torch version or platform
            raise Unavailable(f"cannot load the AOTInductor package {path}: {error}") from None

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.module(images.to(self.device, non_blocking=True)))
