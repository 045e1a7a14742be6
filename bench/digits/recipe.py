"""nsd recipe for the benchmark: the digits CNN of examples/digits, scored on an evaluation-heavy set — the
360 held-out test digits, each with pixel noise (sigma 0.15 of the 0..1 range), 40 variants per digit
(14,400 images, fixed seed). Evaluation dominates a trial here, as on real classification tasks, so this is
where early stopping and parallel trials matter; RTN itself takes a few milliseconds on this model.

INC 3.x's contract (load_model, example_inputs, calibrate, evaluate) plus score_batches / SCORE_RANGE /
SCORE_COUNT for nsd's early stop; evaluate() sums the same batches (same float as nsd's metric).
"""

import os
from pathlib import Path

import torch
from torch import nn

# nsd uploads model.path and tells the runner where its copy is (this file travels alone); run by hand or
# by INC's side of the benchmark, the example's weights.
WEIGHTS = Path(os.environ.get("NSD_MODEL_PATH")
               or Path(__file__).resolve().parents[2] / "examples" / "digits" / "model.pt")


class DigitsCNN(nn.Module):  # the same network as examples/digits/recipe.py
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _split():
    """examples/digits' split: 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(len(y) * 0.8)
    return x[:cut], x[cut:], y[cut:]


X_TRAIN, X_TEST, Y_TEST = _split()


def load_model() -> nn.Module:
    model = DigitsCNN()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


def example_inputs():
    return (X_TEST[:8],)


def calibrate(model) -> None:
    with torch.no_grad():
        for i in range(0, 256, 64):
            model(X_TRAIN[i:i + 64])


VARIANTS = 40
EVAL_BATCH = 1200


def _variants() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs, ys = [], []
    for _ in range(VARIANTS):
        xs.append((X_TEST + 0.15 * torch.randn(X_TEST.shape, generator=g)).clamp(0, 1))
        ys.append(Y_TEST)
    return torch.cat(xs), torch.cat(ys)


X_EVAL, Y_EVAL = _variants()
SCORE_RANGE = (0, 1)
SCORE_COUNT = len(Y_EVAL)


def score_batches(model):
    with torch.no_grad():
        for i in range(0, len(Y_EVAL), EVAL_BATCH):
            x, y = X_EVAL[i:i + EVAL_BATCH], Y_EVAL[i:i + EVAL_BATCH]
            yield int((model(x).argmax(1) == y).sum()), len(y)


def evaluate(model) -> float:
    total = count = 0
    for correct, n in score_batches(model):
        total, count = total + correct, count + n
    return total / count
