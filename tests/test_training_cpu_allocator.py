"""`fast_llm_supernet.training.cpu_allocator`: the glibc setting applies once per process and changes no result."""

import sys

import pytest
import torch

from fast_llm_supernet.training import cpu_allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_applies_once_and_allocations_still_work():
    assert cpu_allocator.keep_freed_memory() in (True, False)  # False only off glibc
    assert cpu_allocator.keep_freed_memory() is cpu_allocator.keep_freed_memory()  # once per process
    big = torch.ones(4, 9, 4, 64, 64)  # above the old 128 KiB threshold: now from the heap
    assert big.sum().item() == big.numel()
