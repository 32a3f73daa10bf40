"""The CPU allocator setting the editors apply: freed training buffers stay in the process."""
import subprocess
import sys

import pytest

# A fresh interpreter: the setting is process-wide, and other tests' editors apply it in this one.
PROBE = r"""
import sys, torch
from memoe_fast.ops.cpu_allocator import keep_freed_cpu_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

if sys.argv[1] == "keep":
    applied, reason = keep_freed_cpu_memory()
    assert applied, reason
t = torch.ones(12 << 20)  # 48 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
before = rss()
del t
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_training_buffers_stay_in_the_process():
    def released(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert released("default") > 40 << 20, "without the setting glibc unmaps a freed 48 MiB block (the probe is wrong)"
    assert released("keep") < 4 << 20, "with the setting the freed block must stay in the heap for the next step"


def test_the_setting_can_be_turned_off(monkeypatch):
    from memoe_fast.ops import cpu_allocator

    monkeypatch.setattr(cpu_allocator, "_state", None)
    monkeypatch.setenv("MEMOE_FAST_KEEP_FREED", "0")
    assert cpu_allocator.keep_freed_cpu_memory() == (False, "MEMOE_FAST_KEEP_FREED=0")
