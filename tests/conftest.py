"""Suite-wide settings.

Tiny models run far faster on one intra-op thread than on two competing ones (each small op pays
the thread hand-off), and the results do not depend on it. vLLM engines run in their own
processes and set their own threads.
"""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    try:
        import torch
    except ImportError:  # shared_spec tests need no torch
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
