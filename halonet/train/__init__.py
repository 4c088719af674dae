"""Training and evaluation: the loop, the jitted step, exact evaluation, the optimizer, Orbax
checkpoints, the workdir's files, fine-tuning, progress and the commands' launch."""
