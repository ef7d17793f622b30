"""Pure tensor math: Gram matrices, HSIC estimators, CKA and mean attention distance."""

from lightning_cka.functional.attention import mean_attention_distance, patch_distances
from lightning_cka.functional.cka import cka_matrix, linear_cka
from lightning_cka.functional.hsic import gram, hsic_biased, hsic_unbiased

__all__ = [
    "cka_matrix",
    "gram",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "mean_attention_distance",
    "patch_distances",
]
