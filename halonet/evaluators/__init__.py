"""Scores beyond top-1 on the training set's eval splits: ImageNet-ReaL, the robustness sets and
few-shot linear probes on frozen features."""
