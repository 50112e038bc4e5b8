"""Training: settings and flags, the recipes, the one step loop, the torch learner, run directories, checkpoints, devices, torchrun."""
