"""Loader of the optional native CPU ops (the C++ sources in ``csrc/``).

The ops are compiled with torch's extension builder and ninja the first time they are asked for, into a
cache directory, and registered with ``TORCH_LIBRARY`` under ``torch.ops.dmpo_fast`` (so ``torch.compile``
and ``torch.library.opcheck`` see them; their fake kernels are registered here). Nothing is built or loaded
when ``dmpo_fast`` is imported.

When they are used:
- ``impl="native"`` loads them, compiling first if the cache holds no build for these sources (about a
  minute on two cores). A missing compiler or ninja, or a failed build, gives ONE warning per process and
  the op falls back to ``impl="chunked"``; the package never fails because of it.
- ``impl="auto"`` on CPU uses them only when they are already loaded in this process or a finished build
  of these exact sources is in the cache (loading it takes milliseconds); it never compiles by itself, so a
  default call never stalls for a minute. ``DMPO_FAST_NATIVE=1`` lets ``auto`` build them at first use too
  (and warn once if that fails); ``DMPO_FAST_NATIVE=0`` turns the native ops off everywhere (``native``
  then falls back to ``chunked`` with the warning).

Cache: ``$TORCH_EXTENSIONS_DIR/dmpo_fast`` when that variable is set, else ``$XDG_CACHE_HOME/dmpo_fast``
(default ``~/.cache/dmpo_fast``); one sub-directory per (torch version, source and flag hash), so a changed
source or another torch never loads a stale build. Builds of one directory are serialised by torch's lock
file, so parallel processes can start together.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

logger = logging.getLogger("dmpo_fast")

LIB_NAME = "dmpo_fast_native"
SOURCES = ("denoise_step.cpp", "linear_ce.cpp")
HEADERS = ("philox.h",)
ENV_SWITCH = "DMPO_FAST_NATIVE"
_STAMP = "build.ok"  # written after a build loaded; its presence means "a finished build is here"

# Process state. Tests reset these with monkeypatch to simulate a failed build.
_state = "unloaded"  # "unloaded" | "loaded" | "failed"
_failure: str | None = None
_warned = False
_fakes_registered = False
_cache_checked = False  # a silent look into the cache found no build: auto need not look again


# --------------------------------------------------------------------------------------------------
# Where the sources and the build live
# --------------------------------------------------------------------------------------------------


def source_dir() -> Path | None:
    """The folder holding the C++ sources: ``dmpo_fast/csrc`` in an installed wheel, else the repository's
    ``csrc/`` next to the package (editable install or checkout); None when neither has them."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / f).is_file() for f in SOURCES + HEADERS):
            return candidate
    return None


def _x86_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's own parallel backend is OpenMP (Linux wheels). ``at::parallel_for`` is a
    header template: compiled without OpenMP it runs every range on the calling thread, so the ops would use
    one core whatever ``torch.set_num_threads`` says. The OpenMP runtime is torch's, already loaded."""
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def compile_flags() -> list[str]:
    """Compiler flags. -ffp-contract=off keeps z·(1/T) + g two roundings, as in torch, so tokens match the
    reference. On CPUs where torch itself dispatches AVX-512 kernels the ATen vector types are 16-wide
    (``DMPO_FAST_AVX512=0`` builds the AVX2 variant instead), with AVX2 8-wide; either way exp / log are SLEEF's
    1-ulp routines, the same torch's CPU kernels call, in a renamed namespace so they never clash with torch's."""
    flags = ["-O3", "-ffp-contract=off"] + _openmp_flags()
    if _x86_avx2() and torch.backends.cpu.get_cpu_capability() == "AVX512" and os.environ.get("DMPO_FAST_AVX512") != "0":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY=dmpo_fast_avx512", "-DCPU_CAPABILITY_AVX512"]  # fmt: skip
    elif _x86_avx2():
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=dmpo_fast_avx2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def cache_root() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "dmpo_fast"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmpo_fast"


def build_dir(src: Path) -> Path:
    """One directory per torch version, Python version and hash of the sources and flags."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    h.update(" ".join(compile_flags()).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
    torch_tag = torch.__version__.split("+")[0]
    return (
        cache_root()
        / f"native-torch{torch_tag}-py{sys.version_info[0]}{sys.version_info[1]}-{h.hexdigest()[:16]}"
    )


def _library_path(directory: Path) -> Path:
    return directory / (LIB_NAME + (".pyd" if sys.platform == "win32" else ".so"))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    """Shapes of the outputs without running the ops (FakeTensor / torch.compile / opcheck)."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("dmpo_fast::sample_rows")
    def _sample_rows_fake(logits, pos, row_key, step, seed, inv_t, logit_scale, mask_id):
        n = logits.shape[0]
        return logits.new_empty(n, dtype=torch.int64), logits.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("dmpo_fast::denoise_step")
    def _denoise_step_fake(logits, x, active, rows, step, num_transfer, position_offset, seed, inv_t,
                           logit_scale, mask_id, threshold, factor, random_remask):  # fmt: skip
        return torch.empty_like(x), torch.empty_like(active), x.new_empty(x.shape, dtype=torch.float32)

    @torch.library.register_fake("dmpo_fast::ce_rows_")
    def _ce_rows_fake(logits, targets, weights, grad):
        return logits.new_empty(logits.shape[0])

    @torch.library.register_fake("dmpo_fast::logprob_rows")
    def _logprob_rows_fake(logits, targets):
        return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0])

    @torch.library.register_fake("dmpo_fast::logprob_grad_rows_")
    def _logprob_grad_rows_fake(logits, targets, lse, grad):
        return None

    _fakes_registered = True


def _load_library(build: bool) -> bool:
    """Load the ops from the cache, compiling them first when ``build``; True when loaded.

    Returns False (no exception) when ``build`` is False and no finished build is cached. Raises with the
    reason when a build is needed and cannot be made.
    """
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed with this copy of dmpo_fast")
    directory = build_dir(src)
    lib = _library_path(directory)
    if (directory / _STAMP).is_file() and lib.is_file():
        torch.ops.load_library(str(lib))
        return True
    if not build:
        return False
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {compiler!r}; set CXX to choose one)")
    from torch.utils import cpp_extension  # noqa: PLC0415  (heavy import, only when building)

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("dmpo_fast: compiling the native CPU ops in %s (first use; about a minute)", directory)
    cpp_extension.load(
        name=LIB_NAME,
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=compile_flags(),
        extra_ldflags=_openmp_flags(),
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    (directory / _STAMP).write_text(torch.__version__ + "\n")
    return True


def _warn_once(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"dmpo_fast: the native CPU ops are unavailable ({reason}); using impl='chunked' instead. "
        f"Set {ENV_SWITCH}=0 to skip them without this warning.",
        RuntimeWarning,
        stacklevel=4,
    )


def load(*, build: bool = True) -> bool:
    """Make ``torch.ops.dmpo_fast`` ready; True when the native ops can be called.

    With ``build`` a missing build is compiled, and a failure (or ``DMPO_FAST_NATIVE=0``) warns once per
    process; without it only a finished cached build is loaded, silently.
    """
    global _state, _failure, _cache_checked
    if _state == "loaded":
        return True
    if not build and (_cache_checked or _state == "failed"):
        return False
    if os.environ.get(ENV_SWITCH, "").strip() == "0":
        if build:
            _warn_once(f"{ENV_SWITCH}=0")
        return False
    if _state == "failed":
        if build:
            _warn_once(_failure or "the build failed")
        return False
    try:
        ok = _load_library(build)
    except Exception as e:  # any failure of the compiler, ninja or dlopen: fall back, never raise
        _state, _failure = "failed", _short(e)
        if build:
            _warn_once(_failure)
        return False
    if ok:
        _register_fakes()
        _state = "loaded"
    else:
        _cache_checked = True
    return ok


def _short(e: Exception) -> str:
    """The exception in one line: a compiler log can be thousands of lines long."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower()]  # the compiler's first diagnostic
    text = (errors[0] if errors else lines[-1] if lines else type(e).__name__)[:300]
    return f"{type(e).__name__}: {text}"


def is_loaded() -> bool:
    """Whether the native ops are loaded in this process (never builds or loads anything)."""
    return _state == "loaded"


def usable_for_auto() -> bool:
    """Whether ``impl="auto"`` on CPU takes the native path (see the module docstring)."""
    if _state == "loaded":
        return True
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if switch == "0":
        return False
    return load(build=switch == "1")
