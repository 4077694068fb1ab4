"""The training loop the digit and signal samples share: Adam, shuffled batches of 128, seeded."""

from __future__ import annotations

import torch
from torch import nn


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

    The batch order comes from a generator seeded with ``seed``, so a rerun on the same
    machine gives the same weights.
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
