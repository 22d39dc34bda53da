"""The spawn harness lives in the package (benchmarks use it too); tests import it from here."""

from mano_dist.multiprocess import run_distributed

__all__ = ["run_distributed"]
