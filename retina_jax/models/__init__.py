"""Model towers and the two-tower model."""
import flax.linen as nn


def maybe_remat(block_cls, enabled: bool, static_argnums: tuple[int, ...] = ()):
    """`block_cls`, rematerialised when `enabled` (`config.model.remat`): the block's activations
    are recomputed in the backward pass instead of being kept from the forward one, trading about
    a third more compute for activation memory that no longer grows with depth. The parameter tree
    and the numbers are unchanged. `static_argnums` name the Python-valued call arguments (train /
    deterministic flags), counting `self` as 0."""
    return nn.remat(block_cls, static_argnums=static_argnums) if enabled else block_cls
