"""How much numba saves INC's RTN on MiniLM: one runner-like process per side (numba hidden or not), the
model loaded once, then RTN at 2, 4 and 8 bits twice each (the first use of a bit width pays numba's JIT
compilation; a persistent runner pays it once), timing quantize() and the first evaluation (which unpacks).

    python bench/numba_rtn.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SIDE = """
import json, sys, time
if sys.argv[1] == "off":
    sys.modules["numba"] = None
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
import recipe
from neural_compressor.torch.quantization import RTNConfig, quantize
from neural_compressor.torch.quantization.autotune import _deepcopy_warp
from neural_compressor.torch.utils.environ import can_pack_with_numba
model = recipe.load_model()
recipe.evaluate(model)  # the FP32 reference, not timed
rows = []
for rep in range(2):
    for bits in (2, 4, 8):
        t0 = time.perf_counter()
        q = quantize(_deepcopy_warp(model), RTNConfig(bits=bits, group_size=32, use_sym=True, use_layer_wise=False),
                     run_fn=recipe.calibrate, example_inputs=recipe.example_inputs())
        t1 = time.perf_counter()
        metric = recipe.evaluate(q)
        rows.append({"rep": rep, "bits": bits, "quantize_s": t1 - t0, "eval_s": time.perf_counter() - t1,
                     "metric": metric})
print(json.dumps({"numba": bool(can_pack_with_numba()), "rows": rows}))
"""


def main() -> int:
    from nsd.worker.sandbox import runner_env

    env = {**runner_env(1), "LOGLEVEL": "ERROR", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    got = {}
    for side in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", SIDE, side, str(HERE / "minilm")], env=env, check=True,
                             capture_output=True, text=True, cwd="/tmp").stdout
        got[side] = json.loads(out.strip().splitlines()[-1])
    print(f"numba usable by INC: {got['on']['numba']}")
    print(f"{'rep':>3} {'bits':>4} {'quantize s (torch loop)':>24} {'quantize s (numba)':>19} "
          f"{'first eval s (torch)':>21} {'first eval s (numba)':>21} {'same metric':>11}")
    for a, b in zip(got["off"]["rows"], got["on"]["rows"]):
        print(f"{a['rep']:>3} {a['bits']:>4} {a['quantize_s']:24.2f} {b['quantize_s']:19.2f} {a['eval_s']:21.2f} "
              f"{b['eval_s']:21.2f} {'yes' if a['metric'] == b['metric'] else 'NO':>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
