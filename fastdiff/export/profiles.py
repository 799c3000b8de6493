"""Export profiles: per model family, the input shapes an export / engine must serve (min, opt, max per dimension),
the precision and the builder settings. They live as TOML files in the top-level ``export/`` folder
(``digits.toml``, ``sd15.toml``, ``sdxl.toml``, ``sd-turbo.toml``) or anywhere a path points to.

Named dimensions (sizes in *model-input* units: latent elements for latent UNets, pixels for pixel models)::

    batch   the model batch (2 x images under classifier-free guidance) - or images, for whole-sampler graphs
    height  sample height          (a multiple of the UNet's down-sampling factor)
    width   sample width
    tokens  encoder_hidden_states length

A *request* (``--batch 1:2:4``, ``--height 64``) narrows a profile; one that leaves the profile's range fails
before any export or build, naming the dimension and the range.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fastdiff.errors import InvalidInput
from fastdiff.exported.specs import DimRange

DIM_NAMES = ("batch", "height", "width", "tokens")
PRECISIONS = ("fp32", "fp16")
MIN_OPSET = 18  # the dynamo exporter's lowest supported opset
_REPO_PROFILES = Path(__file__).resolve().parents[2] / "export"
_PACKAGED_PROFILES = Path(__file__).resolve().parent / "profiles"  # copied there by setup.py's build_py


def profile_dirs() -> list[Path]:
    """Folders searched for ``<name>.toml``: ``$FASTDIFF_PROFILE_DIR`` (os.pathsep-separated), then the
    repository's top-level ``export/`` (a checkout / editable install), then the copy shipped in the wheel."""
    dirs = [Path(p) for p in os.environ.get("FASTDIFF_PROFILE_DIR", "").split(os.pathsep) if p]
    return dirs + [d for d in (_REPO_PROFILES, _PACKAGED_PROFILES) if d.is_dir()] or dirs + [_REPO_PROFILES]


def _toml_loads(text: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise InvalidInput("reading export profiles on Python 3.10 needs the 'tomli' package: "
                               "pip install tomli (Python >= 3.11 has tomllib built in)") from e
    return tomllib.loads(text)


def parse_dim(name: str, text: str | int) -> DimRange:
    """``"8"`` (static), ``"1:8"`` (min:max, opt = min) or ``"1:2:8"`` (min:opt:max) as a :class:`DimRange`."""
    if isinstance(text, int):
        return DimRange(name, text, text, text)
    parts = str(text).strip().split(":")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) == 1:
        return DimRange(name, vals[0], vals[0], vals[0])
    if len(vals) == 2:
        return DimRange(name, vals[0], vals[0], vals[1])
    if len(vals) == 3:
        return DimRange(name, vals[0], vals[1], vals[2])
    raise InvalidInput(f"--{name} {text!r}: expected N, MIN:MAX or MIN:OPT:MAX (integers), e.g. --{name} 1:2:8")


@dataclass(frozen=True)
class ExportProfile:
    """One export profile (see the module docstring); ``model`` holds what the profile expects of the model
    (``in_channels``, ``cross_attention_dim``, ``addition_embed_type`` ...), checked by :meth:`check_model`."""

    name: str
    family: str
    dims: dict[str, DimRange]
    precision: str = "fp32"
    opset: int = MIN_OPSET
    description: str = ""
    latent_scale: int = 1
    model: dict[str, Any] = field(default_factory=dict)
    tensorrt: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InvalidInput(f"profile {self.name!r}: precision must be one of {PRECISIONS}, got "
                               f"{self.precision!r}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise InvalidInput(f"profile {self.name!r}: opset must be an integer >= {MIN_OPSET} (the dynamo "
                               f"exporter's minimum), got {self.opset!r}")
        unknown = set(self.dims) - set(DIM_NAMES)
        if unknown:
            raise InvalidInput(f"profile {self.name!r}: unknown dimensions {sorted(unknown)}; known: {DIM_NAMES}")

    def dim(self, name: str) -> DimRange:
        if name not in self.dims:
            raise InvalidInput(f"profile {self.name!r} has no range for dimension {name!r} (it defines "
                               f"{sorted(self.dims)}); add one under [dims] in {self.source or 'the profile'}")
        return self.dims[name]

    def narrowed(self, **requests: DimRange | str | int | None) -> ExportProfile:
        """This profile with some dimensions narrowed to a request; raises :class:`InvalidInput` (naming the
        dimension and the profile's range) when a request leaves the profile's range."""
        dims = dict(self.dims)
        for name, req in requests.items():
            if req is None:
                continue
            if not isinstance(req, DimRange):
                req = parse_dim(name, req)
            dims[name] = self.dim(name).narrow(req, f"profile {self.name!r}", self.latent_scale)
        return replace(self, dims=dims)

    def with_overrides(self, precision: str | None = None, opset: int | None = None) -> ExportProfile:
        return replace(self, precision=precision or self.precision, opset=opset or self.opset)

    def check_model(self, facts: dict[str, Any]) -> None:
        """Raise :class:`InvalidInput` when the model's ``facts`` (same keys as ``[model]``) differ from what the
        profile expects."""
        bad = [f"{k}: profile expects {v!r}, the model has {facts.get(k)!r}" for k, v in self.model.items()
               if k in facts and facts[k] != v]
        if bad:
            raise InvalidInput(f"the model does not match export profile {self.name!r} ({self.source}):\n  - "
                               + "\n  - ".join(bad) + "\nPick the matching profile with --profile, or pass none to "
                               "derive one from the model.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dims"] = {k: v.as_list() for k, v in self.dims.items()}
        d.pop("source")
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): stored in the ONNX metadata and hashed into engine cache keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> ExportProfile:
        """From parsed TOML (``[dims]`` values ``{min, opt, max}`` tables or ``[min, opt, max(, multiple)]``
        lists) or from :meth:`to_dict`."""
        name = d.get("name") or Path(source).stem or "profile"
        known = {"name", "family", "description", "precision", "opset", "latent_scale", "model", "dims",
                 "tensorrt", "sampler"}
        unknown = set(d) - known
        if unknown:
            raise InvalidInput(f"profile {name!r} ({source}): unknown keys {sorted(unknown)}; known: {sorted(known)}")
        dims = {}
        for k, v in dict(d.get("dims", {})).items():
            if isinstance(v, dict):
                lo = v.get("min")
                dims[k] = DimRange(k, lo, v.get("opt", lo), v.get("max", lo), v.get("multiple", 1))
            elif isinstance(v, (list, tuple)) and len(v) in (3, 4):
                dims[k] = DimRange(k, *v)
            elif isinstance(v, int):
                dims[k] = DimRange(k, v, v, v)
            else:
                raise InvalidInput(f"profile {name!r} ({source}): dims.{k} must be {{min, opt, max}}, got {v!r}")
        return cls(name=name, family=d.get("family", name), dims=dims, precision=d.get("precision", "fp32"),
                   opset=d.get("opset", MIN_OPSET), description=d.get("description", ""),
                   latent_scale=int(d.get("latent_scale", d.get("model", {}).get("latent_scale", 1))),
                   model={k: v for k, v in dict(d.get("model", {})).items() if k != "latent_scale"},
                   tensorrt=dict(d.get("tensorrt", {})), sampler=dict(d.get("sampler", {})), source=source)


def available_profiles() -> dict[str, Path]:
    """Profile name -> file, over :func:`profile_dirs` (earlier folders win)."""
    found: dict[str, Path] = {}
    for d in reversed(profile_dirs()):
        if d.is_dir():
            found.update({p.stem: p for p in sorted(d.glob("*.toml"))})
    return found


def load_profile(name_or_path: str | os.PathLike) -> ExportProfile:
    """A profile by name (``"sd15"``) or from a ``.toml`` path."""
    s = os.fspath(name_or_path)
    path = Path(s)
    if not (s.endswith(".toml") or path.is_file()):
        known = available_profiles()
        if s not in known:
            raise InvalidInput(f"unknown export profile {s!r}; known: {', '.join(sorted(known)) or 'none'} (searched "
                               f"{', '.join(map(str, profile_dirs()))}), or pass a path to a .toml file")
        path = known[s]
    try:
        data = _toml_loads(path.read_text())
    except OSError as e:
        raise InvalidInput(f"cannot read export profile {str(path)!r}: {e}") from e
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise InvalidInput(f"export profile {str(path)!r} is not valid TOML: {e}") from e
    return ExportProfile.from_dict(data, source=str(path))


def auto_profile(facts: dict[str, Any], name: str = "auto") -> ExportProfile:
    """A profile derived from the model itself (when no family profile fits): batch 1..8 (opt 2), height / width
    from half to twice the trained size (opt: the trained size), tokens 1..512 (opt 77)."""
    s = int(facts.get("sample_size") or 64)
    dims = {"batch": DimRange("batch", 1, 2, 8),
            "height": DimRange("height", max(1, s // 2), s, 2 * s),
            "width": DimRange("width", max(1, s // 2), s, 2 * s)}
    if facts.get("cross_attention_dim"):
        t = int(facts.get("tokens") or 77)
        dims["tokens"] = DimRange("tokens", 1, t, max(t, 512))
    return ExportProfile(name=name, family=facts.get("family", "custom"), dims=dims,
                         description="derived from the model's config", source="(derived from the model)")


def infer_family(facts: dict[str, Any]) -> str | None:
    """The profile name for a model's config facts: ``digits``, ``sd15``, ``sdxl``, ``sd-turbo`` or None."""
    if facts.get("family") == "digits":
        return "digits"
    if facts.get("in_channels") != 4:
        return None
    d, add = facts.get("cross_attention_dim"), facts.get("addition_embed_type")
    if d == 768 and add is None:
        return "sd15"
    if d == 2048 and add == "text_time":
        return "sdxl"
    if d == 1024 and add is None:
        return "sd-turbo"  # SD 2.x architecture (sd-turbo is a distilled SD 2.1)
    return None


def parse_sampler_spec(spec: str) -> tuple[str, int | None]:
    """``"onestep"`` -> ("onestep", None); ``"lcm4"`` / ``"lcm:4"`` -> ("lcm", 4); ``"dpmpp_2m:20"``.

    The name must be a fastdiff scheduler name (:data:`fastdiff.schedulers.NAMES`); a step count written right
    after it (``lcm4``) works when the name itself does not end in a digit, ``name:N`` always works."""
    from fastdiff.schedulers import NAMES

    s = spec.strip().lower()
    name, _, count = s.partition(":")
    if not count:
        m = re.match(r"^(.*?)(\d+)$", s)
        if s not in NAMES and m and m.group(1) in NAMES:
            name, count = m.group(1), m.group(2)
    if name not in NAMES or (count and not count.isdigit()) or count == "0":
        raise InvalidInput(f"--sampler {spec!r}: expected a scheduler name with an optional step count, e.g. "
                           f"onestep, lcm4, lcm:4, dpmpp_2m:20; names: {', '.join(NAMES)}")
    return name, (int(count) if count else None)
