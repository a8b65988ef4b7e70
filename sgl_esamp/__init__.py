"""Exploratory Sampling (ESamp): parallel samples that explore different ideas.

Engine-agnostic core: the Distiller bank, its online trainer, SGLang-equivalent
candidate filtering and logit fusion. It never imports sglang; the SGLang glue lives
in the `patches` package.
"""

from .bank import GroupBank
from .candidates import Candidates, filter_candidates, filter_probs
from .config import ESampConfig, ESampConfigError, check_beta, check_variant
from .distiller import DistillerBank, normal_init, svd_init, zero_delta_init
from .fusion import DrawResult, Fused, fuse_candidates, fuse_candidates_torch, fused_draw, fused_draw_torch
from .sampler import ESampSampler, Pairs, initial_weights
from .segments import SlotSegments
from .sharding import VocabShard
from .signal import SignalStats, summarize
from .training import DistillerTrainer
from .variants import LATENT, REFERENCE, VARIANTS, Variant, rms_norm

__all__ = [
    "Candidates",
    "DistillerBank",
    "DistillerTrainer",
    "ESampConfig",
    "ESampConfigError",
    "DrawResult",
    "ESampSampler",
    "Fused",
    "GroupBank",
    "LATENT",
    "Pairs",
    "REFERENCE",
    "SignalStats",
    "SlotSegments",
    "VARIANTS",
    "Variant",
    "VocabShard",
    "check_beta",
    "check_variant",
    "filter_candidates",
    "filter_probs",
    "fuse_candidates",
    "fuse_candidates_torch",
    "fused_draw",
    "fused_draw_torch",
    "initial_weights",
    "normal_init",
    "rms_norm",
    "summarize",
    "svd_init",
    "zero_delta_init",
]
