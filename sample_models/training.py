"""What the training scripts share: where they write, and the loop of the digit and signal samples.

The loop is Adam over shuffled batches of 128, seeded. A script writes its checkpoint and model card to
``sample_models/retrained/`` (or ``--out DIR``), never over the shipped files unless given ``--replace``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RETRAINED = HERE / "retrained"


def output_dir(description: str, argv: list[str] | None = None) -> Path:
    """The folder a training script writes to, from its command line: ``--out DIR``, or ``--replace``.

    The default is ``sample_models/retrained/``, so that a retraining leaves the shipped checkpoints
    (pinned by the sha256 in their cards) as they are; ``--replace`` writes over them.
    """
    parser = argparse.ArgumentParser(description=description)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, default=RETRAINED, help="folder to write to (default: sample_models/retrained/)"
    )
    where.add_argument("--replace", action="store_true", help="write over the shipped checkpoint and card")
    args = parser.parse_args(argv)
    return HERE if args.replace else args.out


def save_sample(model: nn.Module, card: dict, folder: Path, stem: str) -> Path:
    """Write ``stem.pt`` (the state_dict) and ``stem.json`` (the card, with the checkpoint's sha256) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f"{stem}.pt"
    torch.save(model.state_dict(), checkpoint)
    card = {**card, "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    (folder / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {checkpoint} and {checkpoint.with_suffix('.json')}")
    return checkpoint


def fit_classifier(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    seed: int,
    lr: float = 2e-3,
) -> float:
    """Train ``model`` on ``train`` (inputs, labels) with cross-entropy; returns its last held-out accuracy.

    The batch order comes from a generator seeded with ``seed``.
    """
    (x_train, y_train), (x_test, y_test) = train, held_out
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 128):
            batch = order[start : start + 128]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: held-out accuracy {accuracy:.4f}")
    return accuracy
