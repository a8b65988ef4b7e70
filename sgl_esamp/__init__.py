"""Exploratory Sampling (ESamp): parallel samples that explore different ideas.

Engine-agnostic core: the Distiller bank, its online trainer, SGLang-equivalent
candidate filtering and logit fusion. It never imports sglang; the SGLang glue lives
in the `patches` package.
"""

from .bank import GroupBank
from .candidates import Candidates, filter_candidates, filter_probs
from .config import ESampConfig, ESampConfigError, check_beta
from .distiller import DistillerBank, svd_init, zero_delta_init
from .fusion import draw, fuse_candidates, fuse_candidates_torch
from .sampler import ESampSampler, Pairs
from .training import DistillerTrainer

__all__ = [
    "Candidates",
    "DistillerBank",
    "DistillerTrainer",
    "ESampConfig",
    "ESampConfigError",
    "ESampSampler",
    "GroupBank",
    "Pairs",
    "check_beta",
    "draw",
    "filter_candidates",
    "filter_probs",
    "fuse_candidates",
    "fuse_candidates_torch",
    "svd_init",
    "zero_delta_init",
]
