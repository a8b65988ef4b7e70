"""ESamp variants: which hidden states feed the Distiller, what it predicts, how d enters the logits.

Two recipes share the Distiller, the bank and the sampler; they differ in the places that
decide whether the novelty signal survives online training, and in how closely they follow
the authors' code (which rows train, the prompt, the first token; README "Variants"):

| | `reference` (the authors' code, LinesHogan/tLLM) | `latent` (this project's first design) |
|---|---|---|
| source x | normed input of layer 0: RMSNorm_0(embedding) | residual after block `source_layer` |
| target y | normed input of the last block: RMSNorm_{L-1}(h_{L-1}) | final post-norm state (the LM head's input) |
| fusion (fusion.py) | only z is divided by T (d_over_temperature False) | d is divided by T with z |
| init | A, G, B ~ N(0, 0.02²), gate bias 1, LN gain 1, bias 0 | B = 0, LN gain = final norm weight |
| optimizer | AdamW, weight decay 0.01 | Adam, no decay |
| decode rows that train | the group's first live member's | every member's |
| prompt pairs learnt | none | the last 256 |
| the prefill's token | drawn plainly | fused |

with d = W_head[c] · ŷ on the candidates c. The latent target is what the LM head reads,
so as the Distiller learns, d → z and the signal vanishes; the reference target sits one
block earlier, where a gap to z remains.

A variant names its taps; which tensors hold them is the engine's business (the SGLang
glue reads them from its hidden-state capture); `rms_norm` is the "normed input" both
sides agree on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# taps
FIRST_LAYER_INPUT_NORMED = "first_layer_input_normed"  # RMSNorm_0(h_0): layer 0's input_layernorm output
SOURCE_BLOCK_OUTPUT = "source_block_output"  # residual stream after block `source_layer`
LAST_LAYER_INPUT_NORMED = "last_layer_input_normed"  # RMSNorm_{L-1}(h_{L-1}): the last block's normed input
FINAL_NORMED = "final_normed"  # the final norm's output, what the LM head reads


@dataclass(frozen=True)
class Variant:
    name: str
    source: str  # tap feeding the Distiller
    target: str  # tap it learns to predict
    init: str  # the Distiller initialisation used when the config says init="auto"
    weight_decay: float  # decoupled (AdamW) weight decay of the online optimizer
    d_over_temperature: bool  # True: d is divided by T together with z; False: only z is
    train_rows: str  # the decode rows that train a group's Distiller when the config says "auto" (TRAIN_ROWS)
    prefill_pairs: int  # the prompt pairs a group learns from a prefill when the config does not say
    fuses_first_token: bool  # the token drawn at the end of a prefill is fused (else drawn plainly)


# Which decode rows train a group's Distiller in a step: "first", only the group's first live
# member's (the one that joined it first; the next takes over when it finishes), as the authors'
# code trains one row per prompt; or "all", every member's. Every member is fused either way.
TRAIN_ROWS = ("first", "all")

# The authors' code learns from decode steps only and guides decode steps only: the token drawn
# from a prompt's prefill is drawn plainly, its Distiller never having seen the prompt.
REFERENCE = Variant("reference", FIRST_LAYER_INPUT_NORMED, LAST_LAYER_INPUT_NORMED, init="normal",
                    weight_decay=0.01, d_over_temperature=False, train_rows="first", prefill_pairs=0,
                    fuses_first_token=False)
LATENT = Variant("latent", SOURCE_BLOCK_OUTPUT, FINAL_NORMED, init="zero", weight_decay=0.0,
                 d_over_temperature=True, train_rows="all", prefill_pairs=256, fuses_first_token=True)
VARIANTS: dict[str, Variant] = {v.name: v for v in (REFERENCE, LATENT)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A decoder layer's input norm, x / sqrt(mean(x²) + eps) · w, computed in float32."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.float()


def tap_rows(table: torch.Tensor, index: torch.Tensor, *, columns: tuple[int, int] = (0, -1),
             ids: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Rows [len(index), H] float32 of a tap held in `table`: table[i, start : start + H] for
    i = index (or ids[index], when the table is indexed by token id, as an embedding is),
    through rms_norm(·, *norm) when the tap is a normed input. columns = (start, H), H -1: all.
    Reference of kernels.rows.tap_rows_triton."""
    start, width = columns
    rows = table[:, start:] if width < 0 else table[:, start:start + width]
    picked = rows.index_select(0, index if ids is None else ids.index_select(0, index))
    return rms_norm(picked, *norm) if norm is not None else picked.float()
