"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small to split: on a busy CPU two threads run 100x slower. One
    thread also matches scripted.py's subprocesses, so that both compute the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
