"""DeepSpeed's CPU all-reduce leaves a shared-memory buffer per rank in /dev/shm (RAM) after every
run; tests start many runs, so each test removes the ones it created."""
from __future__ import annotations

from pathlib import Path

import pytest

SHM = Path("/dev/shm")


@pytest.fixture(autouse=True)
def release_deepspeed_shared_memory():
    before = set(SHM.glob("deepspeed_allreduce_buffer_*")) if SHM.is_dir() else set()
    yield
    if SHM.is_dir():
        for leftover in set(SHM.glob("deepspeed_allreduce_buffer_*")) - before:
            leftover.unlink(missing_ok=True)
