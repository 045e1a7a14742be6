"""The digits recipe, but the runner dies of SIGSEGV on 2-bit models and evaluation is slow otherwise."""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _digits import digits  # noqa: E402

load_model, example_inputs, calibrate = digits.load_model, digits.example_inputs, digits.calibrate
SLOW_S = float(os.environ.get("NSD_TEST_SLOW_S", "0"))


def evaluate(model) -> float:
    accuracy = digits.evaluate(model)
    if accuracy < 0.9:
        os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(SLOW_S)
    return accuracy
