"""`make bench`: run every benchmarks/*.py module that has a ``main()``, one after another.

Each module reads its own knobs (arguments default from the environment, e.g.
BENCH_MESSAGES for the throughput run), so this runner passes none.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("__init__", "run"))
    failed = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        entry = getattr(module, "main", None)
        if not callable(entry):
            continue
        print(f"== benchmarks.{name}", flush=True)
        try:
            params = inspect.signature(entry).parameters
            entry([]) if "argv" in params else entry()
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            print(f"benchmarks.{name} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
