"""A small MLP on scikit-learn's digits for the fallback search: weights from $NSD_MODEL_PATH, written by
`train()` in the test process (so every runner scores the very same model). The file's "arch" picks a plain
stack (no blocks) or two blocks in an nn.ModuleList."""

import os

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, arch: str) -> None:
        super().__init__()
        if arch == "blocks":
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.ReLU())
                                         for _ in range(2)])
        else:
            self.body = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                                      nn.Linear(48, 48), nn.ReLU())
        self.head = nn.Linear(64 if arch == "blocks" else 48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in getattr(self, "blocks", [getattr(self, "body", None)]):
            x = block(x)
        return self.head(x)


def load_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(len(y) * 0.8)
    return x[:cut], y[:cut], x[cut:], y[cut:]


X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = load_split()


def train(path: str, arch: str, steps: int = 300) -> None:
    torch.manual_seed(0)
    model = MLP(arch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        i = (step * 64) % (len(Y_TRAIN) - 64)
        loss = nn.functional.cross_entropy(model(X_TRAIN[i:i + 64]), Y_TRAIN[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"arch": arch, "state": model.state_dict()}, path)


def load_model() -> nn.Module:
    saved = torch.load(os.environ["NSD_MODEL_PATH"], weights_only=True)
    model = MLP(saved["arch"])
    model.load_state_dict(saved["state"])
    return model.eval()


def example_inputs():
    return (X_TEST[:8],)


def calibrate(model) -> None:
    with torch.no_grad():
        model(X_TRAIN[:128])


def evaluate(model) -> float:
    with torch.no_grad():
        return float((model(X_TEST).argmax(-1) == Y_TEST).float().mean())
