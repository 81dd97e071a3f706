"""PEFT's own ``tests/test_custom_models.py`` (from the sdist of the locked peft), run on GeoRA's rows.

The upstream module is imported unchanged from ``$PEFT_TESTS_DIR`` (``peer/run.sh`` downloads and extracts it). For
each of its test classes a subclass is built here, in which

* the tests parametrized with one of the file's shared row lists (``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES``,
  ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, ``MIXED_ADAPTER_TEST_CASES``), or named in ``geora_rows.EXTRA_ROWS``, run
  on GeoRA's rows instead of the upstream ones (skipped if named in ``geora_rows.SKIPS``);
* every other test (it builds its own configs of another method: LoRA, IA3, ...) is one skipped item whose reason
  says why GeoRA has no row for it (``geora_rows.NOT_APPLICABLE``, else the config classes it builds).

Test bodies, helpers (``PeftCommonTester``) and fixtures are PEFT's; nothing of PEFT's file is patched.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import geora_rows  # on sys.path: pytest's default import mode prepends peer/
import pytest

from peft_geora import GeoRAConfig  # importing peft_geora registers PeftType.GEORA

UPSTREAM_PACKAGE = "peft_upstream_tests"


def load_upstream(tests_dir: str | os.PathLike) -> types.ModuleType:
    """Import ``test_custom_models`` from PEFT's sdist ``tests`` folder.

    The sdist ships that folder without ``__init__.py`` while its modules import each other relatively
    (``from .testing_common import ...``), so it is imported as the submodule of a package made here, named
    :data:`UPSTREAM_PACKAGE`, whose search path is the folder. Nothing is written to the folder.
    """
    tests_dir = Path(tests_dir)
    if not (tests_dir / "test_custom_models.py").is_file():
        raise FileNotFoundError(f"no test_custom_models.py in {tests_dir}; run the peer suite with peer/run.sh")
    spec = importlib.machinery.ModuleSpec(UPSTREAM_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tests_dir)]
    sys.modules[UPSTREAM_PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{UPSTREAM_PACKAGE}.test_custom_models")


def _with_marks(func: types.FunctionType, marks: list) -> types.FunctionType:
    """A copy of ``func`` (same code and globals: PEFT's module) carrying ``marks``; ``func`` is left as it is."""
    copy = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update(func.__dict__)
    copy.__qualname__ = func.__qualname__
    copy.pytestmark = marks
    return copy


def _geora_marks(name: str, func: types.FunctionType, shared_rows: dict[int, list]) -> list | None:
    """``func``'s marks with GeoRA's rows in its row parametrization, or None if it has none to replace."""
    marks, replaced = [], False
    for mark in getattr(func, "pytestmark", []):
        if mark.name == "parametrize":
            argnames, argvalues = mark.args[0], mark.args[1]
            rows = shared_rows.get(id(argvalues))
            extra = geora_rows.EXTRA_ROWS.get(name)
            if rows is None and extra is not None and argnames == extra[0]:
                rows = extra[1]
            if rows is not None:
                mark = pytest.mark.parametrize(argnames, rows, *mark.args[2:], **mark.kwargs).mark
                replaced = True
        marks.append(mark)
    if not replaced:
        return None
    if name in geora_rows.SKIPS:
        marks.append(pytest.mark.skip(reason=geora_rows.SKIPS[name]).mark)
    return marks


def _config_names(func: types.FunctionType) -> set[str]:
    """Names of the PEFT config classes a test builds: named in its code (and nested code) or its parameters."""

    def code_names(code: types.CodeType) -> set[str]:
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= code_names(const)
        return names

    names = code_names(func.__code__)
    for mark in getattr(func, "pytestmark", []):
        if mark.name == "parametrize":
            for row in mark.args[1]:
                for value in row if isinstance(row, (tuple, list)) else (row,):
                    names.add(value.__name__ if isinstance(value, type) else type(value).__name__)
    return {name for name in names if name.endswith("Config") and name not in ("PeftConfig", "GeoRAConfig")}


def not_applicable_reason(name: str, func: types.FunctionType) -> str:
    """Why the upstream test ``name`` has no GeoRA rows (see ``geora_rows.NOT_APPLICABLE``)."""
    for pattern, reason in geora_rows.NOT_APPLICABLE:
        if re.search(pattern, name):
            return reason
    configs = sorted(_config_names(func))
    if not configs:
        raise ValueError(
            f"upstream test {name} takes no GeoRA rows and builds no PEFT config of its own: give it GeoRA rows "
            "(geora_rows.EXTRA_ROWS) or a reason (geora_rows.NOT_APPLICABLE)"
        )
    return f"tests {', '.join(configs)}: its configs are built in the test, not taken from rows"


def _not_applicable(name: str, qualname: str, reason: str) -> types.FunctionType:
    """A skipped stand-in for the upstream test ``name``: one item, with ``reason``."""

    def stand_in(self) -> None:
        raise AssertionError("not applicable to GeoRA, never run")

    stand_in.__name__, stand_in.__qualname__ = name, qualname
    stand_in.pytestmark = [pytest.mark.skip(reason=f"{geora_rows.NOT_APPLICABLE_PREFIX}{reason}").mark]
    return stand_in


def geora_test_classes(upstream: types.ModuleType) -> dict[str, type]:
    """``TestGeoRA<Name>`` for each upstream ``Test<Name>`` class.

    A subclass, so that the tests' ``self`` is an instance of the upstream class (zero-argument ``super()``,
    inherited fixtures and helpers work). Its tests that take rows run on GeoRA's; each other test is one skipped
    item with the reason it has no GeoRA rows.
    """
    shared_rows = {
        id(upstream.TEST_CASES): geora_rows.TEST_CASES,
        id(upstream.ALL_PEFT_CONFIG_CLASSES): [GeoRAConfig],
        id(upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): geora_rows.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
        id(upstream.MIXED_ADAPTER_TEST_CASES): geora_rows.MIXED_ADAPTER_TEST_CASES,
    }
    classes, run = {}, set()
    for class_name, base in vars(upstream).items():
        if not (class_name.startswith("Test") and isinstance(base, type)):
            continue
        namespace: dict[str, object] = {"__module__": __name__, "__doc__": f"GeoRA's rows of PEFT's {class_name}."}
        for name in dir(base):
            func = getattr(base, name)
            if not (name.startswith("test") and callable(func)):
                continue
            if not isinstance(func, types.FunctionType):
                raise TypeError(f"upstream test {class_name}.{name} is a {type(func).__name__}, not a function")
            marks = _geora_marks(name, func, shared_rows)
            if marks is None:
                namespace[name] = _not_applicable(name, func.__qualname__, not_applicable_reason(name, func))
            else:
                namespace[name] = _with_marks(func, marks)
                run.add(name)
        new_name = "TestGeoRA" + class_name.removeprefix("Test")
        classes[new_name] = type(new_name, (base,), namespace)
    unknown = (set(geora_rows.SKIPS) | set(geora_rows.EXTRA_ROWS)) - run
    if unknown:
        raise ValueError(f"geora_rows names tests that take no GeoRA rows: {sorted(unknown)}")
    return classes


if not os.environ.get("PEFT_TESTS_DIR"):
    raise RuntimeError("PEFT_TESTS_DIR is not set: run the peer suite with peer/run.sh")
upstream = load_upstream(os.environ["PEFT_TESTS_DIR"])
globals().update(geora_test_classes(upstream))
