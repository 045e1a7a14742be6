"""The digits recipe whose batch-wise scoring (what early stop evaluates through) is slow — SLOW_BATCH_S per
batch — while `evaluate()` (what the FP32 baseline runs) is not: a trial started beside the baseline is
still evaluating when the baseline lands, so it learns its early-stop rule mid-evaluation."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _digits import digits  # noqa: E402

load_model, example_inputs, calibrate, evaluate = digits.load_model, digits.example_inputs, digits.calibrate, \
    digits.evaluate
SCORE_RANGE, SCORE_COUNT = digits.SCORE_RANGE, digits.SCORE_COUNT
SLOW_BATCH_S = 0.4


def score_batches(model):
    for part in digits.score_batches(model):
        time.sleep(SLOW_BATCH_S)
        yield part
