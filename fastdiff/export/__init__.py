"""Export to ONNX and TensorRT (``python -m fastdiff.export MODEL --format onnx|tensorrt --out DIR``).

    from fastdiff.export import export_onnx, export_tensorrt
    report = export_onnx("digits", "out/", precision="fp32", batch="1:20:64")
    report = export_onnx("digits-onestep", "out/", sampler="onestep")     # the whole sampling loop in one graph
    print(report.summary())

See ``docs/export.md``.
"""

from fastdiff.export.api import export_onnx, export_tensorrt, resolve_profile
from fastdiff.export.profiles import ExportProfile, available_profiles, load_profile
from fastdiff.export.report import ExportReport, ParityResult
from fastdiff.exported.specs import DimRange

__all__ = ["export_onnx", "export_tensorrt", "resolve_profile", "DimRange", "ExportProfile", "available_profiles",
           "load_profile", "ExportReport", "ParityResult"]
