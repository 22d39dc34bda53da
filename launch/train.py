"""``python -m launch.train``: the trainer (`launch/trainer/loop.py`: the Trainer and this command's `main`).

A thin entry so the documented command stays as it was; the code lives in the subpackage."""

from launch.trainer.loop import exit_now, main

if __name__ == "__main__":
    exit_now(main())
