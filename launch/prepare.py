"""``python -m launch.prepare``: tokenize a corpus once into a sharded folder (`launch/data/prepare.py`).

A thin entry so the documented command stays as it was; the code lives in the subpackage."""

import sys

from launch.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
