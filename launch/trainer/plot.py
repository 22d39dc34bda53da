"""Plot training and validation loss of one or more runs: ``python -m launch.plot runs/a runs/b -o out.png``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .metrics import read_metrics


def plot_runs(paths: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for i, path in enumerate(paths):
        path = Path(path)
        recs = read_metrics(path)
        label = labels[i] if labels else (path.parent.name if path.name == "metrics.jsonl" else path.name)
        ax_train.plot([r["tokens"] / 1e6 for r in recs], [r["loss"] for r in recs], label=label, lw=1)
        val = [r for r in recs if "val_loss" in r]
        ax_val.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], marker="o", label=label)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens (millions)")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders or metrics.jsonl files")
    ap.add_argument("-o", "--out", type=Path, default=Path("loss.png"))
    ap.add_argument("--labels", nargs="*")
    args = ap.parse_args(argv)
    print(plot_runs(args.runs, args.out, args.labels))


if __name__ == "__main__":
    main()
