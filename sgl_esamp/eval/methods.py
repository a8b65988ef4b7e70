"""The sampling methods compared. Adding one is one `Method(...)` entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    sampling_params: dict[str, Any] = field(default_factory=dict)  # merged over the task's
    custom_params: dict[str, Any] = field(default_factory=dict)  # SGLang custom_params

    @property
    def beta(self) -> float | None:
        return self.custom_params.get("beta") if self.custom_params.get("sampling") == "esamp" else None


TEMPERATURE = 0.8  # one temperature for every method, so only the token filter / ESamp differs
TOP_P = 0.95  # the authors' candidate set for ESamp, and its paired baseline
PLAIN = {"sampling": "plain"}  # stock SGLang sampling, even on an ESamp server
PAIRED_BASELINE = "top_p"  # ESamp differs from this method by the fusion alone


def esamp(beta: float, temperature: float = TEMPERATURE, compensated: bool = False) -> Method:
    """ESamp on the candidates top-p keeps (without a filter it would fuse over the whole
    capped vocabulary tail, where an untrained Distiller's noise promotes junk).

    compensated: sample at T·(1 + β), which undoes the sharpening of the (1 + β)·z term, so
    that with an uninformative Distiller ESamp draws at its baseline's temperature."""
    t, name = (temperature * (1 + beta), f"esamp_b{beta:g}_tc") if compensated else (temperature, f"esamp_b{beta:g}")
    return Method(name, {"temperature": t, "top_p": TOP_P}, {"sampling": "esamp", "beta": beta})


def baselines(temperature: float = TEMPERATURE) -> list[Method]:
    return [
        Method("temperature", {"temperature": temperature}, PLAIN),
        Method(PAIRED_BASELINE, {"temperature": temperature, "top_p": TOP_P}, PLAIN),
        Method("min_p", {"temperature": temperature, "min_p": 0.1}, PLAIN),
    ]


def methods(betas: list[float], temperature: float = TEMPERATURE, compensated: bool = False) -> list[Method]:
    """The baselines plus ESamp at each beta (and, if asked, its temperature-compensated twin)."""
    ours = [esamp(b, temperature) for b in betas]
    if compensated:
        ours += [esamp(b, temperature, compensated=True) for b in betas]
    return baselines(temperature) + ours
