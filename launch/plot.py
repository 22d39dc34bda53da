"""``python -m launch.plot``: loss curves of runs (`launch/trainer/plot.py`).

A thin entry so the documented command stays as it was; the code lives in the subpackage."""

from launch.trainer.plot import main

if __name__ == "__main__":
    main()
