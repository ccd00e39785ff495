"""The model's side of where its tensors live: FluxTransformer asks its `residency` before it uses a group of
tensors. The default has every tensor resident; kontext_rt.transformer_placement supplies one that streams blocks
from host memory. It lives with the model so the model imports nothing above it."""

from __future__ import annotations

from contextlib import nullcontext


class Residency:
    """What the model asks before it uses a group of its tensors (FluxTransformer.residency): the default has every
    tensor resident and does nothing; a placement that keeps some in host memory brings them in for the visit."""

    def block(self, i: int):
        """Around double block i (0..depth-1) or single block depth+i."""
        return nullcontext()

    def modulation_table(self):
        """Around the building of a modulation table (every modulation layer once)."""
        return nullcontext()

    def modulation_layer(self, i: int):
        """Around the modulation layer i (FluxTransformer.modulation_layers order) while the table is built."""
        return nullcontext()


RESIDENT = Residency()
