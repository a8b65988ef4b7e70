"""Where the variants' taps (sgl_esamp/variants.py) come from in an SGLang forward.

SGLang's EAGLE3 aux capture (switched on by `--sampler esamp`, no draft model) packs, for
every token of the forward, the residual stream entering layer i+1 for each requested
layer id i, in layer order; FULL capture mode adds the final post-norm state. From those:

  first_layer_input_normed  RMSNorm_0(token embedding). SGLang's capture ids must be >= 0,
                            so the residual entering layer 0, the embedding itself, is read
                            from the embedding table at the forward's input ids.
  source_block_output       capture id `source_layer`
  last_layer_input_normed   RMSNorm_{L-1}(capture id L-2)
  final_normed              `last_hidden_states`

The norms are the layers' own input_layernorm weights and epsilon. Llama/Qwen2-style
layouts (`model.model.embed_tokens`, `.layers[i].input_layernorm`, `.norm`). Each tap is one
gather (with its norm) out of SGLang's buffers (`tap_rows`: one Triton launch on a GPU), so
SGLang may rewrite them right after the step.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sgl_esamp import ESampConfig, Variant, VocabShard, rms_norm
from sgl_esamp.ops import tap_rows_for
from sgl_esamp.variants import FINAL_NORMED, FIRST_LAYER_INPUT_NORMED, LAST_LAYER_INPUT_NORMED, SOURCE_BLOCK_OUTPUT


def captured_layers(config: ESampConfig, num_layers: int) -> dict[str, int]:
    """The SGLang aux-capture id of each tap the served variants read from the capture (id i
    captures the residual entering layer i+1)."""
    layer_of = {SOURCE_BLOCK_OUTPUT: config.resolve_source_layer(num_layers), LAST_LAYER_INPUT_NORMED: num_layers - 2}
    return {tap: layer_of[tap] for variant in config.served for tap in (variant.source, variant.target)
            if tap in layer_of}


def capture_layer_ids(config: ESampConfig, num_layers: int) -> list[int]:
    """SGLang aux-capture ids the served variants' taps need, in the order SGLang packs them."""
    return sorted(set(captured_layers(config, num_layers).values()))


class Taps:
    """The (shallow, deep) states of chosen token rows of one forward, per variant."""

    def __init__(self, model: Any, config: ESampConfig, num_layers: int, embedding_shard: Optional[VocabShard] = None,
                 kernels: str = "torch"):
        """embedding_shard: this rank's rows of a vocabulary-parallel embedding (tensor parallel);
        kernels: the path the gathers run on ("triton" or "torch")."""
        layers = model.model.layers
        self.embedding = model.model.embed_tokens.weight
        self.embedding_shard = embedding_shard
        first, last = layers[0].input_layernorm, layers[num_layers - 1].input_layernorm
        self.norms = {FIRST_LAYER_INPUT_NORMED: (first.weight, first.variance_epsilon),
                      LAST_LAYER_INPUT_NORMED: (last.weight, last.variance_epsilon),
                      FINAL_NORMED: (model.model.norm.weight, model.model.norm.variance_epsilon)}
        self.hidden_size = self.embedding.shape[1]
        ids = capture_layer_ids(config, num_layers)
        self.width = len(ids) * self.hidden_size  # of SGLang's captured hidden_states
        self.columns = {tap: ids.index(layer) for tap, layer in captured_layers(config, num_layers).items()}
        self.tap_rows = tap_rows_for(kernels)

    def target_norm_weight(self, variant: Variant) -> torch.Tensor:
        """The weight of the norm that produced the variant's target (the zero/svd inits' LN gain)."""
        return self.norms[variant.target][0]

    def states(self, variant: Variant, logits_output: Any, input_ids: torch.Tensor,
               index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [len(index), H] for the forward's token rows `index`."""
        return tuple(self._tap(name, logits_output, input_ids, index) for name in (variant.source, variant.target))

    def _tap(self, name: str, logits_output: Any, input_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        norm = self.norms.get(name)
        if name == FINAL_NORMED:
            return self.tap_rows(logits_output.last_hidden_states, index)
        if name == FIRST_LAYER_INPUT_NORMED:
            if self.embedding_shard is not None:  # a vocabulary-parallel table: rows from the shards, one sum
                return rms_norm(self.embedding_shard.rows(self.embedding, input_ids.index_select(0, index)), *norm)
            return self.tap_rows(self.embedding, index, ids=input_ids, norm=norm)
        H, column = self.hidden_size, self.columns[name]
        return self.tap_rows(logits_output.hidden_states, index, columns=(column * H, H), norm=norm)
