"""The sampling methods compared. Adding one is one `Method(...)` entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

VARIANTS = ("reference", "latent")  # sgl_esamp/variants.py; the server holds both


@dataclass(frozen=True)
class Method:
    name: str
    sampling_params: dict[str, Any] = field(default_factory=dict)  # merged over the task's
    custom_params: dict[str, Any] = field(default_factory=dict)  # SGLang custom_params
    # frontier mode (tools/eval/frontier.py): the sweep a point belongs to and its knob value;
    # per_branch: the n samples go as n requests, each its own ESamp group
    family: str = ""
    knob: float | None = None
    per_branch: bool = False
    parts: tuple[str, ...] = ()  # frontier: only these parts (empty: the family's default parts)
    # frontier, FIRE (Chen et al., arXiv 2410.21236): the first token's sampling parameters (the
    # rest of the answer is drawn with sampling_params); empty: one request for the whole answer
    first_token: dict[str, Any] = field(default_factory=dict)

    @property
    def beta(self) -> float | None:
        return self.custom_params.get("beta") if self.is_esamp else None

    @property
    def variant(self) -> str | None:
        return self.custom_params.get("variant") if self.is_esamp else None

    @property
    def is_esamp(self) -> bool:
        return self.custom_params.get("sampling") == "esamp"


TEMPERATURE = 0.8  # one temperature for every method, so only the token filter / ESamp differs
TOP_P = 0.95  # the authors' candidate set for ESamp, and its paired baseline
PLAIN = {"sampling": "plain"}  # stock SGLang sampling, even on an ESamp server
PAIRED_BASELINE = "top_p"  # ESamp differs from this method by the fusion alone
SHORT = {"reference": "ref", "latent": "lat"}


def esamp(variant: str, beta: float, temperature: float = TEMPERATURE, compensated: bool = False) -> Method:
    """ESamp (one variant, one β) on the candidates top-p keeps (without a filter it would fuse
    over the whole capped vocabulary tail, where an untrained Distiller's noise promotes junk).

    compensated: sample at T·(1 + β), which undoes the sharpening of the (1 + β)·z term, so
    that with an uninformative Distiller ESamp draws at its baseline's temperature."""
    name = f"{SHORT[variant]}_b{beta:g}"
    t, name = (temperature * (1 + beta), name + "_tc") if compensated else (temperature, name)
    return Method(name, {"temperature": t, "top_p": TOP_P}, {"sampling": "esamp", "variant": variant, "beta": beta})


def baselines(temperature: float = TEMPERATURE) -> list[Method]:
    return [
        Method("temperature", {"temperature": temperature}, PLAIN),
        Method(PAIRED_BASELINE, {"temperature": temperature, "top_p": TOP_P}, PLAIN),
        Method("min_p", {"temperature": temperature, "min_p": 0.1}, PLAIN),
    ]


def esamp_methods(settings: Sequence[tuple[str, float]], temperature: float = TEMPERATURE,
                  compensated: bool = False) -> list[Method]:
    """ESamp at each (variant, β) (and, if asked, its temperature-compensated twin)."""
    ours = [esamp(v, b, temperature) for v, b in settings]
    if compensated:
        ours += [esamp(v, b, temperature, compensated=True) for v, b in settings]
    return ours


def methods(variants: Sequence[str], betas: Sequence[float], temperature: float = TEMPERATURE,
            compensated: bool = False) -> list[Method]:
    """The baselines plus ESamp at every (variant, β)."""
    return baselines(temperature) + esamp_methods([(v, b) for v in variants for b in betas], temperature, compensated)
