"""ONNX export with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, opset >= 18).

One path for every graph (a UNet call, or a whole unrolled sampler): trace with dynamic batch / height / width in the
profile's ranges, name the symbolic dimensions, store fastdiff metadata, save (external data over ~2 GB) into a
staging folder, validate with ``onnx.checker`` and strict shape inference, check parity against PyTorch with
onnxruntime on random inputs, and only then move the files into place (``os.replace``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdiff.errors import ExportError, InvalidInput
from fastdiff.export._files import publish, staging_dir
from fastdiff.export.profiles import ExportProfile
from fastdiff.export.report import ExportReport, ParityResult, Phases
from fastdiff.export.signature import (
    PRECISION_DTYPES,
    UNetGraph,
    dynamic_shapes,
    example_sizes,
    random_inputs,
    unet_signature,
)
from fastdiff.export.source import ModelSource
from fastdiff.exported.metadata import METADATA_FORMAT, label_table_metadata
from fastdiff.exported.session import make_session
from fastdiff.exported.specs import DimRange, TensorSpec

#: max |onnxruntime - torch| / max |torch| allowed by the parity check, per export precision.
PARITY_TOL = {"fp32": 1e-4, "fp16": 2e-2}
#: protobuf cannot hold a model over 2 GiB; past this many bytes of weights they go to a ``.data`` file.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


@dataclass
class GraphExport:
    """Everything :func:`export_graph` needs: the module to trace (in the export precision), the float32 PyTorch
    function the parity check compares against, the signature, the dimension ranges and the metadata."""

    name: str
    kind: str
    module: torch.nn.Module
    reference: Callable[[list[torch.Tensor]], torch.Tensor]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimRange]
    precision: str
    opset: int
    metadata: dict[str, str] = field(default_factory=dict)
    input_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs optional-op registrations and warns about axis names; keep the console to our progress."""
    # torch.__trace logs every traced op at DEBUG (for TORCH_TRACE); under a capturing handler that costs seconds
    names = ("torch.onnx", "torch.export", "torch._export", "torch.__trace", "torch.fx.experimental.symbolic_shapes",
             "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


_FIX = re.compile(r"(\w+) = Dim\('(\w+)'((?:, (?:min|max)=\d+)*)\)")


def suggested_dims(message: str, dims: dict[str, DimRange]) -> dict[str, DimRange]:
    """The dimension ranges torch.export suggests in a constraint-violation message (``batch = Dim('batch',
    max=63)``, ``height_div8 = Dim('height_div8', min=2)``), mapped back onto the profile's dimensions."""
    out = {}
    for _, name, bounds in _FIX.findall(message):
        base, _, div = name.partition("_div")
        r = dims.get(base)
        if r is None:
            continue
        m = int(div) if div.isdigit() else 1
        lo = hi = None
        for part in bounds.split(","):
            key, _, val = part.strip().partition("=")
            if key == "min":
                lo = int(val) * m
            elif key == "max":
                hi = int(val) * m
        lo, hi = max(r.min, lo or r.min), min(r.max, hi or r.max)
        if lo <= hi:
            out[base] = DimRange(base, lo, min(max(r.opt, lo), hi), hi, r.multiple)
    return out


def _trace(g: GraphExport):
    sizes = example_sizes(g.dims, "example")
    args = random_inputs(g.inputs, sizes, torch.Generator().manual_seed(0), g.input_ranges)
    try:
        with torch.no_grad(), _quiet_exporter(), contextlib.redirect_stdout(None):
            prog = torch.onnx.export(
                g.module.eval(), tuple(args), dynamo=True, opset_version=g.opset, verbose=False, optimize=True,
                input_names=[s.name for s in g.inputs], output_names=[s.name for s in g.outputs],
                dynamic_shapes={"args": dynamic_shapes(g.inputs, g.dims)})
    except Exception as e:  # the exporter raises many types; all mean the same to the user
        text = f"{e}\n{e.__cause__ or ''}"
        fixes = suggested_dims(text, g.dims)
        hint = ("torch.export cannot keep the dimension ranges dynamic as asked; it would accept: "
                + ", ".join(f"{k} in [{v.min}, {v.max}]" for k, v in fixes.items())
                + " - narrow the request (--batch / --height / --width / --tokens) accordingly.") if fixes else (
                "If a dimension range is the cause, narrow it (--batch / --height / --width) or make it static.")
        err = ExportError(f"torch.onnx.export (dynamo, opset {g.opset}) failed for {g.name!r}: "
                          f"{type(e).__name__}: {str(e)[:1500]}\n{hint}")
        err.suggested_dims = fixes
        raise err from e
    if prog is None:
        raise ExportError(f"torch.onnx.export returned nothing for {g.name!r}")
    return prog


def _name_dims(model, g: GraphExport) -> None:
    """Name the graph's symbolic input / output axes after the profile dimensions (the exporter writes
    expressions such as ``2*height_div2``)."""
    import onnx_ir as ir

    specs = {s.name: s for s in g.inputs + g.outputs}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        spec = specs.get(value.name)
        if spec is None or value.shape is None:
            continue
        dims = []
        for d, cur in zip(spec.dims, value.shape, strict=True):
            static = isinstance(d, int) or g.dims.get(d) is None or g.dims[d].static
            dims.append(cur if static and isinstance(cur, int) else (d if isinstance(d, str) else cur))
        value.shape = ir.Shape(dims)


def initializer_bytes(model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None:
            total += t.nbytes
    return total


def _save(model, path: Path, external_data: str, progress: bool) -> bool:
    """Save with ``onnx_ir``; weights go to ``<file>.data`` when ``external_data`` is "always", or "auto" and the
    weights pass :data:`EXTERNAL_DATA_THRESHOLD`. Returns whether external data was used."""
    import onnx_ir as ir

    if external_data not in ("auto", "always", "never"):
        raise InvalidInput(f"external_data must be 'auto', 'always' or 'never', got {external_data!r}")
    size = initializer_bytes(model)
    use = external_data == "always" or (external_data == "auto" and size > EXTERNAL_DATA_THRESHOLD)
    if external_data == "never" and size > EXTERNAL_DATA_THRESHOLD:
        raise InvalidInput(f"the weights take {size / 2**30:.2f} GiB; ONNX files over 2 GiB need external data "
                           "(use external_data='auto')")
    if not use:
        ir.save(model, path)
        return False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc="writing weights", leave=False)

    def callback(tensor, info) -> None:
        if bar is not None:
            bar.update(tensor.nbytes)

    try:
        ir.save(model, path, external_data=path.name + ".data", callback=callback)
    finally:
        if bar is not None:
            bar.close()
    return True


def validate_onnx(path: Path, outputs: list[TensorSpec]) -> None:
    """``onnx.checker`` (full check: strict shape inference included) and a shape-inference pass whose output
    rank and element type must match the signature."""
    import onnx
    from onnx import helper

    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = path.with_name(path.name + ".inferred")
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        proto = onnx.load(str(inferred), load_external_data=False)
        inferred.unlink()
    except Exception as e:  # onnx raises ValidationError / InferenceError / RuntimeError
        raise ExportError(f"the exported graph fails ONNX validation: {type(e).__name__}: {str(e)[:2000]}") from e
    got = {o.name: o.type.tensor_type for o in proto.graph.output}
    for spec in outputs:
        tt = got.get(spec.name)
        want = helper.np_dtype_to_tensor_dtype(spec.numpy_dtype)
        if tt is None or tt.elem_type != want or len(tt.shape.dim) != len(spec.dims):
            raise ExportError(f"shape inference gives output {spec.name!r} as {tt}, expected {spec.dtype} with dims "
                              f"{spec.describe()}")


def parity_check(path: Path, g: GraphExport, tol: float | None = None, seed: int = 0) -> list[ParityResult]:
    """Run the ONNX file with onnxruntime (CPU) and ``g.reference`` (float32 PyTorch) on random inputs at the
    profile's opt point and at an odd point (min batch, min height); report max abs / rel errors."""
    tol = PARITY_TOL[g.precision] if tol is None else tol
    sess = make_session(path, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    results, seen = [], set()
    for label in ("opt", "odd"):
        sizes = example_sizes(g.dims, label)
        key = tuple(sorted(sizes.items()))
        if key in seen:
            continue
        seen.add(key)
        args = random_inputs(g.inputs, sizes, gen, g.input_ranges)
        with torch.no_grad():
            ref = g.reference(args).double()
        got = sess.run(None, {s.name: a.numpy() for s, a in zip(g.inputs, args, strict=True)})[0]
        got = torch.from_numpy(got).double()
        if got.shape != ref.shape:
            raise ExportError(f"parity: onnxruntime returns shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        err = (got - ref).abs()
        max_abs = float(err.max()) if torch.isfinite(err).all() else float("inf")
        max_rel = max_abs / max(float(ref.abs().max()), 1e-30)
        shown = {k: v for k, v in sizes.items() if not g.dims[k].static}
        results.append(ParityResult(label, shown or sizes, max_abs, max_rel, tol, max_rel <= tol))
    return results


def export_graph(g: GraphExport, out_dir: str | Path, filename: str = "model.onnx", *, external_data: str = "auto",
                 parity: bool = True, parity_tol: float | None = None, progress: bool = True,
                 report: ExportReport | None = None) -> ExportReport:
    """Trace, save, validate, parity-check and publish one graph into ``out_dir/filename`` (see module doc)."""
    out_dir = Path(out_dir)
    report = report or ExportReport(model=g.name, format="onnx")
    report.kind, report.precision, report.opset = g.kind, g.precision, g.opset
    phases = Phases(total=4 if parity else 3, enabled=progress, desc=f"export {g.name}")
    try:
        with phases.phase("trace+convert"):
            prog = _trace(g)
            _name_dims(prog.model, g)
            prog.model.metadata_props.update(g.metadata)
        with staging_dir(out_dir) as stage:
            staged = stage / filename
            with phases.phase("save"):
                external = _save(prog.model, staged, external_data, progress)
            with phases.phase("validate"):
                validate_onnx(staged, g.outputs)
            if parity:
                with phases.phase("parity"):
                    report.parity = parity_check(staged, g, parity_tol)
                bad = [p for p in report.parity if not p.ok]
                if bad:
                    raise ExportError("parity check failed (onnxruntime vs PyTorch):\n  " + "\n  ".join(
                        p.line() for p in report.parity) + "\nNothing was written. Re-run with --no-parity to "
                        "write the file anyway, or raise the tolerance with --parity-tol.")
            files = ([stage / (filename + ".data")] if external else []) + [staged]
            for p in publish(files, out_dir):
                report.add_file(p)
            stale = out_dir / (filename + ".data")
            if not external and stale.exists():
                stale.unlink()  # left by an earlier export of the same name with external data
    finally:
        phases.close()
    report.timings.update(phases.timings)
    return report


def versions_metadata() -> dict[str, str]:
    import diffusers
    import onnx

    import fastdiff

    return {"fastdiff": fastdiff.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "onnx": onnx.__version__}


def base_metadata(kind: str, source: ModelSource, profile: ExportProfile, inputs: list[TensorSpec],
                  outputs: list[TensorSpec], precision: str) -> dict[str, str]:
    """The ``fastdiff.*`` metadata_props every exported graph carries (values are strings, JSON where
    structured); :class:`fastdiff.exported.metadata.GraphInfo` reads them back."""
    meta = {
        "fastdiff.format": METADATA_FORMAT,
        "fastdiff.kind": kind,
        "fastdiff.model": source.name,
        "fastdiff.family": profile.family,
        "fastdiff.precision": precision,
        "fastdiff.profile": profile.to_json(),
        "fastdiff.dims": json.dumps({k: v.as_list() for k, v in profile.dims.items()}),
        "fastdiff.inputs": json.dumps([s.to_dict() for s in inputs]),
        "fastdiff.outputs": json.dumps([s.to_dict() for s in outputs]),
        "fastdiff.model_config": json.dumps(source.facts),
        "fastdiff.scheduler": json.dumps(source.scheduler_config or {}),
        "fastdiff.defaults": json.dumps(source.defaults or {}),
        "fastdiff.versions": json.dumps(versions_metadata()),
    }
    if source.label_model is not None:
        table = label_table_metadata(source.label_model)
        if table is not None:
            meta["fastdiff.labels"] = table
    return meta


def model_copy(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``module`` in the export precision (a copy when it must change dtype; the caller's model is untouched)."""
    dtype = PRECISION_DTYPES[precision]
    p = next(module.parameters())
    if p.dtype == dtype and p.device.type == "cpu":
        return module.eval()
    return copy.deepcopy(module).to("cpu", dtype).eval()


def unet_graph(source: ModelSource, profile: ExportProfile) -> GraphExport:
    """A :class:`GraphExport` of one UNet call (see :func:`fastdiff.export.signature.unet_signature`)."""
    precision = profile.precision
    inputs, outputs = unet_signature(source.facts, precision)
    names = [s.name for s in inputs]
    reference_unet = model_copy(source.unet, "fp32")
    module = UNetGraph(model_copy(source.unet, precision), names)
    ref_module = UNetGraph(reference_unet, names)

    def reference(args: list[torch.Tensor]) -> torch.Tensor:
        return ref_module(*[a.float() if a.is_floating_point() else a for a in args])

    dims = {k: v for k, v in profile.dims.items() if any(k in s.dims for s in inputs)}
    ranges = {"class_labels": (0, int(source.facts.get("num_classes") or 10))}
    meta = base_metadata("unet", source, profile, inputs, outputs, precision)
    return GraphExport(source.name, "unet", module, reference, inputs, outputs, dims, precision, profile.opset,
                       meta, ranges)
