"""The data pipeline: the prepared-folder format contract (``format``), the loader the trainer
opens (``loader``), ``prepare`` (the CLI that writes folders), ``sources``, ``sampler`` and
``tokenizer``. Imports ``launch.config`` only; never the trainer, studies or measurements.
"""
