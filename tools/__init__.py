"""Tools around ESamp that are not the algorithm: the default-model helper and the evaluation
harness. Installed as `sgl_esamp.tools`; the engine-agnostic core never imports them."""
