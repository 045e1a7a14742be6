"""A weight-only trial's first evaluation: INC's own (its first forward unpacks and recovers every layer's
weight column by column) against nsd's (`nsd.quant.unpack.recover_weights` first, on whole tensors), side
by side in one process on the same quantized models; the metrics must be identical.

    python bench/recover.py [--spec bench/minilm/task.toml] [--repeat 2]

For each RTN config of the spec's config set: quantize once, then time, on two copies, (a) INC: evaluate;
(b) nsd: recover_weights, then evaluate. Prints both, their ratio and the evaluation alone (a second
evaluate of (a): no unpacking left), and exits 1 if a metric differs.
"""

from __future__ import annotations

import os

os.environ.setdefault("LOGLEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "bench" / "minilm" / "task.toml"))
    parser.add_argument("--repeat", type=int, default=2, help="timings per config (the median is shown)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from neural_compressor.torch.quantization import quantize
    from neural_compressor.torch.quantization.autotune import _deepcopy_warp

    from nsd.client.specs import prepare_spec, read_spec
    from nsd.quant.inc import expand
    from nsd.quant.unpack import recover_weights

    torch.set_num_threads(args.threads)
    spec = prepare_spec(read_spec(args.spec))
    loader = importlib.util.spec_from_file_location("bench_recipe", spec["recipe"]["file"])
    recipe = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(recipe)
    model = recipe.load_model()
    recipe.evaluate(_deepcopy_warp(model))  # the recipe's own one-off costs (an FP32 reference), outside timing
    from nsd.quant.inc import config_from_dict

    print(f"{'config':48s} {'INC first eval s':>16} {'nsd recover+eval s':>18} {'ratio':>6} {'eval alone s':>12}")
    same = True
    for entry in expand(spec["tuning"]["config_set"], spec["tuning"]["max_trials"]):
        q = quantize(_deepcopy_warp(model), quant_config=config_from_dict(entry["config"]), run_fn=recipe.calibrate,
                     inplace=True, example_inputs=recipe.example_inputs())
        inc, ours, alone = [], [], []
        for _ in range(args.repeat):
            a, b = copy.deepcopy(q), copy.deepcopy(q)
            t0 = time.perf_counter()
            m_inc = recipe.evaluate(a)
            t1 = time.perf_counter()
            recipe.evaluate(a)
            t2 = time.perf_counter()
            recover_weights(b)
            m_ours = recipe.evaluate(b)
            t3 = time.perf_counter()
            inc.append(t1 - t0), alone.append(t2 - t1), ours.append(t3 - t2)
            same &= m_inc == m_ours
        i, o = statistics.median(inc), statistics.median(ours)
        print(f"{entry['label'][:48]:48s} {i:16.3f} {o:18.3f} {o / i:6.2f} {statistics.median(alone):12.3f}"
              f"{'' if m_inc == m_ours else '  METRIC DIFFERS'}", flush=True)
    print("metrics identical" if same else "METRICS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
