"""Hostile inputs to the sampler API, as a careless user passes them: each is refused with a typed fastdiff error
whose message names the argument, or (for real integer types such as numpy's) accepted. The table cases pin the
message; the property-based tests throw arbitrary values at the arguments and require a result or a
FastDiffError, never another exception."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff.errors import FastDiffError, InvalidInput
from fastdiff.unet_sampler import MAX_SIDE
from tests.export.tiny_models import tiny_label_model, tiny_unet


@pytest.fixture(scope="module")
def label_model():
    return tiny_label_model()


@pytest.fixture(scope="module")
def label_sampler(label_model):
    return fastdiff.Sampler(label_model, scheduler="ddim", backend="torch")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _ehs(b=1, length=2, width=8):
    return torch.randn(b, length, width)


def _gen():
    return torch.Generator().manual_seed(0)


# (id, keyword arguments of sample() on the tiny label model, message fragment)
SAMPLE_CASES = [
    ("label float", dict(class_labels=[3.7]), "class_labels[0] must be an integer"),
    ("label bool", dict(class_labels=[True]), "class_labels[0] must be an integer"),
    ("label bare bool", dict(class_labels=True), "class_labels must be an integer"),
    ("label 2-D list", dict(class_labels=[[1, 2], [3, 4]]), "class_labels[0] must be an integer"),
    ("label 2-D tensor", dict(class_labels=torch.tensor([[1, 2]])), "must be 1-D"),
    ("label float tensor", dict(class_labels=torch.tensor([3.7])), "must hold integers"),
    ("label bool array", dict(class_labels=np.array([True])), "must hold integers"),
    ("label string", dict(class_labels="3"), "class_labels must be an integer"),
    ("label empty", dict(class_labels=[]), "class_labels is empty"),
    ("label out of range", dict(class_labels=[10]), "integers in [0, 9]"),
    ("labels and embeddings", dict(class_labels=[1], encoder_hidden_states=_ehs()), "pass one of them"),
    ("height 0", dict(height=0), "height must be an integer in [1, 16384], got 0"),
    ("height negative", dict(height=-8), "height must be an integer in [1, 16384], got -8"),
    ("height fractional", dict(height=8.5), "height must be an integer"),
    ("width huge", dict(width=10**9), "width must be an integer in [1, 16384]"),
    ("width string", dict(width="8"), "width must be an integer"),
    ("area huge", dict(height=16384, width=16384), "268,435,456 latent cells, over the 16,777,216"),
    ("batch x area huge", dict(height=4096, width=4096, num_images_per_prompt=2), "2 image(s) of 4096 x 4096"),
    ("guidance string", dict(guidance_scale="high"), "guidance_scale must be a number"),
    ("guidance list", dict(guidance_scale=[2.0]), "guidance_scale must be a number"),
    ("guidance nan", dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    ("rescale 2", dict(guidance_rescale=2.0), "guidance_rescale must be a number in [0.0, 1.0]"),
    ("steps 0", dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    ("steps float", dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1"),
    ("steps bool", dict(num_inference_steps=True), "num_inference_steps must be an integer >= 1"),
    ("steps string", dict(num_inference_steps="20"), "num_inference_steps must be an integer >= 1"),
    ("images per prompt bool", dict(num_images_per_prompt=True), "num_images_per_prompt must be an integer"),
    ("images per prompt 0", dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer in [1, 4096]"),
    ("images per prompt huge", dict(num_images_per_prompt=10**9),
     "num_images_per_prompt must be an integer in [1, 4096], got 1000000000"),
    ("generator int", dict(generator=42), "generator must be a torch.Generator"),
    ("generator list length", dict(class_labels=[1, 2], generator=[_gen() for _ in range(3)]),
     "list of 3 generators but 2 images"),
    ("generator list items", dict(class_labels=[1], generator=[0]), "every item must be a torch.Generator"),
    ("output type list", dict(output_type=["pt"]), "output_type must be one of"),
]


@pytest.mark.parametrize("kwargs,needle", [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES])
def test_sample_refuses(label_sampler, kwargs, needle):
    kwargs = {"num_inference_steps": 1, "class_labels": [1], "progress": False, **kwargs}
    with pytest.raises(InvalidInput) as e:
        label_sampler.sample(**kwargs)
    assert needle in str(e.value)


def test_out_of_range_labels_give_a_short_message(label_sampler):
    """A million bad labels must not become a million-entry message."""
    with pytest.raises(InvalidInput) as e:
        label_sampler.sample(num_inference_steps=1, class_labels=torch.arange(10**6), progress=False)
    assert "more" in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("steps,labels", [(np.int64(1), [1]), (1, np.array([3, 4])), (1, np.int64(7)),
                                          (1, torch.tensor(2)), (np.int32(1), torch.tensor([0, 9]))],
                         ids=["numpy steps", "numpy labels", "numpy label", "0-d tensor label", "int32 steps"])
def test_real_integer_types_are_accepted(label_sampler, steps, labels):
    out = label_sampler.sample(num_inference_steps=steps, class_labels=labels, progress=False,
                               generator=_gen(), height=np.int64(8))
    assert out.shape[0] == np.asarray(labels).size and out.shape[-1] == 8


def test_embeddings_alone_still_drive_a_label_model(label_sampler):
    out = label_sampler.sample(num_inference_steps=1, encoder_hidden_states=_ehs(2), progress=False)
    assert out.shape[0] == 2


@pytest.mark.parametrize("ehs,needle", [(torch.randn(0, 2, 8), "must all be >= 1"),
                                        (torch.randn(1, 0, 8), "must all be >= 1"),
                                        (torch.randn(2, 8), "must have shape (B, L, D)")],
                         ids=["batch 0", "no tokens", "2-D"])
def test_embedding_shapes(unet, ehs, needle):
    with pytest.raises(InvalidInput) as e:
        fastdiff.sample(unet, backend="torch", num_inference_steps=1, encoder_hidden_states=ehs, progress=False)
    assert needle in str(e.value)


# (id, Sampler keyword arguments, message fragment)
CONSTRUCT_CASES = [
    ("device name", dict(device="gpu0"), "is not a device name"),
    ("device float", dict(device=3.5), "device must be a device name"),
    ("device meta", dict(device="meta"), "fastdiff samples on 'cpu', 'cuda' or 'mps'"),
    ("dtype int", dict(dtype=torch.int64), "dtype must be a floating torch dtype"),
    ("dtype string", dict(dtype="float8"), "dtype must be a floating torch dtype"),
    ("dtype number", dict(dtype=16), "dtype must be a floating torch dtype"),
]


@pytest.mark.parametrize("kwargs,needle", [c[1:] for c in CONSTRUCT_CASES], ids=[c[0] for c in CONSTRUCT_CASES])
def test_sampler_refuses(label_model, kwargs, needle):
    with pytest.raises(InvalidInput) as e:
        fastdiff.Sampler(label_model, backend="torch", **kwargs)
    assert needle in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_cuda_device_without_cuda(label_model):
    with pytest.raises(InvalidInput, match="needs CUDA, which is not available"):
        fastdiff.Sampler(label_model, device="cuda")


def test_dtype_by_name_is_accepted():
    s = fastdiff.Sampler(tiny_label_model(), backend="torch", dtype="float64")
    assert s.dtype == torch.float64


@pytest.mark.parametrize("model,needle", [(torch.nn.Linear(2, 2), "is not a diffusion network"),
                                          (torch.nn.Sequential(), "is not a diffusion network"),
                                          (42, "cannot run a int")],
                         ids=["linear", "no parameters", "int"])
def test_not_a_diffusion_network(model, needle):
    with pytest.raises(InvalidInput) as e:
        fastdiff.Sampler(model, backend="torch")
    assert needle in str(e.value)


class _Returns(torch.nn.Module):
    """A UNet whose forward returns something else than diffusers' (prediction,) tuple."""

    def __init__(self, unet, kind: str):
        super().__init__()
        self.unet, self.kind = unet, kind
        self.config = unet.config

    def forward(self, sample, timestep, **kwargs):
        out = self.unet(sample, timestep, **kwargs)[0]
        return {"dict": {"prediction": out}, "half": out[:, :, :4], "tensor": out, "none": None}[self.kind]


@pytest.mark.parametrize("kind,needle", [("dict", "returned a dict with keys ['prediction']"),
                                         ("half", "returned a tensor of shape (1, 1, 4, 8)"),
                                         ("none", "returned NoneType")])
def test_model_returning_the_wrong_thing(unet, kind, needle):
    with pytest.raises(InvalidInput) as e:
        fastdiff.sample(_Returns(unet, kind), backend="torch", num_inference_steps=1, encoder_hidden_states=_ehs(),
                        guidance_scale=1.0, progress=False)  # no CFG: batch 1
    assert needle in str(e.value) and "expected (1, 1, 8, 8)" in str(e.value).replace("a tensor of shape ", "")


def test_model_returning_a_bare_tensor_is_used_as_is(unet):
    out = fastdiff.sample(_Returns(unet, "tensor"), backend="torch", num_inference_steps=1,
                          encoder_hidden_states=_ehs(), progress=False, output_type="latent")
    assert out.shape == (1, 1, 8, 8)


# ----- property-based: arbitrary values for each argument give a result or a FastDiffError ------------------------
_junk = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(-10**12, 10**12), st.just([]), st.just({}))
_small_int = st.one_of(st.integers(-3, 3), st.integers(-3, 3).map(np.int64))
_steps = st.one_of(_small_int, _junk)
# sides that are valid but huge would do real work (gigabytes of activations): the fuzz keeps to small valid sides
# and values that must be refused; the area cap has its own test
_side = st.one_of(st.none(), st.integers(-2, 12),
                  _junk.filter(lambda v: not (isinstance(v, int) and 12 < v <= MAX_SIDE)))
_labels = st.one_of(st.none(), _small_int, st.lists(st.one_of(_small_int, st.floats(-2, 12), st.booleans()),
                                                    max_size=3), _junk)
_guidance = st.one_of(st.floats(-5, 10), st.integers(-3, 10), _junk)
_fuzz = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _result_or_fastdiff_error(sampler, **kwargs):
    try:
        out = sampler.sample(progress=False, output_type="latent", **kwargs)
    except FastDiffError:
        return
    assert isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all())


@_fuzz
@given(steps=_steps, guidance=_guidance, labels=_labels)
def test_fuzz_steps_guidance_labels(label_sampler, steps, guidance, labels):
    _result_or_fastdiff_error(label_sampler, num_inference_steps=steps, guidance_scale=guidance, class_labels=labels)


@_fuzz
@given(height=_side, width=_side, per_prompt=st.one_of(_small_int, _junk), generator=st.one_of(
    st.none(), st.builds(_gen), st.lists(st.builds(_gen), max_size=3), _junk))
def test_fuzz_sizes_batch_generator(label_sampler, height, width, per_prompt, generator):
    _result_or_fastdiff_error(label_sampler, num_inference_steps=1, class_labels=[1], height=height, width=width,
                              num_images_per_prompt=per_prompt, generator=generator)


@settings(max_examples=30, deadline=None)
@given(device=st.one_of(st.sampled_from(["cpu", "cuda", "cuda:7", "mps", "meta", "cpu:0", "", "x"]), _junk),
       dtype=st.one_of(st.sampled_from([torch.float32, torch.int8, torch.bool, "float32", "bfloat16", "int"]), _junk))
def test_fuzz_device_dtype(device, dtype):
    try:
        s = fastdiff.Sampler(tiny_label_model(), backend="torch", device=device, dtype=dtype)
    except FastDiffError:
        return
    assert s.dtype.is_floating_point
