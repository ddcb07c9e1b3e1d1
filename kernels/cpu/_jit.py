"""JIT build of the CPU kernels with torch.utils.cpp_extension.load.

The C++ wrappers include only the stable-ABI headers (torch/csrc/stable/*), never torch/extension.h:
a cold build takes about 2 s instead of about 26 s. The .so is cached by torch in
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and rebuilt only when a source or flag changes.
"""
import os
import platform
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))

_cache: dict = {}


def load_extension(name: str, sources: list[str], extra_cflags: list[str] | None = None) -> tuple[bool, str]:
    """Build (once per process) and load an extension registering torch.ops.<name>.*.

    extra_cflags are added to the common flags (e.g. -ffp-contract=fast for code that relies on FMA contraction).
    Returns (ok, reason). Never raises: the caller decides whether a failure is fatal.
    """
    if name in _cache:
        return _cache[name]
    ok, reason = False, ""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"CPU kernels need x86-64, this machine is {platform.machine()}"
    elif shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        reason = "no C/C++ compiler found (install gcc/g++)"
    elif missing := [s for s in sources if not os.path.isfile(os.path.join(HERE, s))]:
        reason = f"kernel sources missing: {', '.join(missing)} (is the package installed completely?)"
    elif shutil.which("ninja") is None:
        reason = "ninja is missing (pip install ninja)"
    else:
        try:
            from torch.utils.cpp_extension import load

            load(
                name=name,
                sources=[os.path.join(HERE, s) for s in sources],
                extra_cflags=["-O3", "-fopenmp", "-std=c++17", *(extra_cflags or [])],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            ok = True
        except Exception as e:  # compiler errors, missing headers, ...
            reason = f"building the {name} kernels failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    _cache[name] = (ok, reason)
    return ok, reason
