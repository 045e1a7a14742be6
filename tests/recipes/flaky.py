"""The digits recipe, but evaluate() raises for badly quantized models (accuracy under 0.9)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _digits import digits  # noqa: E402

load_model, example_inputs, calibrate = digits.load_model, digits.example_inputs, digits.calibrate


def evaluate(model) -> float:
    accuracy = digits.evaluate(model)
    if accuracy < 0.9:
        raise ValueError(f"accuracy {accuracy:.3f} too low to trust this evaluation")
    return accuracy
