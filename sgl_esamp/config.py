"""ESamp configuration: every knob in one validated, immutable place."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

import torch

from .variants import TRAIN_ROWS, VARIANTS, Variant

BETA_RANGE = (0.0, 10.0)
RANK_RANGE = (1, 1024)
LR_RANGE = (0.0, 1.0)
SLOTS_RANGE = (1, 4096)
MAX_CANDIDATES_RANGE = (0, 1 << 20)
PREFILL_PAIRS_RANGE = (0, 1 << 20)
INITS = ("auto", "normal", "zero", "svd")
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ESampConfigError(ValueError):
    """A bad ESamp setting; the message names the field, the value and the allowed range."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        super().__init__(f"esamp {field}={value!r} is invalid: allowed {allowed}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_beta(value: Any, field: str = "beta") -> float:
    """Validate an exploration strength; shared by the config and per-request overrides."""
    lo, hi = BETA_RANGE
    if not _is_real(value) or not math.isfinite(value) or not lo <= value <= hi:
        raise ESampConfigError(field, value, f"a finite number in [{lo}, {hi}]")
    return float(value)


def check_variant(value: Any, field: str = "variant") -> Variant:
    """Validate a variant name; shared by the config and per-request overrides."""
    if not isinstance(value, str) or value not in VARIANTS:
        raise ESampConfigError(field, value, f"one of {', '.join(VARIANTS)}")
    return VARIANTS[value]


def check_train_rows(value: Any, field: str = "train_rows", allow_auto: bool = False) -> str:
    """Validate which rows train; shared by the config and per-request overrides."""
    allowed = ("auto", *TRAIN_ROWS) if allow_auto else TRAIN_ROWS
    if value not in allowed:
        raise ESampConfigError(field, value, f"one of {', '.join(allowed)}")
    return value


def check_prefill_pairs(value: Any, field: str = "prefill_pairs") -> int:
    """Validate a prompt-learning budget; shared by the config and per-request overrides."""
    return _check_int(field, value, *PREFILL_PAIRS_RANGE)


def _check_int(field: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ESampConfigError(field, value, f"an integer in [{lo}, {hi}]")
    return value


@dataclass(frozen=True)
class ESampConfig:
    """Settings of one ESamp engine (one model, one bank of Distillers).

    variant:         "latent" (this project's design, the default: it won on the dev
                     split, docs/EVAL.md) or "reference" (the authors' taps, target,
                     fusion, init and optimizer); see variants.py. A request may ask for
                     the other one.
    beta:            exploration strength; 0 reproduces plain sampling. 0.1 is the
                     authors' suggested start; larger values drift from the model.
    source_layer:    latent variant only: the shallow decoder layer whose block output
                     feeds the Distiller (the reference variant reads layer 0's input).
    rank:            r, the Distiller's bottleneck width.
    lr:              Adam learning rate of the online training step.
    num_slots:       how many groups can hold a Distiller at once.
    init:            "auto" (the variant's own: normal for reference, zero for latent),
                     "normal" (A, G, B ~ N(0, 0.02²), gate bias 1, LN gain 1), "zero"
                     (B = 0, so the first prediction is LN(x)) or "svd" (low-rank SVD
                     of the model's last MLP).
    state_dtype:     dtype of master weights and optimizer state ("float32" even for a
                     bf16 model; "float64" exists for reference tests).
    max_candidates:  fusion looks at most at this many most-probable tokens per row,
                     bounding the W_head gather; 0 means no bound (the whole kept set).
    seed:            seed of the Distiller's initial weights (shared by all slots).
    prefill_pairs:   the most prompt pairs a group learns from one prefill, its last tokens
                     first; 0 learns from decode steps only (as the authors' code does); None:
                     the variant's own (reference 0, latent 256). It bounds the memory a
                     prefill's learning step takes, whatever the prompt.
    client_groups:   whether requests may name their group (`custom_params.group_id`, and
                     the frontend's forks); off: only the n samples of one request share a
                     Distiller (for servers shared by clients that do not trust each other).
    train_rows:      the decode rows that train a group's Distiller in a step: "first" (the
                     group's first live member's, as the authors' code), "all" (every
                     member's), or "auto" (the variant's own: variants.py); every row is fused.
    variants:        the variants a server builds a bank for and serves: "auto" (its own
                     `variant` only), "all", or one variant's name; a request may ask only
                     for one of them (each bank takes memory, and its hidden states a capture).
    """

    variant: str = "latent"  # chosen on the dev split (docs/EVAL.md)
    beta: float = 0.1
    source_layer: int = 0
    rank: int = 64
    lr: float = 1e-3
    num_slots: int = 64
    init: Literal["auto", "normal", "zero", "svd"] = "auto"
    state_dtype: str = "float32"
    max_candidates: int = 256
    seed: int = 0
    prefill_pairs: Optional[int] = None
    client_groups: bool = True
    train_rows: str = "auto"
    variants: str = "auto"

    def __post_init__(self) -> None:
        check_variant(self.variant)
        check_beta(self.beta)
        _check_int("source_layer", self.source_layer, 0, 1 << 16)
        _check_int("rank", self.rank, *RANK_RANGE)
        lo, hi = LR_RANGE
        if not _is_real(self.lr) or not math.isfinite(self.lr) or not lo < self.lr <= hi:
            raise ESampConfigError("lr", self.lr, f"a finite number in ({lo}, {hi}]")
        _check_int("num_slots", self.num_slots, *SLOTS_RANGE)
        if self.init not in INITS:
            raise ESampConfigError("init", self.init, f"one of {', '.join(INITS)}")
        if self.state_dtype not in STATE_DTYPES:
            raise ESampConfigError("state_dtype", self.state_dtype, f"one of {', '.join(STATE_DTYPES)}")
        _check_int("max_candidates", self.max_candidates, *MAX_CANDIDATES_RANGE)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.prefill_pairs is not None:
            check_prefill_pairs(self.prefill_pairs)
        if not isinstance(self.client_groups, bool):
            raise ESampConfigError("client_groups", self.client_groups, "true or false")
        check_train_rows(self.train_rows, allow_auto=True)
        if self.variants not in ("auto", "all", *VARIANTS):
            raise ESampConfigError("variants", self.variants, f"one of auto, all, {', '.join(VARIANTS)}")
        if self.variants in VARIANTS and self.variants != self.variant:
            raise ESampConfigError("variants", self.variants, f"auto, all or {self.variant} (the server's variant "
                                                               "must be served)")

    @property
    def served(self) -> tuple[Variant, ...]:
        """The variants this config builds a bank for, the server's own first."""
        if self.variants == "all":
            return (VARIANTS[self.variant], *(v for name, v in VARIANTS.items() if name != self.variant))
        return (VARIANTS[self.variant],)

    def init_for(self, variant: Variant) -> str:
        """The Distiller initialisation a group of `variant` starts from."""
        return variant.init if self.init == "auto" else self.init

    def fused_width(self, ranks: int) -> int:
        """How many of a row's `ranks` most probable candidates fusion looks at: `max_candidates`
        (0: all), which bounds the LM-head gather. The one place the cap is applied."""
        cap = self.max_candidates
        return cap if 0 < cap < ranks else ranks

    def prefill_pairs_for(self, variant: Variant) -> int:
        """The most prompt pairs a group of `variant` learns from one prefill."""
        return variant.prefill_pairs if self.prefill_pairs is None else self.prefill_pairs

    @property
    def max_prefill_pairs(self) -> int:
        """The most prompt pairs any served variant's group learns from one prefill (the memory plan's)."""
        return max(self.prefill_pairs_for(variant) for variant in self.served)

    def train_rows_for(self, variant: Variant) -> str:
        """The decode rows that train a group of `variant` ("first" or "all")."""
        return variant.train_rows if self.train_rows == "auto" else self.train_rows

    @property
    def torch_state_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype]

    def resolve_source_layer(self, num_layers: int) -> int:
        """The shallow layer for a model of `num_layers` decoder layers (must be below the last)."""
        if not self.source_layer < num_layers - 1:
            raise ESampConfigError("source_layer", self.source_layer, f"an integer in [0, {num_layers - 2}] for this model")
        return self.source_layer

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
