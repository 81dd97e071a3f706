"""Where and how visibly GeoRA's initialisation runs: the decomposition device and a progress bar over layers.

* ``GeoRAConfig.init_device`` picks the device of the decomposition. ``"auto"`` (default) uses the current CUDA
  device when the weight sits on the CPU and a GPU is present, so a model loaded on the CPU is still decomposed on
  the GPU, one layer at a time (the weight is copied over, the factors come back to the weight's device); otherwise
  the weight's own device. A named device (``"cpu"``, ``"cuda"``, ``"cuda:1"``) is used as given.
* :func:`init_progress` shows a ``tqdm`` bar with an ETA over the layers being decomposed. It stays hidden for
  initialisations shorter than two seconds, on non-zero distributed ranks and when ``TQDM_DISABLE`` is set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

_BAR: tqdm | None = None


def check_init_device(value: object) -> None:
    """Raise if ``value`` is neither ``"auto"`` nor a torch device string (checked by ``GeoRAConfig``)."""
    if value == "auto":
        return
    try:
        if not isinstance(value, str):  # a saved config must hold a string; torch.device(3) would mean cuda:3
            raise TypeError(type(value).__name__)
        torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"GeoRAConfig: init_device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', "
            f"got {value!r}"
        ) from exc


def resolve_init_device(setting: str, weight: torch.Tensor, module_name: str) -> torch.device:
    """The device the decomposition of ``module_name``'s ``weight`` runs on for ``init_device=setting``."""
    if setting == "auto":
        if weight.device.type == "cpu" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return weight.device
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"GeoRA: init_device={setting!r} for target module '{module_name}', but CUDA is not available; use "
            "init_device='auto' or 'cpu'"
        )
    return device


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def init_progress(total: int, desc: str = "GeoRA init") -> Iterator[None]:
    """Show a progress bar over ``total`` layer initialisations while the block runs (see :func:`advance`)."""
    global _BAR
    if _BAR is not None or total <= 0:  # nested (a second model inside a first's init): one bar is enough
        yield
        return
    bar = tqdm(total=total, desc=desc, unit="layer", delay=2.0, disable=True if not _is_main_process() else None)
    _BAR = bar
    try:
        yield
    finally:
        _BAR = None
        bar.close()


def advance(module_name: str) -> None:
    """Count one initialised layer on the current bar, if any."""
    if _BAR is not None:
        _BAR.set_postfix_str(module_name, refresh=False)
        _BAR.update(1)
