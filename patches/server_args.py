"""Server options: `--sampler` alias, `--esamp-*` knobs, and what `esamp` switches on.

`--sampler esamp` / `--sampling-backend esamp` must survive SGLang's platform steps
(CPU and deterministic inference force `pytorch`), and must turn on the capture of
the hidden states ESamp reads (taps.py): SGLang's EAGLE3-style aux capture of the residual
stream at the layers both variants tap and, in FULL mode, the final post-norm state in
`last_hidden_states`, without a draft model. A mode ESamp cannot serve stops the launch,
naming the user's flag: speculative decoding, `--return-hidden-states-mode last`, attention
DP, PD disaggregation, pipeline parallelism, another aux capture.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view
from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sgl_esamp import ESampConfig, ESampConfigError

from .taps import capture_layer_ids

BACKEND = "esamp"
CONFIG_ATTR = "_esamp_config"  # private attrs survive ServerArgs pickling into subprocesses
CLIENT_HIDDEN_STATES_ATTR = "_esamp_client_hidden_states"


def _on_off(value: str) -> bool:
    choices = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"{value!r} is invalid: allowed on or off")
    return choices[value.lower()]


# --flag -> (ESampConfig field, type, help)
OPTIONS = {
    "--esamp-variant": ("variant", str, "latent or reference (the authors' taps, target, fusion, init, AdamW) "
                                        "(default latent; a request may ask for the other)"),
    "--esamp-beta": ("beta", float, "exploration strength, 0 = plain sampling (default 0.1; range [0, 10])"),
    "--esamp-source-layer": ("source_layer", int, "latent variant: decoder layer whose block output feeds the Distiller (default 0)"),
    "--esamp-rank": ("rank", int, "Distiller rank r (default 64)"),
    "--esamp-lr": ("lr", float, "Distiller learning rate (default 1e-3)"),
    "--esamp-slots": ("num_slots", int, "concurrent request groups with their own Distiller (default 64)"),
    "--esamp-init": ("init", str, "Distiller initialisation: auto (the variant's own), normal, zero or svd (default auto)"),
    "--esamp-max-candidates": ("max_candidates", int, "most-probable tokens fused per row, 0 = all kept (default 256)"),
    "--esamp-prefill-pairs": ("prefill_pairs", int, "most prompt pairs a group learns from a prefill, last tokens first; "
                                                    "0 = decode steps only (default: the variant's own, reference 0 "
                                                    "as the authors, latent 256)"),
    "--esamp-client-groups": ("client_groups", _on_off, "on: requests may name their group (custom_params.group_id, "
                                                        "frontend forks); off: ignore client ids (default on)"),
    "--esamp-train-rows": ("train_rows", str, "decode rows that train a group's Distiller: first (its first live "
                                              "member's, as the authors), all, or auto (the variant's own: "
                                              "reference first, latent all) (default auto)"),
    "--esamp-variants": ("variants", str, "variants the server builds a bank for and serves: auto (the server's "
                                          "--esamp-variant only), all, or the server's variant (default auto)"),
}



def _add_cli_args(_result: Any, parser: argparse.ArgumentParser) -> None:
    from sglang.srt.arg_groups.choices import SAMPLING_BACKEND_CHOICES

    parser.add_argument(
        "--sampler",
        dest="sampling_backend",
        choices=sorted(SAMPLING_BACKEND_CHOICES),
        default=argparse.SUPPRESS,
        help="alias of --sampling-backend; `--sampler esamp` turns on Exploratory Sampling",
    )
    group = parser.add_argument_group("ESamp (sgl-esamp)")
    for flag, (_field, kind, help_text) in OPTIONS.items():
        group.add_argument(flag, type=kind, default=None, help=help_text)


def _from_cli_args(server_args: Any, _cls: Any, args: argparse.Namespace) -> None:
    given = {field: getattr(args, flag[2:].replace("-", "_"), None) for flag, (field, _, _) in OPTIONS.items()}
    try:
        config = ESampConfig(**{k: v for k, v in given.items() if v is not None})
    except ESampConfigError as err:
        flag = next(f for f, (field, _, _) in OPTIONS.items() if field == err.field)
        sys.exit(f"error: argument {flag}: {err}")
    if config.init == "svd" and (getattr(args, "tp_size", 1) or 1) > 1:  # the MLP weights are sharded then
        sys.exit("error: argument --esamp-init: svd is not supported with --tp-size > 1: allowed auto, normal, zero")
    setattr(server_args, CONFIG_ATTR, config.__dict__.copy())


def esamp_config(server_args: Any) -> ESampConfig:
    return ESampConfig(**(getattr(server_args, CONFIG_ATTR, None) or {}))


def _num_hidden_layers(server_args: Any) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(server_args.model_path, trust_remote_code=server_args.trust_remote_code)
    config = getattr(config, "text_config", config)
    return int(config.num_hidden_layers)


def _keep_esamp(step: str) -> None:
    @register_resolution_hook(step)
    def keep(server_args: Any, previous: Any) -> None:
        wanted = server_args.sampling_backend
        previous(server_args)
        if wanted == BACKEND:
            declare_resolution(server_args, f"esamp:keep_backend:{step}", sampling_backend=BACKEND)


def _refuse_unsupported(server_args: Any) -> None:
    """Stop the launch on a mode ESamp cannot serve, naming the user's own flag (`_raw_input`:
    what the caller asked for, before any resolution step, the plugin's included, changed it)."""
    raw = getattr(server_args, "_raw_input", None) or {}
    view = resolving_view(server_args)

    def refuse(flag: str, why: str) -> None:
        raise ValueError(f"--sampler esamp does not support {why}: drop {flag}")

    for field, flag in (("speculative_algorithm", "--speculative-algorithm"),
                        ("speculative_draft_model_path", "--speculative-draft-model-path")):
        if raw.get(field) is not None:
            refuse(f"{flag} {raw[field]}", "speculative decoding (verify steps draw their tokens outside the "
                                            "sampler, so ESamp would guide at most one token in each)")
    if view.return_hidden_states_mode == "last":
        refuse("--return-hidden-states-mode last", "capturing the last token's hidden states only (ESamp reads "
                                                   "every token's; use full, or leave it unset)")
    if view.attn_dp_size > 1:
        flag = "--enable-dp-attention" if raw.get("enable_dp_attention") else f"--attn-dp-size {view.attn_dp_size}"
        refuse(flag, "attention data parallelism yet (each attention-DP rank samples its own rows, and ESamp's "
                     "vocabulary sum spans the whole TP group); use --dp-size N replicas instead")
    if view.disaggregation_mode not in (None, "null"):
        refuse(f"--disaggregation-mode {view.disaggregation_mode}", "prefill-decode disaggregation yet (a group's "
                                                                    "prompt and its decode steps would train "
                                                                    "Distillers on different servers)")
    if view.rl_on_policy_target is not None:
        refuse(f"--rl-on-policy-target {view.rl_on_policy_target}", "RL on-policy sampling (SGLang then draws from "
                                                                      "log-probabilities, past the sampler ESamp fuses in)")
    if view.pp_size > 1:
        refuse(f"--pp-size {view.pp_size}", "pipeline parallelism (the capture sees only the last stage's layers)")
    if view.enable_return_aux_hidden_states or view.return_aux_hidden_state_layer_ids is not None:
        refuse("--enable-return-aux-hidden-states", "another aux hidden-state capture (it captures its own layers)")


def _return_hidden_states(server_args: Any, previous: Any) -> None:
    """ESamp reads every token's captured states (FULL capture); what clients may ask for stays the
    operator's choice, remembered before this step turns FULL on."""
    view = resolving_view(server_args)
    if view.sampling_backend == BACKEND:
        _refuse_unsupported(server_args)
        mode = view.return_hidden_states_mode or ("full" if view.enable_return_hidden_states else None)
        setattr(server_args, CLIENT_HIDDEN_STATES_ATTR, mode)
        declare_resolution(server_args, "esamp:capture_mode", return_hidden_states_mode="full")
    previous(server_args)


def _capture_layers(server_args: Any, previous: Any) -> None:
    """SGLang's EAGLE3-style capture of the layers the taps read, without a draft model and without
    touching speculative decoding (refused above)."""
    view = resolving_view(server_args)
    if view.sampling_backend != BACKEND:
        return previous(server_args)
    declare_resolution(
        server_args,
        "esamp:capture",
        aux_hidden_state_capture="eagle3",
        return_aux_hidden_state_layer_ids=capture_layer_ids(esamp_config(server_args), _num_hidden_layers(server_args)),
    )


def client_hidden_states_mode(server_args: Any) -> str | None:
    """What the operator lets clients ask of `return_hidden_states` on an ESamp server: None, "full"."""
    return getattr(server_args, CLIENT_HIDDEN_STATES_ATTR, None)


def register() -> None:
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args, HookType.AFTER)
    for step in ("handle_cpu_backends", "handle_deterministic_inference"):
        _keep_esamp(step)
    register_resolution_hook("handle_return_hidden_states_mode")(_return_hidden_states)
    register_resolution_hook("handle_aux_hidden_state_capture")(_capture_layers)
