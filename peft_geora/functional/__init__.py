"""GeoRA's initialisation as plain torch functions (no PEFT needed): the math layer.

* :mod:`.selection`: exact order statistics (the rho-quantile thresholds) and bounded-scratch passes;
* :mod:`.svd`: truncated SVD solvers (LAPACK, Gram matrix, seeded block Krylov) and rank-k truncation of a product;
* :mod:`.decomposition`: the two priors, the masked SVD and the initial factors, for one weight or a stack of experts.

Everything public is importable from here, e.g. ``from peft_geora.functional import geora_decompose``.
"""

from .decomposition import (
    PRIORS,
    GeoRADecomposition,
    GeoRAFactors,
    GeoRAMasks,
    Priors,
    decomposition_report,
    geora_decompose,
    geora_decompose_experts,
    geora_init_factors,
    geora_masks,
)
from .selection import chunk_size, chunks, kth_smallest, magnitude_threshold, quantile_rank
from .svd import (
    COMPONENTS,
    DEFAULT_NITER,
    DEFAULT_OVERSAMPLE,
    GRAM_LIMIT,
    KRYLOV_TOL,
    SOLVERS,
    Components,
    Solver,
    gram_svd,
    krylov_block,
    krylov_svd,
    randomized_svd,
    truncate_product,
    truncated_svd,
)

__all__ = [
    "COMPONENTS",
    "DEFAULT_NITER",
    "DEFAULT_OVERSAMPLE",
    "GRAM_LIMIT",
    "KRYLOV_TOL",
    "PRIORS",
    "SOLVERS",
    "Components",
    "GeoRADecomposition",
    "GeoRAFactors",
    "GeoRAMasks",
    "Priors",
    "Solver",
    "chunk_size",
    "chunks",
    "decomposition_report",
    "geora_decompose",
    "geora_decompose_experts",
    "geora_init_factors",
    "geora_masks",
    "gram_svd",
    "krylov_block",
    "krylov_svd",
    "kth_smallest",
    "magnitude_threshold",
    "quantile_rank",
    "randomized_svd",
    "truncate_product",
    "truncated_svd",
]
