"""Export: the inference graph, writers (ONNX, AOTInductor, TensorRT), the parity gate, the sidecar, the runtimes
that run artifacts, and `dino-scale bench`."""
