"""TensorRT explicit-quantization engines: build from our Q/DQ ONNX, serialize, load, run.

Written against TensorRT's Python API 10.x and 11.x:

* networks are strongly typed where TensorRT offers it (the ``STRONGLY_TYPED`` creation flag;
  TensorRT 11 is always strongly typed): precisions come from the ONNX's Q/DQ, not from
  builder flags or a calibrator (implicit INT8 is deprecated in 10 and gone in 11);
* ``weak_types=True`` on TensorRT 10 builds a weakly typed engine with the INT8 and FP16 flags
  so unquantized layers may run in FP16, the ``trtexec --int8 --fp16`` behaviour;
* device memory and streams go through CUDA's Python bindings (``cuda-python``).

Requires the ``tensorrt`` extra (``pip install paddle-qat[tensorrt]``) and an NVIDIA GPU; without
them every entry point raises :class:`TensorRTUnavailable` saying so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QATError


class TensorRTUnavailable(QATError, RuntimeError):
    """TensorRT or CUDA's Python bindings are not installed, or no GPU is visible."""


def require_tensorrt():
    """The ``tensorrt`` module and CUDA runtime bindings, or a clear error."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed: the tensorrt runtime needs an NVIDIA GPU and "
            "`pip install paddle-qat[tensorrt]` (TensorRT 10 or 11 and cuda-python). On a CPU "
            "machine use --runtime onnxruntime.") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise TensorRTUnavailable(
                "CUDA's Python bindings are missing: `pip install cuda-python` (part of the "
                "tensorrt extra)") from None
    return trt, cudart


def _cuda(result):
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise QATError(f"CUDA call failed with error {error}")
    return values[0] if len(values) == 1 else values


def build_engine(onnx_path, engine_path, *, max_batch: int = 32, opt_batch: int | None = None,
                 workspace_mib: int = 2048, weak_types: bool = False) -> Path:
    """Build and serialize an explicit-quantization engine for ``onnx_path``.

    The batch dimension gets an optimization profile 1..``max_batch`` (optimum
    ``opt_batch``, default ``max_batch``). The engine is written atomically.
    """
    from ..export.atomic import atomic_path
    from ..export.checker import check_model

    trt, _ = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise QATError(f"ONNX model {onnx_path} does not exist")
    violations = check_model(onnx_path)
    if violations:
        raise QATError(f"{onnx_path} breaks TensorRT's Q/DQ rules, fix the export first:\n"
                       + "\n".join(f"  - {v}" for v in violations))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and (
        not weak_types)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "\n".join(f"  - {parser.get_error(i)}" for i in range(parser.num_errors))
        raise QATError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if not strongly_typed:
        if not hasattr(trt.BuilderFlag, "INT8"):
            raise TensorRTUnavailable("this TensorRT has no weakly typed INT8 mode (TensorRT "
                                      "11 removed it); build without weak_types")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        if shape[0] == -1:
            rest = shape[1:]
            if any(d < 0 for d in rest):
                raise QATError(f"input {tensor.name} has dynamic dims {shape} beyond the batch")
            profile.set_shape(tensor.name, [1, *rest], [opt_batch or max_batch, *rest],
                              [max_batch, *rest])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QATError(f"TensorRT could not build an engine from {onnx_path}; see its log")
    engine_path = Path(engine_path)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return engine_path


class TensorRTRunner:
    """A deserialized engine with one input; ``run`` copies in, executes, copies out."""

    def __init__(self, engine_path):
        trt, cudart = require_tensorrt()
        self.trt, self.cudart = trt, cudart
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise QATError(f"TensorRT engine {engine_path} does not exist")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise QATError(f"{engine_path} is not a TensorRT engine for this TensorRT "
                           f"version and GPU; rebuild it with `paddle_qat infer --build`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        if len(inputs) != 1:
            raise QATError(f"engine has {len(inputs)} inputs; this runner feeds one")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n not in inputs]
        self.stream = _cuda(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    @classmethod
    def from_path(cls, path, *, engine_path=None, max_batch: int = 32, rebuild: bool = False,
                  weak_types: bool = False):
        """Open an ``.engine``; for an ``.onnx`` build (or reuse) ``engine_path`` first."""
        path = Path(path)
        if path.suffix != ".onnx":
            return cls(path)
        engine_path = Path(engine_path) if engine_path else path.with_suffix(".engine")
        if rebuild or not engine_path.is_file():
            build_engine(path, engine_path, max_batch=max_batch, weak_types=weak_types)
        return cls(engine_path)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _cuda(self.cudart.cudaFree(pointer))
            pointer = _cuda(self.cudart.cudaMalloc(nbytes))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, batch: np.ndarray) -> np.ndarray:
        trt, cudart = self.trt, self.cudart
        dtype = trt.nptype(self.engine.get_tensor_dtype(self.input_name))
        host_in = np.ascontiguousarray(batch, dtype=dtype)
        self.context.set_input_shape(self.input_name, host_in.shape)
        pointer = self._buffer(self.input_name, host_in.nbytes)
        self.context.set_tensor_address(self.input_name, pointer)
        host_out = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            host_out[name] = np.empty(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._buffer(name, host_out[name].nbytes))
        h2d, d2h = (cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        _cuda(cudart.cudaMemcpyAsync(pointer, host_in.ctypes.data, host_in.nbytes, h2d,
                                     self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise QATError("TensorRT execution failed; see its log")
        for name, array in host_out.items():
            _cuda(cudart.cudaMemcpyAsync(array.ctypes.data, self._buffers[name][0],
                                         array.nbytes, d2h, self.stream))
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        return host_out[self.output_names[0]]

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for pointer, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(pointer)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
