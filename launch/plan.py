"""``python -m launch.plan``: memory, traffic and the dry run for a cluster (`launch/trainer/plan.py`).

A thin entry so the documented command stays as it was; the code lives in the subpackage."""

from launch.trainer.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
