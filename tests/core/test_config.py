import math

import pytest

from sgl_esamp import LATENT, REFERENCE, ESampConfig, ESampConfigError, check_beta, check_prefill_pairs

BAD_FIELDS = [
    ("beta", -0.1, "[0.0, 10.0]"),
    ("beta", math.nan, "[0.0, 10.0]"),
    ("beta", 1e9, "[0.0, 10.0]"),
    ("beta", "0.5", "[0.0, 10.0]"),
    ("source_layer", -1, "[0,"),
    ("rank", 0, "[1, 1024]"),
    ("rank", 2.5, "[1, 1024]"),
    ("lr", 0.0, "(0.0, 1.0]"),
    ("lr", math.inf, "(0.0, 1.0]"),
    ("num_slots", 0, "[1, 4096]"),
    ("num_slots", True, "[1, 4096]"),
    ("init", "xavier", "auto, normal, zero, svd"),
    ("variant", "authors", "reference, latent"),
    ("variant", None, "reference, latent"),
    ("state_dtype", "bfloat16", "float32, float64"),
    ("max_candidates", -5, "[0,"),
    ("seed", -1, "[0,"),
    ("prefill_pairs", -1, "[0, 1048576]"),
    ("prefill_pairs", 1.5, "[0, 1048576]"),
    ("client_groups", "yes", "true or false"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_FIELDS)
def test_bad_field_is_rejected_with_field_value_and_range(field, value, allowed):
    with pytest.raises(ESampConfigError) as err:
        ESampConfig(**{field: value})
    message = str(err.value)
    assert err.value.field == field
    assert field in message and repr(value) in message and allowed in message


def test_defaults_are_valid_and_documented_values():
    cfg = ESampConfig()
    assert (cfg.rank, cfg.lr, cfg.state_dtype, cfg.init) == (64, 1e-3, "float32", "auto")
    assert (cfg.prefill_pairs_for(LATENT), cfg.client_groups) == (256, True)
    # the authors' recipe: decode steps only, one training row per group and step, the first token plain
    assert (cfg.prefill_pairs_for(REFERENCE), cfg.train_rows_for(REFERENCE), REFERENCE.fuses_first_token) == (0, "first", False)
    assert (cfg.train_rows_for(LATENT), LATENT.fuses_first_token) == ("all", True)
    assert ESampConfig(prefill_pairs=8, train_rows="all").prefill_pairs_for(REFERENCE) == 8
    assert ESampConfig(train_rows="all").train_rows_for(REFERENCE) == "all"
    assert cfg.init_for(REFERENCE) == "normal" and cfg.init_for(LATENT) == "zero"
    assert ESampConfig(init="svd").init_for(REFERENCE) == "svd"
    assert set(ESampConfig.field_names()) >= {"beta", "source_layer", "rank", "lr", "num_slots", "init"}


def test_source_layer_is_checked_against_model_depth():
    assert ESampConfig().resolve_source_layer(32) == 0
    assert ESampConfig(source_layer=3).resolve_source_layer(30) == 3
    with pytest.raises(ESampConfigError, match="source_layer=29 .*\\[0, 28\\]"):
        ESampConfig(source_layer=29).resolve_source_layer(30)


def test_request_beta_override_uses_the_same_rule():
    assert check_beta(2) == 2.0
    with pytest.raises(ESampConfigError, match="beta"):
        check_beta(float("nan"))


def test_request_prefill_pairs_override_uses_the_same_rule():
    assert check_prefill_pairs(0) == 0
    with pytest.raises(ESampConfigError, match="custom_params.prefill_pairs=-3 .*\\[0, 1048576\\]"):
        check_prefill_pairs(-3, field="custom_params.prefill_pairs")
