import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs `-n auto`) every worker, and every CLI process it
# starts, trains with one thread: N workers on N cores instead of N² threads fighting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
CIFAR10_DIR = Path(
    os.environ.get("DTP_SEARCH_CIFAR10", REPO.parent / "shared" / "data" / "cifar10")
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cifar10_dir() -> Path:
    if not (CIFAR10_DIR / "train").is_dir():
        pytest.skip(f"no local CIFAR-10 ImageFolder copy at {CIFAR10_DIR}")
    return CIFAR10_DIR
