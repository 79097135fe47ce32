"""Process settings: the C library's reuse of freed memory."""
import platform
import sys

import pytest
import torch

from diffuseseg.runtime import keep_freed_memory

glibc = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                           reason="keep_freed_memory tunes glibc's malloc; this is not a glibc Linux")


def _mapping_of(address: int) -> str:
    """The /proc/self/maps line of the mapping that holds ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= address < hi:
                return line
    raise AssertionError(f"address {address:#x} is in no mapping")


@glibc
def test_keeping_freed_memory_serves_large_tensors_from_the_heap():
    """glibc maps a block over its largest mmap threshold (32 MB) on its own unless told to keep freed memory;
    kept, it comes from the heap (where a later one reuses it). Whether the default maps the next one anew
    depends on what earlier tests left free in the heap, so only the setting's return value is checked."""
    try:
        assert keep_freed_memory(True)
        kept = torch.empty(48 << 20, dtype=torch.uint8)
        assert "[heap]" in _mapping_of(kept.data_ptr())
    finally:
        assert keep_freed_memory(False)
