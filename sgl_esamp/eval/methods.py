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
PLAIN = {"sampling": "plain"}  # stock SGLang sampling, even on an ESamp server


def esamp(beta: float, temperature: float = TEMPERATURE) -> Method:
    # Same base distribution as "temperature": the difference is ESamp's fusion alone.
    return Method(f"esamp_b{beta:g}", {"temperature": temperature}, {"sampling": "esamp", "beta": beta})


def baselines(temperature: float = TEMPERATURE) -> list[Method]:
    return [
        Method("temperature", {"temperature": temperature}, PLAIN),
        Method("top_p", {"temperature": temperature, "top_p": 0.9}, PLAIN),
        Method("min_p", {"temperature": temperature, "min_p": 0.1}, PLAIN),
    ]


def methods(betas: list[float], temperature: float = TEMPERATURE) -> list[Method]:
    """The baselines plus ESamp at each beta."""
    return baselines(temperature) + [esamp(b, temperature) for b in betas]
