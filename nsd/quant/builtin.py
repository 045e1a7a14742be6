"""Built-in recipes: Hugging Face models tuned with no user code (`recipe.kind` in the spec).

- `text-classification`: AutoModelForSequenceClassification on a CSV/JSONL file with a text column (and an
  optional second text column for pairs) and a label column; metric `accuracy` (default) or macro `f1`.
- `feature-extraction`: AutoModel, mean-pooled L2-normalized sentence embeddings; metric `cosine` (default):
  mean cosine similarity of the model's embeddings to the FP32 model's, on a text file of sentences (one a
  line; or a table's text column); or `spearman`: Spearman correlation between the cosine similarity of the
  two sentences of each row of a CSV/JSONL file (text_column, text_pair_column) and its score (label_column).
  Each metric is one strategy object (`CosineToFP32`, `PairSpearman`).
- `causal-lm`: AutoModelForCausalLM; the text file is tokenized, packed into blocks of `seq_len` tokens and
  scored by perplexity (lower is better).

The kinds and the metrics each offers are one table, `nsd.spec.BUILTIN_RECIPES`; `RECIPES` maps each kind to
its class here. Each recipe is a `nsd.quant.recipes.Recipe` (load_model, example_inputs, calibrate, evaluate)
plus `export`, which the runner calls once per task for the configs that need a PT2E graph (static_quant,
pt2e_dynamic_quant); weight-only configs get the plain module (`nsd.quant.hf_recipe`). Evaluation takes the
first `eval_samples` rows (blocks for causal-lm); calibration the `calibration_samples` rows after them, or,
where the file has no more, rows from its start. Metrics: `nsd.quant.metrics`; file readers: `nsd.quant.data`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nsd.quant.data import batched, column, is_table, number, read_lines, read_rows, split
from nsd.quant.hf_recipe import HFRecipe
from nsd.quant.metrics import macro_f1, perplexity, same_length, spearman
from nsd.quant.scoring import SLACK, accuracy_steps


class TextClassification(HFRecipe):
    kind = "text-classification"
    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, spec: dict):
        super().__init__(spec)
        if not is_table(self.data_path):
            raise ValueError(f"text-classification reads a CSV or JSONL file with columns "
                             f"{self.text_column!r} and {self.label_column!r}; got {self.data_path}")
        self._data = None

    def _load(self):
        model = super()._load()
        if model.config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            model.config.pad_token_id = self.tokenizer.pad_token_id  # GPT-style classifiers find the last token
        return model

    def _prepared(self):
        if self._data is None:
            rows = read_rows(self.data_path)
            texts = column(rows, self.text_column, self.data_path)
            pairs = column(rows, self.text_pair_column, self.data_path) if self.text_pair_column else None
            labels = [self._label_id(v, n) for n, v in
                      enumerate(column(rows, self.label_column, self.data_path, "label"), 1)]
            ev, cal = split(len(rows), self.eval_samples, self.calibration_samples)
            pick = (lambda seq, idx: [seq[i] for i in idx] if seq is not None else None)
            self._data = {
                "texts": (pick(texts, ev), pick(pairs, ev)),
                "eval": self._encode(pick(texts, ev), pick(pairs, ev)),
                "labels": pick(labels, ev),
                "calib": self._encode(pick(texts, cal), pick(pairs, cal)),
            }
        return self._data

    def _label_id(self, value: Any, row: int) -> int:
        config = self.config
        n_labels = int(getattr(config, "num_labels", 2))
        label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        lowered = {k.lower(): v for k, v in label2id.items()}
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            text = value.strip()
            if text in label2id:
                value = label2id[text]
            elif text.lower() in lowered:
                value = lowered[text.lower()]
            elif text.lstrip("-").isdigit():
                value = int(text)
        if not isinstance(value, int) or not 0 <= value < n_labels:
            raise ValueError(f"{self.data_path} row {row}: label {value!r} is not one of the model's "
                             f"{n_labels} labels (0..{n_labels - 1} or {', '.join(sorted(label2id))})")
        return value

    def _calibration_batches(self) -> list[dict]:
        return self._prepared()["calib"]

    def _benchmark_texts(self):
        return self._prepared()["texts"]

    def _predictions(self, model):
        import torch

        with torch.no_grad():
            for batch in self._prepared()["eval"]:
                yield self._forward(model, batch).argmax(-1).tolist()

    def evaluate_steps(self, model):
        labels = self._prepared()["labels"]
        if self.metric != "accuracy":  # macro F1: no exact bound from a prefix; runs in full
            predictions = [p for part in self._predictions(model) for p in part]
            return macro_f1(predictions, labels)

        def correct():
            seen = 0
            for part in self._predictions(model):
                yield sum(p == t for p, t in zip(part, labels[seen:seen + len(part)])), len(part)
                seen += len(part)
            same_length(range(seen), labels)

        return (yield from accuracy_steps(correct(), len(labels)))


class FeatureExtraction(HFRecipe):
    """Sentence embeddings; what is scored, and on which data, is the metric's strategy (`SCORES`)."""

    kind = "feature-extraction"
    auto_class = "AutoModel"

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.score = SCORES[self.metric](self)
        self._data = None

    def _load(self):
        from transformers import AutoModel

        try:  # BERT-like encoders: the pooler is unused here, and an unused pooler breaks PT2E annotation
            return AutoModel.from_pretrained(self.model_path, local_files_only=True, add_pooling_layer=False)
        except TypeError:
            return AutoModel.from_pretrained(self.model_path, local_files_only=True)

    def _prepared(self):
        if self._data is None:
            self._data = self.score.prepare()
        return self._data

    def _calibration_batches(self) -> list[dict]:
        return self._prepared()["calib"]

    def _benchmark_texts(self):
        return self._prepared()["texts"], None

    def _on_first_load(self, model) -> None:
        self.score.on_first_load(model)

    def embed(self, model, batch: dict):
        """Mean-pooled (over real tokens), L2-normalized embeddings of one batch, in float64."""
        import torch

        hidden = self._forward(model, batch).double()  # float64: cosines near 1 stay distinguishable
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def _embed(self, model, batches: list[dict]):
        import torch

        with torch.no_grad():
            return torch.cat([self.embed(model, b) for b in batches])

    def evaluate_steps(self, model):
        return self.score.steps(model)


class CosineToFP32:
    """Metric `cosine`: the mean cosine similarity of each sentence's embedding to the FP32 model's (the
    reference, computed once with the first FP32 model); bounded (the rest all 1 / all -1)."""

    def __init__(self, recipe: FeatureExtraction):
        self.recipe = recipe
        self.reference = None  # FP32 embeddings of the evaluation sentences

    def prepare(self) -> dict:
        r = self.recipe
        if is_table(r.data_path):
            rows = read_rows(r.data_path)
            texts = column(rows, r.text_column, r.data_path)
            if r.text_pair_column:
                texts += column(rows, r.text_pair_column, r.data_path)
        else:
            texts = read_lines(r.data_path)
        if not texts:
            raise ValueError(f"{r.data_path} has no sentences")
        ev, cal = split(len(texts), r.eval_samples, r.calibration_samples)
        return {"eval": r._encode([texts[i] for i in ev]), "calib": r._encode([texts[i] for i in cal]),
                "texts": [texts[i] for i in ev]}

    def on_first_load(self, model) -> None:
        self.reference = self.recipe._embed(model, self.recipe._prepared()["eval"])

    def steps(self, model):
        import torch

        data = self.recipe._prepared()
        if self.reference is None:
            self.recipe.load_model()  # computes the FP32 reference once
        n = self.reference.shape[0]
        cosines, total, seen = [], 0.0, 0
        with torch.no_grad():
            for batch in data["eval"]:
                rows = batch["attention_mask"].shape[0]
                part = (self.recipe.embed(model, batch) * self.reference[seen:seen + rows]).sum(-1)
                cosines.append(part)
                total, seen = total + part.sum().item(), seen + part.shape[0]
                # Each cosine of unit vectors lies in [-1, 1] (plus rounding: SLACK).
                yield (total - (n - seen)) / n - SLACK, (total + (n - seen)) / n + SLACK
        return torch.cat(cosines).mean().item()


class PairSpearman:
    """Metric `spearman`: Spearman correlation between the cosine similarity of each row's two sentences and
    its score. A rank correlation has no exact bound from a prefix: it runs in full."""

    def __init__(self, recipe: FeatureExtraction):
        if not (is_table(recipe.data_path) and recipe.text_pair_column):
            raise ValueError("the spearman metric reads a CSV or JSONL file of sentence pairs and scores: set "
                             "recipe.text_column, recipe.text_pair_column and recipe.label_column")
        self.recipe = recipe

    def prepare(self) -> dict:
        r = self.recipe
        rows = read_rows(r.data_path)
        first = column(rows, r.text_column, r.data_path)
        second = column(rows, r.text_pair_column, r.data_path)
        scores = [number(v, r.data_path, n) for n, v in
                  enumerate(column(rows, r.label_column, r.data_path, "score"), 1)]
        ev, cal = split(len(rows), r.eval_samples, r.calibration_samples)
        calib_texts = [t for i in cal for t in (first[i], second[i])][:max(1, r.calibration_samples)]
        return {"eval": (r._encode([first[i] for i in ev]), r._encode([second[i] for i in ev])),
                "scores": [scores[i] for i in ev], "calib": r._encode(calib_texts), "texts": [first[i] for i in ev]}

    def on_first_load(self, model) -> None:
        pass

    def steps(self, model):
        data = self.recipe._prepared()
        first, second = data["eval"]
        similarity = (self.recipe._embed(model, first) * self.recipe._embed(model, second)).sum(-1)
        return spearman(similarity.tolist(), data["scores"])
        yield  # noqa: unreachable - makes this a generator


SCORES = {"cosine": CosineToFP32, "spearman": PairSpearman}  # feature-extraction's metrics (nsd.spec's table)


class CausalLM(HFRecipe):
    kind = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    dynamic_seq = False  # every block is seq_len tokens long

    def __init__(self, spec: dict):
        super().__init__(spec)
        self._data = None

    def _load(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True, use_cache=False)

    def _prepared(self):
        if self._data is None:
            import torch

            length = self.max_length()
            needed = (self.eval_samples + self.calibration_samples) * length
            ids = self._token_ids(needed)
            if len(ids) < 2:
                raise ValueError(f"{self.data_path}: too little text to score (fewer than 2 tokens)")
            n_blocks = len(ids) // length
            if n_blocks == 0:  # shorter than one block: one block of all of it
                length, n_blocks = len(ids), 1
            blocks = torch.tensor(ids[:n_blocks * length], dtype=torch.long).view(n_blocks, length)
            ev, cal = split(n_blocks, self.eval_samples, self.calibration_samples)
            self._data = {"eval": [{"input_ids": b} for b in torch.split(blocks[ev], self.batch_size)],
                          "calib": [{"input_ids": b} for b in torch.split(blocks[cal], self.batch_size)]}
        return self._data

    def _token_ids(self, needed: int) -> list[int]:
        """Token ids of the text (a table's text column, or the whole text file), read until `needed`."""
        if is_table(self.data_path):
            lines = column(read_rows(self.data_path), self.text_column, self.data_path)
        else:
            lines = Path(self.data_path).read_text(encoding="utf-8").splitlines()
        ids: list[int] = []
        for chunk in batched(lines, 256):
            text = "\n".join(chunk) + "\n"
            ids += self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= needed:
                break
        return ids

    def _calibration_batches(self) -> list[dict]:
        return self._prepared()["calib"]

    def benchmark_inputs(self) -> tuple:
        """batch_size evaluation blocks of seq_len tokens (cycled where there are fewer)."""
        import torch

        if self._arg_names is None:
            self.load_model()
        blocks = torch.cat([b["input_ids"] for b in self._prepared()["eval"]])
        pick = torch.tensor([i % blocks.shape[0] for i in range(self.batch_size)])
        return self._args({"input_ids": blocks[pick]})

    def evaluate_steps(self, model):
        import torch

        batches = self._prepared()["eval"]
        n_tokens = sum(b["input_ids"][:, 1:].numel() for b in batches)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"]
                logits = self._forward(model, batch)[:, :-1].float()
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
                count += ids[:, 1:].numel()
                # The rest at NLL 0: the lowest perplexity still reachable. A running sum of non-negative
                # terms never shrinks under rounding, so this bound is exact.
                yield perplexity(total, n_tokens), math.inf
        return perplexity(total, count)


RECIPES: dict[str, type[HFRecipe]] = {cls.kind: cls for cls in (TextClassification, FeatureExtraction, CausalLM)}
