"""The Triton Python-backend model that ``python -m fastdiff.export MODEL --format triton`` copies into a model
repository as ``fastdiff/1/model.py``: fastdiff's sampling loop around the exported network, with the request
contract of :mod:`fastdiff.serve.model` (the same inputs, outputs, seeding and checks as ``python -m fastdiff serve``).

It runs inside Triton's Python-backend stub, so ``fastdiff`` (and torch, onnxruntime) must be importable by the
Python that stub embeds. Its config's parameters say what to serve: ``network`` (the exported file, relative to this
model's folder), and optionally ``scheduler``, ``steps``, ``guidance``, ``backend``. Unlike PyTriton, the Python
backend answers each request of a batch on its own, so an invalid request fails alone.
"""

from __future__ import annotations

import json
import os

import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        from fastdiff.serve.model import ServedModel

        params = _parameters(json.loads(args["model_config"]))
        network = os.path.normpath(os.path.join(args["model_repository"], params["network"]))
        self.model = ServedModel(network, scheduler=params.get("scheduler") or None,
                                 steps=int(params["steps"]) if params.get("steps") else None,
                                 guidance=float(params["guidance"]) if params.get("guidance") else None,
                                 backend=params.get("backend") or "auto")
        self.input_names = [t.name for t in self.model.inputs()]
        self.output_name = self.model.outputs()[0].name
        pb_utils.Logger.log_info(f"fastdiff: serving {self.model.describe()} from {network}")

    def execute(self, requests):
        datas = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.input_names}
            datas.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})
        problems = [self.model.problem(d) for d in datas]
        valid = [d for d, p in zip(datas, problems, strict=True) if p is None]
        results = iter(self.model.infer(valid) if valid else [])
        responses = []
        for problem in problems:
            if problem is not None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"invalid request: {problem}")))
            else:
                images = next(results)[self.output_name]
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, images)]))
        return responses
