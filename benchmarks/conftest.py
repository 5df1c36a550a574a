"""Prints, after a measured run, each benchmark's median as a ratio to its group's reference."""

from __future__ import annotations

from typing import Any

REFERENCE_MARK = "reference"


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if not b.has_error and b.stats]
    groups: dict[str, list[Any]] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    for group, members in sorted(groups.items()):
        refs = [b for b in members if REFERENCE_MARK in b.name]
        if not refs:
            continue
        ref = refs[0]
        terminalreporter.write_line(f"[{group}] median ratios to {ref.name} (higher is faster):")
        for bench in members:
            ratio = ref.stats.median / bench.stats.median
            median_ms = bench.stats.median * 1e3
            terminalreporter.write_line(f"    {bench.name:<50} median {median_ms:8.2f} ms   {ratio:5.2f}x")
