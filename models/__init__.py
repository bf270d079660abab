"""Reference models (V-MoE, Mobile V-MoE), data, and the training/evaluation CLI."""
