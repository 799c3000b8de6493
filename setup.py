"""Builds the compiled parts of fastdiff (metadata lives in pyproject.toml).

- ``fastdiff._C_cpu``: csrc/cpu/*.cpp + csrc/bindings_cpu.cpp, C++17 + OpenMP, portable flags (no -march=native;
  the hot loop carries its own AVX2 clone). ``FASTDIFF_CPU=0`` skips it.
- ``fastdiff._C_cuda``: csrc/cuda/*.cu (nvcc, sm_80 + sm_90 + PTX) + csrc/bindings_cuda.cpp, CUDA runtime linked
  statically so the module imports without a GPU or toolkit. Built when nvcc is found; ``FASTDIFF_CUDA=0`` skips
  it, ``FASTDIFF_CUDA=1`` requires it (a failure then fails the install; otherwise it is a warning).
  ``FASTDIFF_CUDA_ARCHS="80;90"`` picks the architectures (PTX is emitted for the last one).

No torch headers anywhere: the modules take raw addresses, so one build serves any torch version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")  # relative: setuptools wants relative source paths


def _env_flag(name: str) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return "0"
    if value in ("1", "true", "yes", "on"):
        return "1"
    raise SystemExit(f"{name} must be 0, 1 or auto, got {os.environ[name]!r}")


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _cuda_home(nvcc: str) -> Path | None:
    """The toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper script outside it)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parent.parent,
                  "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def _cudart_static_dir(home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib/x64"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    return None


def _cuda_archs() -> list[str]:
    raw = os.environ.get("FASTDIFF_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"FASTDIFF_CUDA_ARCHS must look like '80;90', got {raw!r}")
    return archs


def _gencode(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the newest architecture, JIT-compiled by the driver on GPUs newer than the list
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


# No FMA contraction (here and in nvcc's --fmad=false): the kernels then round exactly like the separate multiplies
# and adds of the torch reference, so fp16 / bf16 results match it bit for bit instead of flipping a last bit now
# and then. The op is memory-bound; the lost FMAs cost nothing measurable.
CXX_FLAGS = ["-std=c++17", "-O3", "-fvisibility=hidden", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=off", "-DNDEBUG", "-g0"]


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc and treats the CUDA module as optional."""

    def build_extensions(self):
        self._skipped = set()
        super().build_extensions()
        # Later steps (copy to the source tree for --inplace, the wheel's file list) must not look for a module
        # that was skipped.
        self.extensions = [e for e in self.extensions if e.name not in self._skipped]

    def build_extension(self, ext):
        if ext.name != "fastdiff._C_cuda":
            return super().build_extension(ext)
        strict = _env_flag("FASTDIFF_CUDA") == "1"
        try:
            self._build_cuda(ext)
        except Exception as e:  # noqa: BLE001 - an optional module: report and go on unless it was required
            if strict:
                raise
            self._skipped.add(ext.name)
            msg = (f"fastdiff: building the CUDA module failed ({type(e).__name__}: {e}); installing without it "
                   "(the cuda backend will report this). Set FASTDIFF_CUDA=1 to make this an error.")
            print(f"WARNING: {msg}", file=sys.stderr)

    def _build_cuda(self, ext):
        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        home = _cuda_home(nvcc)
        if home is None:
            raise RuntimeError(f"no CUDA toolkit headers found for {nvcc} (set CUDA_HOME)")
        libdir = _cudart_static_dir(home)
        if libdir is None:
            raise RuntimeError(f"libcudart_static.a not found under {home}")
        # The instantiation table is generated; regenerate so a stale checkout cannot build old code.
        subprocess.check_call([sys.executable, str(ROOT / "csrc" / "cuda" / "gen_instantiations.py")])

        archs = _cuda_archs()
        cu = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        objects = []
        build_temp = Path(self.build_temp) / "cuda"
        build_temp.mkdir(parents=True, exist_ok=True)
        for src in cu:
            obj = build_temp / (Path(src).stem + ".o")
            deps = [ROOT / src, *(p for ext in ("*.h", "*.cuh", "*.inc") for p in (ROOT / "csrc").rglob(ext))]
            if self.force or not obj.exists() or any(d.stat().st_mtime > obj.stat().st_mtime for d in deps):
                cmd = [nvcc, "-c", str(ROOT / src), "-o", str(obj), "-std=c++17", "-O3", "-DNDEBUG", "--fmad=false",
                       f"-I{ROOT / CSRC}", "-Xcompiler", "-fPIC,-fvisibility=hidden", *_gencode(archs)]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.extra_objects = objects
        ext.depends = [*ext.depends, *objects]  # relink when an object changed, even if the bindings did not
        ext.include_dirs = [*ext.include_dirs, str(home / "include")]
        ext.library_dirs = [*ext.library_dirs, str(libdir)]
        # Static runtime: the module needs only the driver (libcuda, dlopen-ed at first use), not a toolkit.
        ext.libraries = [*ext.libraries, "cudart_static", "rt", "pthread", "dl"]
        ext.define_macros = [*ext.define_macros, ("FASTDIFF_CUDA_ARCHS", f'"{";".join(archs)}"')]
        super().build_extension(ext)


def _extensions() -> list[Extension]:
    exts = []
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.h"))
    common = dict(include_dirs=[str(CSRC), pybind11.get_include()], language="c++", depends=headers)
    if _env_flag("FASTDIFF_CPU") != "0":
        exts.append(Extension(
            "fastdiff._C_cpu",
            sources=[*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")),
                     str(CSRC / "bindings_cpu.cpp")],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            **common,
        ))
    cuda = _env_flag("FASTDIFF_CUDA")
    if cuda == "1" or (cuda is None and _find_nvcc() is not None):
        exts.append(Extension(
            "fastdiff._C_cuda",
            sources=[str(CSRC / "bindings_cuda.cpp"),
                     *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))],
            extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-DNDEBUG", "-g0"],
            **common,
        ))
    return exts


class BuildPy(build_py):
    """Ships the top-level export profiles (export/*.toml) inside the package as fastdiff/export/profiles/."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "fastdiff" / "export" / "profiles"
        dest.mkdir(parents=True, exist_ok=True)
        for profile in sorted((ROOT / "export").glob("*.toml")):
            shutil.copy2(profile, dest / profile.name)


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
