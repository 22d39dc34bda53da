"""The trainer as a library: the loop (``loop``), engines (FSDP2, DeepSpeed), the model, parallelism,
metrics and their plot, preemption, the run folder's identity, the planner and its dry run.
Imports ``launch.config`` and ``launch.data``; never the studies or measurements.
"""
