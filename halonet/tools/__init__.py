"""Work on trained runs and sets of runs: predictions and features, attention maps, timm's
weights converted, the variants' table, and ablation sweeps with their report."""
