import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny nets: intra-op threads only add synchronization (on a loaded 2-core
    machine, 100x slower). The previous setting is restored for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
