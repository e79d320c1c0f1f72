"""Loss tests run on tiny tensors: intra-op threads would only add wake-up latency (large on a
busy 2-core box), so the tests that ask for it run single-threaded."""

import pytest
import torch


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
