"""``python -m launch.tokenizer``: fetch, check or train a tokenizer (`launch/data/tokenizer.py`).

A thin entry so the documented command stays as it was; the code lives in the subpackage."""

import sys

from launch.data.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
