"""pdserve.kernels: Triton kernels, each file the kernel, its launcher and its pure-torch `*_ref`.

May import: torch and triton only (the bottom layer: nothing of pdserve).

Why the code below: when the repository root is on sys.path (`python -m ...` run from a checkout,
pytest), this directory is also importable as a top-level `kernels`, the import name of Hugging
Face's kernel-hub package. transformers (>= 5) depends on that package and imports it at start-up
(`from kernels import ...`), so it would get pdserve's kernels instead and fail. Imported under
that bare name, this module hands the import over to the real package when one is installed
elsewhere on sys.path; pdserve itself only ever imports `pdserve.kernels`.
"""

import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real  # the import statement returns whatever sys.modules holds
        _spec.loader.exec_module(_real)
