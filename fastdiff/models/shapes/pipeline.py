"""The ``shapes`` text-to-image pipeline: its architecture, the shipped weights, and loading it as an ordinary
``diffusers.StableDiffusionPipeline``.

Components (all diffusers / transformers classes, nothing custom at sampling time):

* ``vae``: the shipped ``AutoencoderKL`` (``weights/shapes-vae``): 64x64x3 <-> 16x16x4 latents;
* ``tokenizer``: the shipped ``CLIPTokenizer`` of the caption grammar (``weights/shapes-tokenizer``, 24 tokens);
* ``text_encoder``: a ``CLIPTextModel`` (:data:`TEXT_CONFIG`: 2 layers, width 64, 79k parameters), trained jointly
  with the UNet by the diffusion loss (the grammar is tiny: a separate contrastive stage would cost CPU minutes
  the UNet needs more);
* ``unet``: a ``UNet2DConditionModel`` (:data:`UNET_CONFIG`) on 16x16x4 latents, channels (32, 64, 128),
  cross-attention at 8x8 and 4x4 and in the middle block (4.1M parameters). Cross-attention at 16x16 was
  measured 1.8x slower per training step (1 thread, batch 64: 1.72 s for (64, 128) with attention at 16x16
  vs 0.96 s for this one), and an 8x8 grid already resolves the five positions of the grammar;
* ``scheduler``: :data:`SCHEDULER_CONFIG`, DPM-Solver++ 2M over the training schedule (v-prediction, cosine betas).

Weights live in ``weights/shapes/{unet,text_encoder}`` in diffusers' / transformers' own folder layouts (float16
safetensors + config.json), so ``UNet2DConditionModel.from_pretrained`` and ``CLIPTextModel.from_pretrained`` read
them too; ``manifest.json`` records their sha256 and the VAE's, checked on every load. :func:`load_pipeline`
assembles the pipeline from them (no hub, no network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastdiff._atomic import atomic_write_bytes, read_format_json, sha256_file
from fastdiff.errors import MissingDependency, ModelConfigError, ModelNotFound
from fastdiff.models.registry import WEIGHTS_DIR

PIPELINE_DIR = WEIGHTS_DIR / "shapes"
LATENT_SIZE = 16
#: the text encoder's ``max_position_embeddings`` must equal the tokenizer's ``model_max_length`` (24)
TEXT_CONFIG: dict = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "projection_dim": 64, "max_position_embeddings": 24}
UNET_CONFIG: dict = {
    "sample_size": LATENT_SIZE, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TEXT_CONFIG["hidden_size"], "attention_head_dim": 8, "norm_num_groups": 16,
}
#: the noise schedule of training (the digits recipe: cosine betas, v-prediction)
TRAIN_SCHEDULE: dict = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                        "prediction_type": "v_prediction"}
SCHEDULER_CONFIG: dict = {"_class_name": "DPMSolverMultistepScheduler", **TRAIN_SCHEDULE,
                          "algorithm_type": "dpmsolver++", "solver_order": 2, "steps_offset": 1}
#: default sampling settings (recorded in the UNet folder's config under ``_fastdiff``; see its ``defaults``)
DEFAULTS: dict = {"num_inference_steps": 20, "guidance_scale": 5.0}


def _tokenizer_ids():
    from fastdiff.models.shapes.tokenizer import load_tokenizer

    tok = load_tokenizer()
    return tok, {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 "pad_token_id": tok.pad_token_id}


def build_text_encoder(seed: int = 0, config: dict | None = None):
    """A freshly initialised ``CLIPTextModel`` of ``config`` (default :data:`TEXT_CONFIG`), seeded, its token ids
    taken from the shipped tokenizer (CLIP's convention: end-of-text is the largest id)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _, ids = _tokenizer_ids()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**{**(config or TEXT_CONFIG), **ids}))


def build_unet(seed: int = 0, config: dict | None = None):
    """A freshly initialised ``UNet2DConditionModel`` of ``config`` (default :data:`UNET_CONFIG`), seeded."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**(config or UNET_CONFIG))


#: the scheduler classes a pipeline folder may name (``_class_name``): the teacher's, the one-step student's
#: (``DDIMScheduler``, :func:`fastdiff.distill.train.onestep_scheduler_config`) and the consistency student's
#: (``LCMScheduler``, :func:`fastdiff.distill.consistency.lcm_scheduler_config`)
SCHEDULER_CLASSES = ("DPMSolverMultistepScheduler", "DDIMScheduler", "LCMScheduler")


def make_scheduler(config: dict | None = None):
    """The pipeline's scheduler (default :data:`SCHEDULER_CONFIG`); its ``_class_name`` one of
    :data:`SCHEDULER_CLASSES` (none: DPM-Solver++, the teacher's)."""
    import diffusers

    config = config or SCHEDULER_CONFIG
    name = config.get("_class_name", "DPMSolverMultistepScheduler")
    if name not in SCHEDULER_CLASSES:
        raise ModelConfigError(f"a shapes pipeline's scheduler must be one of {list(SCHEDULER_CLASSES)}, the config "
                               f"names {name!r}")
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, name)(**cfg)


def _state_fp16(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}


def save_components(unet, text_encoder, out: str | os.PathLike, metadata: dict, scheduler_config: dict | None = None,
                    defaults: dict | None = None) -> Path:
    """Write ``out/unet`` (diffusers layout) and ``out/text_encoder`` (transformers layout) in float16, and
    ``out/scheduler/scheduler_config.json``; each file atomically. ``metadata`` (training command, times, defaults,
    evaluation; a student's ``limits``) goes into the UNet config under ``_fastdiff``. ``scheduler_config`` /
    ``defaults``: the sampling settings (default: the teacher's, :data:`SCHEDULER_CONFIG` / :data:`DEFAULTS`)."""
    from safetensors.torch import save as st_save

    out = Path(out)
    unet_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items()
                if not k.startswith("_")}
    unet_cfg.update({"_class_name": "UNet2DConditionModel",
                     "_fastdiff": {"defaults": defaults or DEFAULTS, **metadata}})
    atomic_write_bytes(out / "unet" / "diffusion_pytorch_model.safetensors",
                       st_save(_state_fp16(unet), metadata={"format": "pt"}))
    atomic_write_bytes(out / "unet" / "config.json", (json.dumps(unet_cfg, indent=2) + "\n").encode())
    te_cfg = text_encoder.config.to_dict()
    te_cfg["torch_dtype"] = "float16"
    te_state = {k: v for k, v in _state_fp16(text_encoder).items() if not k.endswith("position_ids")}
    atomic_write_bytes(out / "text_encoder" / "model.safetensors", st_save(te_state, metadata={"format": "pt"}))
    atomic_write_bytes(out / "text_encoder" / "config.json", (json.dumps(te_cfg, indent=2) + "\n").encode())
    atomic_write_bytes(out / "scheduler" / "scheduler_config.json",
                       (json.dumps(scheduler_config or SCHEDULER_CONFIG, indent=2) + "\n").encode())
    write_manifest(out)
    return out


MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastdiff.shapes_pipeline"
#: the weight files a manifest records (their sha256), relative to the pipeline folder
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def vae_dir(path: str | os.PathLike) -> Path:
    """The VAE a pipeline folder decodes with: its own ``vae/`` when it has one (a pipeline trained with
    ``train shapes --vae DIR`` carries a copy of that VAE), else the shipped ``weights/shapes-vae``."""
    from fastdiff.models.shapes.train_vae import VAE_DIR

    own = Path(path) / "vae"
    return own if (own / "config.json").is_file() else VAE_DIR


def _vae_weights(path: str | os.PathLike) -> Path:
    return vae_dir(path) / "diffusion_pytorch_model.safetensors"


def write_manifest(path: str | os.PathLike) -> Path:
    """``path/manifest.json``: the sha256 of the UNet's and text encoder's weights and of the VAE they were
    trained on (a UNet learned one VAE's latent space: another VAE would decode it wrongly)."""
    path = Path(path)
    manifest = {"format": MANIFEST_FORMAT, "files": {f: sha256_file(path / f) for f in WEIGHT_FILES},
                "vae_sha256": sha256_file(_vae_weights(path))}
    return atomic_write_bytes(path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def verify(path: str | os.PathLike) -> None:
    """Check the folder's weights (and its VAE, :func:`vae_dir`) against its manifest: :class:`ModelNotFound` when
    a file is missing, damaged or replaced, :class:`ModelConfigError` when the manifest is not one."""
    path = Path(path)
    _require(path)
    hint = "retrain with `python -m fastdiff train shapes` (or reinstall fastdiff for the shipped model)"
    manifest = read_format_json(path / MANIFEST, MANIFEST_FORMAT, "shapes pipeline manifest", hint)
    for name, want in dict(manifest.get("files", {})).items():
        if sha256_file(path / name) != want:
            raise ModelNotFound(f"{path / name} does not match the sha256 its manifest records: damaged or "
                                f"replaced; {hint}")
    vae = _vae_weights(path)
    if not vae.is_file() or sha256_file(vae) != manifest.get("vae_sha256"):
        raise ModelNotFound(f"the shapes VAE {vae} is not the one this pipeline was trained on (missing, or its "
                            f"sha256 differs): its latents would decode wrongly; {hint}")


def _require(path: Path) -> None:
    for part in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "scheduler/scheduler_config.json"):
        if not (path / part).is_file():
            raise ModelNotFound(f"the shapes pipeline folder {path} lacks {part}; train it with "
                                "`python -m fastdiff train shapes` (or pass the folder it wrote)")


def metadata(path: str | os.PathLike = PIPELINE_DIR) -> dict:
    """The training metadata and default sampling settings recorded with the UNet (``{}`` when none)."""
    path = Path(path)
    _require(path)
    return json.loads((path / "unet" / "config.json").read_text()).get("_fastdiff", {})


def load_pipeline(path: str | os.PathLike = PIPELINE_DIR, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"):
    """The ``shapes`` model as a ``diffusers.StableDiffusionPipeline`` (no safety checker, no download), its
    modules in ``dtype`` on ``device``: the shipped tokenizer with the UNet, text encoder and VAE
    (:func:`vae_dir`) of ``path`` (default: the shipped ones)."""
    try:  # first: diffusers' pipeline classes import it too, with a less helpful error
        import transformers
    except ImportError as e:  # a dependency of fastdiff; missing only after an install with --no-deps
        raise MissingDependency("the shapes pipeline needs transformers (its CLIP tokenizer and text encoder): "
                                "pip install 'transformers>=4.40'") from e
    import diffusers

    from fastdiff.models.shapes.tokenizer import load_tokenizer

    path = Path(path)
    verify(path)
    # quiet while loading, then as the user had it: diffusers' "accelerate is not installed" and transformers'
    # "CLIPImageProcessor requires torchvision" are tips about features this pipeline does not use, and the
    # 36-tensor "Loading weights" bar is noise next to fastdiff's own progress
    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    bar = transformers.utils.logging.is_progress_bar_enabled()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        vae = AutoencoderKL.from_pretrained(vae_dir(path), torch_dtype=dtype, local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, local_files_only=True)
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        if bar:
            transformers.utils.logging.enable_progress_bar()
    scheduler_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
                                   scheduler=make_scheduler(scheduler_cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # fastdiff.sample / Sampler use these for arguments the caller leaves out; the pipeline's own __call__ keeps
    # diffusers' signature defaults (50 steps, CFG 7.5)
    meta = metadata(path)
    pipe.fastdiff_defaults = dict(meta.get("defaults", DEFAULTS))
    # what a distilled student supports (``{"max_inference_steps": 1, ...}``), checked by fastdiff.Sampler
    pipe.fastdiff_limits = dict(meta.get("limits") or {})
    pipe.fastdiff_name = path.name
    return pipe.to(device)
