"""Every import path docs/api.md promises resolves, and the tables there list exactly what the modules export."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


def documented(section: str) -> set[str]:
    """The names in the first column of a section's table (``name(args)`` and ``a``, ``b`` rows split)."""
    body = API.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in re.findall(r"^\| `(.+?)` \|", body, flags=re.M):
        names |= {re.sub(r"\(.*", "", part.strip(" `")) for part in row.split("`, `")}
    return names - {"field"}


@pytest.mark.parametrize("module", ["peft_geora", "peft_geora.functional", "peft_geora.diagnostics"])
def test_each_documented_name_is_exported_and_each_export_documented(module):
    imported = importlib.import_module(module)
    names = documented(module)
    if module == "peft_geora":  # the table of GeoRAConfig's own fields shares the section
        names -= {f.name for f in __import__("dataclasses").fields(imported.GeoRAConfig)}
        names -= {"svd_niter", "svd_oversample", "svd_seed"}
    assert names, module
    assert all(hasattr(imported, name) for name in names), sorted(n for n in names if not hasattr(imported, n))
    assert set(imported.__all__) <= names | {"__version__"}, sorted(set(imported.__all__) - names)


def test_the_other_documented_paths_resolve():
    for path in re.findall(r"^\| `((?:peft_geora|peft_geora_apps)\.[\w.]+)", API, flags=re.M):
        module, name = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), path
    from peft_geora.callback import GeoRADiagnosticsCallback
    from peft_geora.diagnostics.callback import GeoRADiagnosticsCallback as defined

    assert GeoRADiagnosticsCallback is defined
