"""Suite-wide hooks: `gpu` tests run only where CUDA is present; CPU threads are kept modest."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
