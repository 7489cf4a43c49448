from __future__ import annotations

import pytest
import torch

from worker.models.registry import ModelRegistry
from worker.settings import default_models


@pytest.fixture(scope="session")
def registry() -> ModelRegistry:
    """Both tiny pipelines, built once for the session, on the CPU in float32."""
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32, max_cached=2)
