"""The recipes around the optimizer, one way down: the product (``trainer/``, ``data/``,
``config``, and the thin command modules ``train``, ``prepare``, ``plan``, ``tokenizer``,
``plot``), studies (``studies/``) and one-off measurements (``measure/``), which import the
product and are imported by nothing in it (``tests/test_architecture.py``). The shell scripts
(``setup_env.sh``, ``run.sh``, ``slurm.sbatch``) sit here beside the commands they run."""
