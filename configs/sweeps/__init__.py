"""Ablation sweeps for sweep.py: the paper's at H1/ImageNet scale, each with a ':cpu' scale."""
