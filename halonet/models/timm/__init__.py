"""timm's halo networks rebuilt in Flax (byob) with the lambda layer, so their weights convert by
name."""
