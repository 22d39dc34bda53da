"""Benchmark commands: ``python -m mano_dist.bench <name>``; each prints ratios measured in one run."""
