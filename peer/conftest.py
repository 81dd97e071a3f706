"""Peer suite: one line with GeoRA's row counts before pytest's closing summary."""

from __future__ import annotations

import os

import geora_rows
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


_collected: dict[str, int] = {}


def pytest_collection_finish(session) -> None:
    stand_ins = sum(
        1
        for item in session.items
        if (mark := item.get_closest_marker("skip"))
        and mark.kwargs.get("reason", "").startswith(geora_rows.NOT_APPLICABLE_PREFIX)
    )
    _collected.update(items=len(session.items), stand_ins=stand_ins)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    counts = {
        "TEST_CASES": len(geora_rows.TEST_CASES),
        "multiple active adapters": len(geora_rows.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES),
        "mixed adapter batches": len(geora_rows.MIXED_ADAPTER_TEST_CASES),
        "other tests' lists": sum(len(values) for _, values in geora_rows.EXTRA_ROWS.values()),
    }
    detail = ", ".join(f"{count} {name}" for name, count in counts.items())
    items, stand_ins = _collected.get("items", 0), _collected.get("stand_ins", 0)
    terminalreporter.write_line(
        f"GeoRA rows: {sum(counts.values())} ({detail}); {items - stand_ins} items on GeoRA rows, "
        f"{stand_ins} upstream tests not applicable (skipped), {len(geora_rows.SKIPS)} on GeoRA's skip list"
    )
