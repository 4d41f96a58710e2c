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
