"""Detection and instance segmentation on this codebase's backbones (the paper's Mask R-CNN
table): box geometry, RoIAlign and NMS with static shapes, so one jax.jit compiles them."""
