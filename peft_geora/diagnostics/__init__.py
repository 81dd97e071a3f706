"""Where an update goes, measured: spectral diagnostics of ``dW`` against ``W`` (:mod:`.metrics`), the
initialisation report (:mod:`.report`) and a Trainer callback that logs them during training (:mod:`.callback`)."""

from .callback import GeoRADiagnosticsCallback
from .metrics import (
    DEFAULT_TOP_K,
    DEFAULT_TOP_Q,
    EXACT_LIMIT,
    WeightSpectrum,
    diagnostics_rank,
    geora_init_report,
    leading_svd,
    mean_rows,
    principal_angles,
    s_head,
    spectral_shift,
    subspace_angles,
    top_singular_values,
    update_diagnostics,
    weight_spectrum,
)

__all__ = [
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_Q",
    "EXACT_LIMIT",
    "GeoRADiagnosticsCallback",
    "WeightSpectrum",
    "diagnostics_rank",
    "geora_init_report",
    "leading_svd",
    "mean_rows",
    "principal_angles",
    "s_head",
    "spectral_shift",
    "subspace_angles",
    "top_singular_values",
    "update_diagnostics",
    "weight_spectrum",
]
