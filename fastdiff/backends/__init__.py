"""Model runners: where the denoising network runs (``torch``, ``onnxruntime``, ``tensorrt``)."""

from fastdiff.backends.base import ModelRunner, TorchRunner

__all__ = ["ModelRunner", "TorchRunner"]
