"""The newer families on a worker SIGKILLed mid-job (Chroma, Flux.2 klein, Z-Image): the job resumes elsewhere
to the uninterrupted pixels (`test_resume_families.killed_and_resumed`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faults.conftest import ChaosFarm
from tests.faults.test_resume_families import killed_and_resumed

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.mark.parametrize("model", ["tiny-chroma", "tiny-flux2", "tiny-z-image"])
def test_a_job_killed_after_a_checkpoint_resumes_elsewhere_with_the_uninterrupted_pixels(
    chaos_farm: Callable[..., ChaosFarm], model: str
) -> None:
    killed_and_resumed(chaos_farm(), model)
