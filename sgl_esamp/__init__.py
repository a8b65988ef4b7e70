"""Exploratory Sampling (ESamp): parallel samples that explore different ideas.

Engine-agnostic core: the Distiller bank, its online trainer, SGLang-equivalent
candidate filtering and logit fusion, and their Triton kernels. It never imports sglang;
the SGLang glue lives in the `patches` package.
"""

from .bank import GroupBank
from .candidates import Candidates, filter_candidates, filter_probs
from .config import ESampConfig, ESampConfigError, check_beta, check_prefill_pairs, check_train_rows, check_variant
from .distiller import DistillerBank, normal_init, svd_init, zero_delta_init
from .fusion import fuse_candidates_torch, fused_draw_torch
from .layout import PairRow, SampledRow, StepLayout
from .ops import Forward, KernelPath, StepOps, tap_rows_for
from .sampler import ESampSampler, initial_weights
from .sharding import VocabShard
from .signal import summarize
from .step import DrawInputs, DrawResult, ESampStep, Filters, Fused, Outcome, Sampled
from .training import DistillerTrainer
from .variants import LATENT, REFERENCE, VARIANTS, Variant, rms_norm, tap_rows

__all__ = [
    "Candidates",
    "DistillerBank",
    "DistillerTrainer",
    "DrawInputs",
    "DrawResult",
    "ESampConfig",
    "ESampConfigError",
    "ESampSampler",
    "ESampStep",
    "Filters",
    "Forward",
    "Fused",
    "GroupBank",
    "KernelPath",
    "LATENT",
    "Outcome",
    "PairRow",
    "REFERENCE",
    "SampledRow",
    "Sampled",
    "StepLayout",
    "StepOps",
    "VARIANTS",
    "Variant",
    "VocabShard",
    "check_beta",
    "check_prefill_pairs",
    "check_train_rows",
    "check_variant",
    "filter_candidates",
    "filter_probs",
    "fuse_candidates_torch",
    "fused_draw_torch",
    "initial_weights",
    "normal_init",
    "rms_norm",
    "summarize",
    "svd_init",
    "tap_rows",
    "tap_rows_for",
    "zero_delta_init",
]
