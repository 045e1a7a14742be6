"""The digits recipe with a slow evaluate (NSD_TEST_SLOW_S seconds), and with NSD_TEST_HANG=1 one that
never returns for badly quantized models (accuracy under 0.9): for liveness and timeout tests."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _digits import digits  # noqa: E402

load_model, example_inputs, calibrate = digits.load_model, digits.example_inputs, digits.calibrate


def evaluate(model) -> float:
    import torch

    print(f"cores {sorted(os.sched_getaffinity(0))} threads {torch.get_num_threads()}", flush=True)
    accuracy = digits.evaluate(model)
    if os.environ.get("NSD_TEST_HANG") == "1" and accuracy < 0.9:
        print("about to hang", flush=True)
        while True:
            time.sleep(1)
    time.sleep(float(os.environ.get("NSD_TEST_SLOW_S", "0")))
    return accuracy
