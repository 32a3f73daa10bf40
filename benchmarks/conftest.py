"""Shared benchmark fixtures: a session-wide record of medians per (module, group), printed as ratios."""
from __future__ import annotations

import collections
import os

# See memoe_fast/cli.py: sleeping, not spinning, OpenMP threads (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

_MEDIANS: dict[str, dict[str, float]] = collections.defaultdict(dict)


class _Ratios(dict):
    """``ratios[provider] = median_ms`` for a module's main group; ``ratios.group(name)`` for another."""

    def __init__(self, key: str):
        super().__init__()
        self._key = key

    def __setitem__(self, provider, ms):
        super().__setitem__(provider, ms)
        _MEDIANS[self._key][provider] = ms

    def group(self, name: str) -> "_Ratios":
        return _Ratios(f"{self._key} [{name}]")


@pytest.fixture
def bench_ratios(request):
    """Records medians (ms) per provider; the terminal summary prints each group's ratios to its
    "floor" provider (or to the first one recorded)."""
    return _Ratios(request.module.__name__)


def pytest_terminal_summary(terminalreporter):
    for key, medians in _MEDIANS.items():
        if not medians:
            continue
        base_name = "floor" if "floor" in medians else next(iter(medians))
        base = medians[base_name]
        terminalreporter.write_sep("-", f"{key}: median ms and ratio to {base_name!r}")
        for name, ms in medians.items():
            terminalreporter.write_line(f"{name:>12s} {ms:10.1f} ms  {ms / base:6.3f}x")
