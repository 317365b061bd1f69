"""Layer-major passes: every batch through block 0, then every batch through block 1, and so on.

Holding the residual streams of all batches (tokens x hidden floats: 128 x 256 x 2048 x 4 B = 268 MB for
llama-3.2-1b's calibration set) costs far less than one block's weights, and it lets a pass see one
block at a time. Two users:

* calibration (:mod:`.collect`): each layer's statistics are complete, and can be written to disk,
  before the next layer starts, so peak memory is one layer's statistics plus the streams;
* scoring a subnet (:class:`PrunedView`): the pruned blocks are sliced from the dense model one at a
  time and dropped after use, so a search trial costs one pruned block instead of a pruned model.

Per batch the result equals the ordinary forward pass exactly (the same operations in the same order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .model import Block, Decoder, Prepared
from .surgery import prune_block

__all__ = ["PrunedView", "LayerMajor", "run_layer_major"]

LayerMajor = Decoder  # anything with prepare / blocks / head (Decoder, PrunedView)
BlockHook = Callable[[int, Block, list[torch.Tensor], list[torch.Tensor]], None]


class PrunedView(nn.Module):
    """``prune_decoder(dense, kept, overrides)`` as a read-only view: blocks are built one at a time on demand.

    Embeddings, final norm and LM head are the dense model's own (pruning keeps the hidden size).
    ``forward`` gives the pruned model's logits, but nothing here is meant for export: use
    ``prune_decoder`` (the family's ``prune``) for a model that stands alone.
    """

    def __init__(
        self,
        dense: Decoder,
        kept: Mapping[str, Iterable[int]],
        overrides: Mapping[str, torch.Tensor] | Callable[[int], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self._dense = [dense]  # a list: not registered as a submodule (its parameters are not ours)
        self.kept = {k: tuple(v) for k, v in kept.items()}
        # a mapping, or layer -> that layer's overrides, asked for when the block is built
        self.overrides = overrides if callable(overrides) else dict(overrides or {})

    @property
    def dense(self) -> Decoder:
        return self._dense[0]

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Prepared:
        return self.dense.prepare(input_ids, attention_mask)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense.head(x)

    def blocks(self) -> Iterator[Block]:
        for i in range(self.dense.config.num_layers):
            # no local for the overrides: this frame would keep block i's reconstructed weights alive
            # (after the level cache dropped them) while block i + 1's are built
            yield prune_block(
                self.dense, i, self.kept, self.overrides(i) if callable(self.overrides) else self.overrides
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        (x,) = run_layer_major(self, [(input_ids, attention_mask)])  # type: ignore[arg-type]  # duck-typed
        return self.head(x)


def run_layer_major(
    model: LayerMajor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    on_block: BlockHook | None = None,
) -> list[torch.Tensor]:
    """Residual streams after the last block (before the final norm), one (batch, len, hidden) per batch.

    ``on_block(i, block, inputs, outputs)`` runs after block ``i`` has processed every batch (inputs are
    the streams entering it, outputs those leaving it).
    """
    prepared = [model.prepare(ids, mask) for ids, mask in batches]
    xs = [p[0] for p in prepared]
    for i, block in enumerate(model.blocks()):
        outs = [block(x, p[1], p[2], None)[0] for x, p in zip(xs, prepared)]
        if on_block is not None:
            on_block(i, block, xs, outs)
        xs = outs
        del block
    return xs
