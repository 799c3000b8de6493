"""Whole-sampler graphs: the complete sampling loop of a one- or few-step model - model calls, guidance and the
scheduler's update - unrolled from a :class:`~fastdiff.schedulers.StepPlan` into one module that maps
``(noise, condition)`` to the final sample, so a deployment makes one engine call per image batch.

Per step ``i`` (coefficients ``k = plan.coefs[i]`` are Python constants baked into the graph; exactly-zero terms
are left out, as the fused kernels skip them)::

    model_in = x * (input_scale0 if i == 0 else previous IN_NEXT)   (duplicated into the 2B CFG batch)
    m        = u + g * (c - u)                                       (or the model output without CFG)
    x0       = PX x + PM m,  clamped to +-clip_range when the plan clips
    prev     = OX x + OM m + O0 x0 + ON noise_i + sum_j OH_j hist_j + OS saved
    saved    = SX x + SM m + S0 x0 + SS saved + sum_j SH_j hist_j    (UniPC)
    hist[WSLOT] = x0                                                 (multistep solvers)

Graph inputs: ``noise`` (batch, C, H, W) unit-variance start noise (scaled by ``init_noise_sigma`` inside, as the
sampler does); ``class_labels`` (batch,) int64 for label-conditioned models (the label embedding and the null
label for CFG are in the graph) or ``encoder_hidden_states`` (batch, tokens, D) [+
``negative_encoder_hidden_states`` under CFG]; ``guidance_scale`` (1,) float32 under CFG; ``step_noise``
(K, batch, C, H, W) when the plan draws fresh noise at K steps (LCM, ancestral samplers), in the order the sampler
draws it. Output ``sample`` (batch, C, H, W). Arithmetic runs in float32 and the sample is stored in the export
precision between steps, as the sampler's fused step does.
"""

from __future__ import annotations

import torch

from fastdiff.errors import ExportError
from fastdiff.export.signature import run_unet
from fastdiff.exported.specs import TensorSpec
from fastdiff.schedulers.plan import HIST_SLOTS, Col, StepPlan


def _axpy(acc: torch.Tensor | None, c: float, t: torch.Tensor | None) -> torch.Tensor | None:
    """acc + c * t, leaving the term out when c is exactly 0 (as the kernels do)."""
    if c == 0.0 or t is None:
        return acc
    term = c * t
    return term if acc is None else acc + term


class UnrolledSampler(torch.nn.Module):
    """The whole sampling loop of ``plan`` as one module (see the module docstring for inputs and math)."""

    def __init__(self, unet: torch.nn.Module, plan: StepPlan, cfg: bool, label_model: torch.nn.Module | None = None,
                 facts: dict | None = None):
        super().__init__()
        if plan.thresholding is not None:
            raise ExportError(f"scheduler {plan.scheduler!r} uses dynamic thresholding (a per-sample quantile), "
                              "which the unrolled graph does not implement; export the UNet alone instead")
        cfg_unet = unet.config
        if cfg_unet.out_channels != cfg_unet.in_channels:
            raise ExportError(f"the model returns {cfg_unet.out_channels} channels for a {cfg_unet.in_channels}-"
                              "channel sample (learned variance?); the sampler graph needs matching channels")
        facts = facts or {}
        if facts.get("addition_embed_type") or facts.get("time_cond_proj_dim") or facts.get("class_embeddings"):
            raise ExportError("whole-sampler graphs support UNets conditioned by encoder_hidden_states or class "
                              "labels only (not SDXL added conditioning, timestep_cond or class embeddings); "
                              "export the UNet alone and sample with backend='onnxruntime'")
        self.unet = unet
        self.plan = plan
        self.cfg = bool(cfg)
        self.dtype = next(unet.parameters()).dtype
        self.labels = label_model is not None
        if self.labels:
            self.label_embedding = torch.nn.Embedding.from_pretrained(
                label_model.label_embedding.weight.detach().clone().to(self.dtype), freeze=True)
            self.tokens, self.embed_dim = int(label_model.tokens), int(label_model.embed_dim)
            self.null_label = int(label_model.null_label)
        self.register_buffer("timesteps", torch.as_tensor(plan.timesteps, dtype=torch.float32), persistent=False)
        self.noise_steps = [i for i in range(plan.num_steps) if plan.noise_steps()[i]]
        self.input_names = [s.name for s in self.signature(in_channels=cfg_unet.in_channels,
                                                           cross_attention_dim=facts.get("cross_attention_dim"))[0]]

    def signature(self, in_channels: int, cross_attention_dim: int | None) -> tuple[list[TensorSpec],
                                                                                    list[TensorSpec]]:
        dt = "float16" if self.dtype == torch.float16 else "float32"
        sample_dims = ("batch", in_channels, "height", "width")
        inputs = [TensorSpec("noise", dt, sample_dims)]
        if self.labels:
            inputs.append(TensorSpec("class_labels", "int64", ("batch",)))
        else:
            if not cross_attention_dim:
                raise ExportError("unconditional UNets are not supported by whole-sampler graphs yet")
            inputs.append(TensorSpec("encoder_hidden_states", dt, ("batch", "tokens", cross_attention_dim)))
            if self.cfg:
                inputs.append(TensorSpec("negative_encoder_hidden_states", dt, ("batch", "tokens",
                                                                                  cross_attention_dim)))
        if self.cfg:
            inputs.append(TensorSpec("guidance_scale", "float32", (1,)))
        if self.noise_steps:
            inputs.append(TensorSpec("step_noise", dt, (len(self.noise_steps),) + sample_dims))
        return inputs, [TensorSpec("sample", dt, sample_dims)]

    def _conditioning(self, kw: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.labels:
            labels = kw["class_labels"]
            cond = self.label_embedding(labels).view(labels.shape[0], self.tokens, self.embed_dim)
            if not self.cfg:
                return cond
            null = torch.full_like(labels, self.null_label)
            uncond = self.label_embedding(null).view(labels.shape[0], self.tokens, self.embed_dim)
            return torch.cat([uncond, cond])
        cond = kw["encoder_hidden_states"]
        return torch.cat([kw["negative_encoder_hidden_states"], cond]) if self.cfg else cond

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kw = dict(zip(self.input_names, args, strict=True))
        plan, ct, sd = self.plan, torch.float32, self.dtype
        ehs = self._conditioning(kw)
        g = kw["guidance_scale"].to(ct) if self.cfg else None
        step_noise = kw.get("step_noise")
        x = kw["noise"] * plan.init_noise_sigma
        batch = x.shape[0]
        model_in = (x.to(ct) * plan.input_scale0).to(sd) if plan.input_scale0 != 1.0 else x
        hist: dict[int, torch.Tensor] = {}
        saved = torch.zeros_like(x) if plan.uses_saved else None
        for i in range(plan.num_steps):
            k = [float(v) for v in plan.coefs[i]]
            xin = torch.cat([model_in, model_in]) if self.cfg else model_in
            t = self.timesteps[i].expand(xin.shape[0])
            out = run_unet(self.unet, xin, t, {"encoder_hidden_states": ehs})
            if self.cfg:
                u, c = out[:batch].to(ct), out[batch:].to(ct)
                m = u + g * (c - u)
            else:
                m = out.to(ct)
            xf = x.to(ct)
            x0 = _axpy(_axpy(None, k[Col.PX], xf), k[Col.PM], m)
            if x0 is None:
                x0 = torch.zeros_like(xf)
            if plan.clip_range is not None:
                x0 = x0.clamp(-plan.clip_range, plan.clip_range)
            noise = None
            if i in self.noise_steps:
                noise = step_noise[self.noise_steps.index(i)].to(ct)
            hist_f = [hist[j].to(ct) if j in hist else torch.zeros_like(xf) for j in range(HIST_SLOTS)]
            prev = _axpy(_axpy(_axpy(None, k[Col.OX], xf), k[Col.OM], m), k[Col.O0], x0)
            prev = _axpy(prev, k[Col.ON], noise)
            for j in range(HIST_SLOTS):
                prev = _axpy(prev, k[Col.OH0 + j], hist_f[j])
            new_saved = None
            if saved is not None:
                sv = saved.to(ct)
                prev = _axpy(prev, k[Col.OS], sv)
                new_saved = _axpy(_axpy(_axpy(None, k[Col.SX], xf), k[Col.SM], m), k[Col.S0], x0)
                new_saved = _axpy(new_saved, k[Col.SS], sv)
                for j in range(HIST_SLOTS):
                    new_saved = _axpy(new_saved, k[Col.SH0 + j], hist_f[j])
            if prev is None:
                prev = torch.zeros_like(xf)
            if int(k[Col.WSLOT]) >= 0:
                hist[int(k[Col.WSLOT])] = x0.to(sd)
            if new_saved is not None:
                saved = new_saved.to(sd)
            x = prev.to(sd)
            if i + 1 < plan.num_steps:
                model_in = (x.to(ct) * k[Col.IN_NEXT]).to(sd)
        return x


def make_plan(source, sampler, steps: int | None = None) -> tuple[StepPlan, str]:
    """The StepPlan of a ``--sampler`` spec (``"onestep"``, ``"lcm4"``, ``"dpmpp_2m:8"``) or a Scheduler object,
    on the model's own noise schedule (its scheduler config). Without a count: 1 step for one-step schedulers,
    else 4. Returns (plan, a label such as ``"lcm:4"``)."""
    from fastdiff.export.profiles import parse_sampler_spec
    from fastdiff.schedulers import Scheduler, get_scheduler

    if isinstance(sampler, Scheduler):
        sched, n = sampler, steps or 1
    else:
        name, count = parse_sampler_spec(str(sampler))
        sched = get_scheduler(name, config=source.scheduler_config or None)
        n = steps or count or (1 if name.startswith("onestep") else 4)
    return sched.plan(n), f"{sched.name}:{n}"


def sampler_graph(source, profile, sampler, steps: int | None = None, guidance_scale: float | None = None):
    """A :class:`~fastdiff.export.onnx.GraphExport` of the unrolled sampling loop (see the module docstring).

    ``guidance_scale`` defaults to the model's default, then the profile's ``[sampler]`` value, then 1 (no CFG);
    with CFG it is a graph input whose value can change per call (the default goes to the metadata)."""
    import json

    from fastdiff.export.onnx import GraphExport, base_metadata, model_copy

    plan, label = make_plan(source, sampler, steps)
    if guidance_scale is None:
        guidance_scale = source.defaults.get("guidance_scale", profile.sampler.get("guidance_scale", 1.0))
    conditional = bool(source.facts.get("cross_attention_dim"))
    cfg = conditional and float(guidance_scale) > 1.0
    facts = source.facts
    module = UnrolledSampler(model_copy(source.unet, profile.precision), plan, cfg, source.label_model, facts)
    ref = UnrolledSampler(model_copy(source.unet, "fp32"), plan, cfg, source.label_model, facts)
    inputs, outputs = module.signature(facts["in_channels"], facts.get("cross_attention_dim"))

    def reference(args: list[torch.Tensor]) -> torch.Tensor:
        return ref(*[a.float() if a.is_floating_point() else a for a in args])

    dims = {k: v for k, v in profile.dims.items() if any(k in s.dims for s in inputs)}
    meta = base_metadata("sampler", source, profile, inputs, outputs, profile.precision)
    meta["fastdiff.sampler"] = json.dumps({
        "spec": label, "scheduler": plan.scheduler, "steps": plan.num_steps, "cfg": cfg,
        "guidance_scale": float(guidance_scale), "timesteps": [float(t) for t in plan.timesteps],
        "noise_steps": module.noise_steps, "init_noise_sigma": float(plan.init_noise_sigma),
        "prediction_type": plan.prediction_type, "config": plan.config})
    ranges = {"class_labels": (0, int(facts.get("num_classes") or 10)),
              "guidance_scale": (float(guidance_scale), float(guidance_scale))}
    return GraphExport(f"{source.name}-{label.replace(':', '')}", "sampler", module, reference, inputs, outputs,
                       dims, profile.precision, profile.opset, meta, ranges), plan
