"""Held-out accuracy of the shipped sample classifiers against the rank of their fully connected layers.

    python docs/low_rank_accuracy.py        # prints the table of docs/low-rank.md, writes docs/low_rank_accuracy.png

Each sample is converted in memory with ``--rank F`` for shares F of each layer's singular-value energy (the
rank each layer gets is the fewest singular values holding F), and the converted model is run at its native
size on the held-out split its training script draws, the split its model card's accuracy was measured on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample_models"))

SHARES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def held_out(stem: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out inputs (preprocessed as the card says) and labels of one sample."""
    if stem == "digits_lenet":
        import train_digits

        return train_digits.splits()[1]
    if stem == "signals_net":
        import train_signals

        return train_signals.held_out_split()
    import train_shapes

    pictures, labels = train_shapes.held_out_split()
    return train_shapes.normalize(pictures), labels


def accuracy(module: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        scores = torch.cat([module(batch).flatten(1) for batch in inputs.split(250)])
    return float((scores.argmax(1) == labels).float().mean())


def main() -> None:
    from fcconv.low_rank import factor_head
    from fcconv.rewrite import rewrite

    rows = []
    for stem in ("digits_lenet", "signals_net", "shapes_vgg"):
        card = json.loads((REPO / "sample_models" / f"{stem}.json").read_text())
        module_name, _, factory = card["arch"].partition(":")
        model = getattr(__import__(module_name, fromlist=[factory]), factory)(len(card["classes"]))
        model.load_state_dict(torch.load(REPO / "sample_models" / f"{stem}.pt", weights_only=True))
        model.eval()
        inputs, labels = held_out(stem)
        full = accuracy(model, inputs, labels)
        for share in SHARES:
            conversion = rewrite(model, tuple(card["input_shape"]))
            factored = factor_head(conversion, share)
            kept = sum(f.factored_parameters for f in factored) / sum(f.parameters for f in factored)
            rows.append(
                {
                    "sample": stem,
                    "share": share,
                    "ranks": {f.name: f"{f.rank}/{f.full_rank}" for f in factored},
                    "weights": kept,
                    "accuracy": accuracy(conversion.module, inputs, labels),
                    "original": full,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    print("| sample | energy kept | ranks | head weights | held-out accuracy (original) |")
    print("|---|---|---|---|---|")
    for row in rows:
        ranks = ", ".join(f"{name} {rank}" for name, rank in row["ranks"].items())
        print(
            f"| {row['sample']} | {row['share']:g} | {ranks} | {row['weights']:.1%} | "
            f"{row['accuracy']:.2%} ({row['original']:.2%}) |"
        )
    plot(rows, REPO / "docs" / "low_rank_accuracy.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    for stem in dict.fromkeys(row["sample"] for row in rows):
        mine = [row for row in rows if row["sample"] == stem]
        axes.plot([100 * r["weights"] for r in mine], [100 * r["accuracy"] for r in mine], "o-", label=stem)
        for row in mine:
            axes.annotate(f"{row['share']:g}", (100 * row["weights"], 100 * row["accuracy"]), fontsize=7,
                          textcoords="offset points", xytext=(3, -9))  # fmt: skip
    axes.set_xlabel("head weights kept, % (labels: share of each layer's energy kept)")
    axes.set_ylabel("held-out accuracy, %")
    axes.set_title("Sample classifiers with low-rank heads (--rank F)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})


if __name__ == "__main__":
    main()
