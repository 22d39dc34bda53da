"""Training entry points and launch scripts for mano_dist."""
