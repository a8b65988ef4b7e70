"""Per-request ESamp settings, carried in SGLang's `custom_params`.

    {"custom_params": {"sampling": "esamp" | "plain", "beta": 0.7, "variant": "reference" | "latent",
                       "group_id": "...", "prefill_pairs": 256, "train_rows": "first" | "all"}}

On a server started with `--sampler esamp`, every sampled (temperature > 0) request
uses ESamp unless it says `"sampling": "plain"`; `beta` and `variant` override the
server's (each variant has its own bank of Distillers, so requests of different
variants never share one, whatever their group id); `prefill_pairs` overrides how many of
the prompt's pairs the group learns, `train_rows` which of its decode rows train. Rows sharing a `group_id` share one Distiller; requests
without one get a fresh id here, before `n > 1` expansion, so the n samples of one request
form one group. A group id is a capability: whoever knows it joins that group and trains its
Distiller, so on a server started with `--esamp-client-groups off` client ids are ignored and
every request gets a fresh one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

from sgl_esamp import ESampConfig, check_beta, check_prefill_pairs, check_train_rows, check_variant

SAMPLING_KEY, BETA_KEY, VARIANT_KEY, GROUP_KEY = "sampling", "beta", "variant", "group_id"
PREFILL_PAIRS_KEY, TRAIN_ROWS_KEY = "prefill_pairs", "train_rows"
# SGLang's router (sglang-router, `--policy manual`) sends requests with the same key to the
# same server: ESamp clients put their group id here (patches/routing.py)
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
SAMPLING_CHOICES = ("esamp", "plain")
MAX_GROUP_ID_LEN = 256
START_HINT = "start the server with `python -m sglang.launch_server ... --sampler esamp`"


@dataclass(frozen=True)
class RequestESamp:
    enabled: bool
    beta: Optional[float]  # None: the server's beta
    variant: Optional[str]  # None: the server's variant
    group: Optional[str]
    prefill_pairs: Optional[int]  # None: the server's
    train_rows: Optional[str]  # None: the server's


def validate(custom_params: Optional[dict], server_is_esamp: bool, server: Optional[ESampConfig] = None) -> None:
    """Raise ValueError naming the field and its allowed values (SGLang answers 400). `server`:
    the server's config, when known: a request may lower its `--esamp-prefill-pairs`, never
    raise it (the memory a prefill's learning takes stays the operator's choice), and may ask
    only for a variant the server serves (`--esamp-variants`)."""
    params = custom_params or {}
    sampling = params.get(SAMPLING_KEY)
    if sampling is not None and sampling not in SAMPLING_CHOICES:
        raise ValueError(f"custom_params.{SAMPLING_KEY}={sampling!r} is invalid: allowed 'esamp' or 'plain'")
    if BETA_KEY in params:
        check_beta(params[BETA_KEY], field=f"custom_params.{BETA_KEY}")
    if VARIANT_KEY in params:
        field = f"custom_params.{VARIANT_KEY}"
        check_variant(params[VARIANT_KEY], field=field)
        served = [variant.name for variant in server.served] if server is not None else None
        if served is not None and params[VARIANT_KEY] not in served:
            raise ValueError(f"{field}={params[VARIANT_KEY]!r} is invalid: allowed {' or '.join(served)} (the variants "
                             f"this server serves; start it with --esamp-variants all to serve both)")
    if PREFILL_PAIRS_KEY in params:
        field = f"custom_params.{PREFILL_PAIRS_KEY}"
        pairs = check_prefill_pairs(params[PREFILL_PAIRS_KEY], field=field)
        if server is not None:
            most = server.prefill_pairs_for(check_variant(params.get(VARIANT_KEY, server.variant)))
            if pairs > most:
                raise ValueError(f"{field}={pairs!r} is invalid: allowed an integer in [0, {most}] "
                                 f"(the server's --esamp-prefill-pairs for this variant)")
    if TRAIN_ROWS_KEY in params:
        check_train_rows(params[TRAIN_ROWS_KEY], field=f"custom_params.{TRAIN_ROWS_KEY}")
    group = params.get(GROUP_KEY)
    if group is not None and (not isinstance(group, str) or not 0 < len(group) <= MAX_GROUP_ID_LEN):
        raise ValueError(
            f"custom_params.{GROUP_KEY}={group!r} is invalid: allowed a string of 1 to {MAX_GROUP_ID_LEN} characters"
        )
    if not server_is_esamp and (sampling == "esamp" or params.keys() & {BETA_KEY, VARIANT_KEY, PREFILL_PAIRS_KEY,
                                                                       TRAIN_ROWS_KEY}):
        raise ValueError(f"custom_params.{SAMPLING_KEY}='esamp' needs an ESamp server: {START_HINT}")


def with_group(custom_params: Optional[dict], client_groups: bool = True) -> dict:
    """A copy of custom_params with a group id: the client's, if it gave one and the server
    lets clients name groups, else a fresh random one (as hard to guess as a session token)."""
    params = dict(custom_params or {})
    if not client_groups or GROUP_KEY not in params:
        params[GROUP_KEY] = uuid.uuid4().hex
    return params


def resolve(custom_params: Optional[dict], sampled: bool) -> RequestESamp:
    """Whether a request's rows use ESamp (validated params assumed)."""
    params = custom_params or {}
    enabled = sampled and params.get(SAMPLING_KEY, "esamp") == "esamp"
    beta = params.get(BETA_KEY)
    return RequestESamp(enabled, None if beta is None else float(beta), params.get(VARIANT_KEY), params.get(GROUP_KEY),
                        params.get(PREFILL_PAIRS_KEY), params.get(TRAIN_ROWS_KEY))
