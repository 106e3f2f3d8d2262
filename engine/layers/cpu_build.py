"""Builds the C sources in csrc/ with the host's C compiler at first use (well under a second each) and loads
them through ctypes. `-march=native` targets this very CPU (AVX-512 / avx512_bf16 where present); where no
compiler exists, or a build fails, callers get None and keep their pure-torch twins.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -ffast-math's parts, not the flag itself: linked with -ffast-math, a shared library (GCC < 13) runs crtfastmath's
# constructor at load, which turns flush-to-zero/denormals-are-zero on for the whole process (then `5e-324 > 0` is
# False in Python, and torch's own results change).
_FAST_MATH = (
    "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math", "-freciprocal-math",
    "-ffinite-math-only", "-fcx-limited-range",
)  # fmt: skip
_FLAGS = ("-O3", "-march=native", *_FAST_MATH, "-fopenmp", "-shared", "-fPIC")


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """csrc/<name>.c compiled and loaded, or None (logged once) where it cannot be built here."""
    source = CSRC / f"{name}.c"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not source.is_file():
        logger.info("no C compiler or no %s: the pure-torch path runs instead", source.name)
        return None
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        lib_path = Path(tmp) / f"{name}.so"
        cmd = [compiler, *_FLAGS, "-o", str(lib_path), str(source), "-lm"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
            return ctypes.CDLL(str(lib_path))  # mapped now: the file may go with the directory
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            logger.warning("%s did not build (%s): the pure-torch path runs instead", source.name, detail)
            return None


def bind(lib: ctypes.CDLL, symbols: list[str], argtypes: list) -> None:
    """Declare the argument types of each symbol (all return void)."""
    for symbol in symbols:
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = argtypes, None
