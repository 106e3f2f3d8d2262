"""Root test configuration: make the repository's `engine` package importable as `engine`.

`tests/engine/` is itself a package (it has an `__init__.py`) and `tests/` is not, so pytest's default
"prepend" import mode would import `tests/engine` under the top-level name `engine` and shadow the real
engine. Import the real package first and let it also serve the test modules of `tests/engine/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_real_engine() -> None:
    if str(ROOT) in sys.path:
        sys.path.remove(str(ROOT))
    sys.path.insert(0, str(ROOT))
    import engine

    real = ROOT / "engine"
    if Path(engine.__file__).resolve().parent != real:
        raise RuntimeError(f"`engine` resolved to {engine.__file__}, expected the package in {real}")
    tests_dir = str(ROOT / "tests" / "engine")
    if tests_dir not in engine.__path__:
        # pytest imports tests/engine/test_x.py as `engine.test_x`: find those modules in the real package.
        engine.__path__.append(tests_dir)


_import_real_engine()
