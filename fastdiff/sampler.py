"""The sampler API: ``fastdiff.Sampler`` and ``fastdiff.sample``, one call from noise (or a prompt) to images.

    sampler = fastdiff.Sampler(unet, scheduler="dpmpp_2m")          # a UNetSampler
    sampler = fastdiff.Sampler(pipe, scheduler="dpmpp_2m_karras")   # a PipelineSampler (diffusers SD / SDXL)
    images = fastdiff.sample(model_or_pipe, num_inference_steps=20, ...)

Two concrete samplers share one denoising loop (:mod:`fastdiff.loop`) by composition:

- :class:`fastdiff.unet_sampler.UNetSampler` for a denoising network (a diffusers UNet, a label-conditioned
  model, an embedded model name, an exported ``.onnx`` / engine file) and tensors in;
- :class:`fastdiff.pipelines.PipelineSampler` for a diffusers ``StableDiffusion(XL)Pipeline`` and prompts in.

This module sits above both and is the only place that chooses between them, with one explicit check
(:func:`fastdiff.pipelines.is_diffusers_pipeline`). ``Sampler`` is the public type: constructing it returns the
sampler for that model, and both concrete classes are registered as its virtual subclasses, so
``isinstance(fastdiff.Sampler(x), fastdiff.Sampler)`` holds for either kind while neither sampler imports the
other and neither module imports this one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from fastdiff.errors import InvalidInput
from fastdiff.models.text_to_image import is_pipeline_model, load_pipeline
from fastdiff.pipelines import PipelineSampler, is_diffusers_pipeline
from fastdiff.unet_sampler import UNetSampler


def sampler_class(model) -> type:
    """The sampler class for ``model``: :class:`PipelineSampler` for a diffusers pipeline, else
    :class:`UNetSampler`."""
    return PipelineSampler if is_diffusers_pipeline(model) else UNetSampler


class Sampler(ABC):
    """A reusable sampler: model + scheduler + backend, ready to draw images.

    ``Sampler(model, ...)`` returns a :class:`~fastdiff.unet_sampler.UNetSampler` (see it for the arguments and
    ``sample()``), or for a diffusers pipeline a :class:`~fastdiff.pipelines.PipelineSampler` (prompt to images,
    with the arguments of the pipeline's ``__call__``). Both are instances of ``Sampler``.

    Args:
        model: a diffusers UNet, a ``LabelConditionedUNet``, an embedded model name (``"digits"``), an exported
            ``.onnx`` / engine path, a diffusers StableDiffusion(XL) pipeline, or the name of an embedded
            pipeline (``"shapes"``: prompts in, with its own default steps and guidance). None means ``"digits"``.
        scheduler: a scheduler name, a diffusers scheduler / its config, or a ``fastdiff.schedulers.Scheduler``.
        backend: ``"auto"``, a step backend (``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``) or a model backend
            (``"onnxruntime"``, ``"tensorrt"``).
        device / dtype: where and in what precision to run.
        step_backend: override the step backend when ``backend`` names a model backend.
        cuda_graph: capture one step in a CUDA graph and replay it for every step.
        compile: run the network ``torch.compile``d (UNet samplers; see :mod:`fastdiff.compiled`), falling back to
            eager with a warning where it cannot compile.
    """

    def __new__(cls, model=None, scheduler=None, backend: str = "auto", device=None, dtype=None,
                step_backend: str | None = None, cuda_graph: bool = False, compile: bool = False):
        # The returned object is not a real instance of cls, so Python does not call __init__ again on it.
        return _build(model, scheduler=scheduler, backend=backend, device=device, dtype=dtype,
                      step_backend=step_backend, cuda_graph=cuda_graph, compile=compile)

    @abstractmethod
    def sample(self, *args, **kwargs):
        """Draw images (the arguments are the concrete sampler's)."""


Sampler.register(UNetSampler)
Sampler.register(PipelineSampler)


def _build(model, compile: bool = False, **options):
    if is_pipeline_model(model):  # an embedded text-to-image pipeline ("shapes") or its folder: loaded first
        model = load_pipeline(model)
    cls = sampler_class(model)
    if not compile:
        return cls(model, **options)
    if cls is PipelineSampler:
        raise InvalidInput("compile=True is not supported for diffusers pipelines yet; compile pipe.unet with "
                           "torch.compile before building the sampler instead")
    return cls(model, compile=True, **options)


def sample(model=None, scheduler=None, backend: str = "auto", device=None, dtype=None, cuda_graph: bool = False,
           compile: bool = False, **kwargs):
    """One call to images: ``Sampler(model, scheduler, backend, device, dtype, cuda_graph, compile=compile)
    .sample(**kwargs)``.

    ``kwargs`` are :meth:`UNetSampler.sample`'s (``num_inference_steps``, ``guidance_scale``,
    ``encoder_hidden_states``, ``class_labels``, ``eta``, ...) or, for a pipeline, its ``__call__``'s
    (``prompt``, ...); for a text coalescer (``"shapes-coalescer"``) those of
    :func:`fastdiff.distill.text_coalescer.sample_prompts` (``prompt``, ``num_inference_steps``, ...)."""
    from fastdiff.models.text_coalescer_net import is_text_coalescer

    if is_text_coalescer(model):  # prompts to images in 1 or 2 network steps: no scheduler, no UNet loop
        from fastdiff.models.text_coalescer import sample_prompts

        options = {"scheduler": scheduler, "device": device, "dtype": dtype, "cuda_graph": cuda_graph,
                   "compile": compile, "backend": None if backend == "auto" else backend}
        return sample_prompts(model, options=options, **kwargs)
    sampler = _build(model, scheduler=scheduler, backend=backend, device=device, dtype=dtype, cuda_graph=cuda_graph,
                     compile=compile)
    return sampler.sample(**kwargs)
