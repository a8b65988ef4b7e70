"""Vocabulary-sharded tables under tensor parallelism.

With tensor parallel size > 1 an engine splits the LM head (and the embedding table) by
vocabulary rows: rank r holds rows [start, end). d = W_head[c] · ŷ then needs, on every
rank, the rows of candidates c it holds, a partial product that is 0 elsewhere, and one
sum over the ranks. Each rank sees the same candidates, predictions and sum, so every
rank's Distiller and draw stay identical without any other communication.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class VocabShard(NamedTuple):
    """This rank's vocabulary rows [start, end) and the sum over the ranks (may work in place;
    returns the sum)."""

    start: int
    end: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]

    def local_index(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mine, row): whether this rank holds each id, and its row in the shard (0 where not)."""
        mine = (token_ids >= self.start) & (token_ids < self.end)
        return mine, torch.where(mine, token_ids - self.start, 0)

    def rows(self, table: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary rows table[token_ids] [n, H] from this rank's shard of the table."""
        mine, row = self.local_index(token_ids)
        local = torch.where(mine.unsqueeze(-1), table[row], 0)
        return self.all_reduce(local.contiguous())
