import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_tiny_bundle(tmp_path_factory):
    """One tiny_bundle (default sets) per test session, for tests that only read it or copy it."""
    from helpers import tiny_bundle

    return tiny_bundle(tmp_path_factory.mktemp("shared-bundle") / "bundle")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one torch thread, above all on a busy machine (child
    processes started by a test get the same count, so outputs compare bit for bit)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
