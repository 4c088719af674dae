"""The networks: the HaloNet backbone and its checks, the builder of the network a config names,
stems, conv-norm, the pluggable mixers and channel attention, and timm's halo networks."""
