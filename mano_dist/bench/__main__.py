"""Dispatch ``python -m mano_dist.bench <name> [args]`` to ``mano_dist.bench.<name>.main``."""

import importlib
import pkgutil
import sys

import mano_dist.bench as bench


def main() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m mano_dist.bench {{{','.join(names)}}} [options]  (--help per command)")
    importlib.import_module(f"mano_dist.bench.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
