"""nsd recipe: a small CNN on scikit-learn's bundled 8x8 digits (real weights, real data, no downloads).

INC 3.x's own contract: load_model(), example_inputs(), calibrate(model), evaluate(model) -> float.
It also defines score_batches(model) with SCORE_RANGE and SCORE_COUNT, so that nsd can stop evaluating a
trial once it can no longer matter (evaluate() is the same sum over the same batches, for INC).
"""

import os
from pathlib import Path

import torch
from torch import nn

# nsd uploads model.path and tells the runner where its copy is; run by hand, the file beside this one.
WEIGHTS = Path(os.environ.get("NSD_MODEL_PATH") or Path(__file__).with_name("model.pt"))


class DigitsCNN(nn.Module):
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


def load_split():
    """The digits split 80/20 with a fixed seed: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(len(y) * 0.8)
    return x[:cut], y[:cut], x[cut:], y[cut:]


X_TRAIN, _, X_TEST, Y_TEST = load_split()


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


EVAL_BATCH = 40
SCORE_RANGE = (0, 1)  # per sample: 1 if classified correctly
SCORE_COUNT = len(Y_TEST)


def score_batches(model):
    """(correct, count) per batch of the test set: accuracy = total correct / SCORE_COUNT."""
    with torch.no_grad():
        for i in range(0, len(Y_TEST), EVAL_BATCH):
            yield int((model(X_TEST[i:i + EVAL_BATCH]).argmax(1) == Y_TEST[i:i + EVAL_BATCH]).sum()), \
                len(Y_TEST[i:i + EVAL_BATCH])


def evaluate(model) -> float:
    total = count = 0
    for correct, n in score_batches(model):
        total, count = total + correct, count + n
    return total / count
