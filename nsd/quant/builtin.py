"""Built-in recipes: Hugging Face models tuned with no user code (`recipe.kind` in the spec).

- `text-classification`: AutoModelForSequenceClassification on a CSV/JSONL file with a text column (and an
  optional second text column for pairs) and a label column; metric `accuracy` (default) or macro `f1`.
- `feature-extraction`: AutoModel, mean-pooled L2-normalized sentence embeddings; metric `cosine` (default):
  mean cosine similarity of the model's embeddings to the FP32 model's, on a text file of sentences (one a
  line; or a table's text column); or `spearman`: Spearman correlation between the cosine similarity of the
  two sentences of each row of a CSV/JSONL file (text_column, text_pair_column) and its score (label_column).
- `causal-lm`: AutoModelForCausalLM; the text file is tokenized, packed into blocks of `seq_len` tokens and
  scored by perplexity (lower is better).

Each recipe has the python recipe contract (load_model, example_inputs, calibrate, evaluate) plus `export`,
which the runner calls once per task for the configs that need a PT2E graph (static_quant,
pt2e_dynamic_quant); weight-only configs get the plain module. Evaluation takes the first `eval_samples`
rows (blocks for causal-lm); calibration the `calibration_samples` rows after them, or, where the file has
no more, rows from its start. Everything is loaded from local paths (`local_files_only=True`).

PT2E graphs are exported with INC's `export`, positional arguments only (mapped onto the model's forward
signature), batch and sequence dimensions dynamic. Decoder models get an attention backend that builds the
causal/padding mask without torch.vmap, which PT2E's convert step would otherwise break (see
`_plain_attention_masks`).

The metric helpers at the top are plain python: they are unit-tested without torch models.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
# PT2E graphs are exported with these dimensions dynamic, so one graph serves every batch.
_MAX_BATCH = 1 << 16


# ------------------------------------------------------------------------------------------------ metrics

def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    _same_length(predictions, labels)
    return sum(p == t for p, t in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over every class seen in labels or predictions (sklearn's 'macro');
    a class with no true and no predicted positives cannot occur, one with a zero denominator scores 0."""
    _same_length(predictions, labels)
    scores = []
    for cls in sorted(set(labels) | set(predictions), key=repr):
        tp = sum(p == cls and t == cls for p, t in zip(predictions, labels))
        fp = sum(p == cls and t != cls for p, t in zip(predictions, labels))
        fn = sum(p != cls and t == cls for p, t in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0.0 where either side is constant (no correlation to speak of; never NaN)."""
    _same_length(x, y)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); 0.0 where either side is constant."""
    return pearson(ranks(x), ranks(y))


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token); inf where that overflows."""
    if n_tokens <= 0:
        raise ValueError("perplexity of no tokens")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a metric needs two equally long, non-empty sequences (got {len(a)} and {len(b)})")


# ------------------------------------------------------------------------------------------------ data

def is_table(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV (header line first) or JSON Lines file (or a JSON array of objects)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(file, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    text = file.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path} line {n}: not valid JSON ({exc})") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {n}: expected an object with named fields, got {type(row).__name__}")
    return rows


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def column(rows: Sequence[dict], name: str, path: str, what: str = "text") -> list[Any]:
    """One column of every row; a clear error naming the file, the row and the columns there are."""
    if not rows:
        raise ValueError(f"{path} has no rows")
    out = []
    for n, row in enumerate(rows, 1):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            known = ", ".join(map(str, row)) or "none"
            raise ValueError(f"{path} row {n}: no {what} in column {name!r} (its columns: {known}); "
                             f"name the column in the spec's recipe section")
        out.append(value.strip() if isinstance(value, str) else value)
    return out


def split(n: int, eval_samples: int, calibration_samples: int) -> tuple[list[int], list[int]]:
    """Indices for evaluation (the first eval_samples) and calibration (those after them, topped up from the
    start where there are not enough)."""
    if n <= 0:
        raise ValueError("no samples")
    n_eval = min(n, eval_samples)
    calib = list(range(n_eval, n))
    if len(calib) < calibration_samples:
        calib += range(n_eval)
    return list(range(n_eval)), calib[:calibration_samples]


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ------------------------------------------------------------------------------------------------ recipes

def build(spec: dict):
    """The built-in recipe a spec names, as a `nsd.quant.recipes.Recipe`."""
    from nsd.quant.recipes import Recipe

    kind = spec["recipe"]["kind"]
    if kind not in RECIPES:
        raise ValueError(f"recipe kind {kind!r} is not a built-in recipe ({', '.join(RECIPES)})")
    recipe = RECIPES[kind](spec)
    return Recipe(load_model=recipe.load_model, example_inputs=recipe.example_inputs, calibrate=recipe.calibrate,
                  evaluate=recipe.evaluate, export=recipe.export, evaluate_steps=recipe.evaluate_steps)


class HFRecipe:
    """What the built-in recipes share: spec fields, tokenizer, positional model inputs, PT2E export."""

    kind = ""
    default_metric = ""
    metrics: tuple[str, ...] = ()
    auto_class = "AutoModel"
    dynamic_seq = True  # export with the sequence length dynamic too (padded batches vary in length)

    def __init__(self, spec: dict):
        r = spec["recipe"]
        self.model_path = (spec.get("model") or {}).get("path")
        self.data_path = r.get("data")
        if not self.model_path:
            raise ValueError(f"the {self.kind} recipe needs model.path (a local Hugging Face model folder)")
        if not self.data_path:
            raise ValueError(f"the {self.kind} recipe needs recipe.data")
        for what, path in (("model.path", self.model_path), ("recipe.data", self.data_path)):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{what} {path} does not exist on this worker")
        self.metric = r.get("metric") or self.default_metric
        if self.metric not in self.metrics:
            raise ValueError(f"the {self.kind} recipe offers the metrics {', '.join(self.metrics)}, "
                             f"not {self.metric!r}")
        self.text_column = r.get("text_column") or "text"
        self.text_pair_column = r.get("text_pair_column")
        self.label_column = r.get("label_column") or "label"
        self.calibration_samples = int(r.get("calibration_samples") or 32)
        self.eval_samples = int(r.get("eval_samples") or 256)
        self.seq_len = int(r.get("seq_len") or 128)
        self.batch_size = int(r.get("batch_size") or 16)
        self._tokenizer = self._config = None
        self._arg_names: list[str] | None = None  # the model's forward parameters, in order
        self._loaded = False

    # -- the recipe contract ---------------------------------------------------------------------------

    def load_model(self):
        """A freshly loaded FP32 model, in eval mode (a new one each call: INC quantizes in place)."""
        import torch

        _quiet_transformers()
        model = self._load()
        model.eval()
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False  # a KV cache in the outputs: no use here, and PT2E cannot export it
        _plain_attention_masks(model)
        if self._arg_names is None:
            self._arg_names = list(inspect.signature(model.forward).parameters)
        if not self._loaded:
            self._loaded = True
            with torch.no_grad():
                self._on_first_load(model)
        return model

    def example_inputs(self) -> tuple:
        import torch

        if self._arg_names is None:
            self.load_model()
        batch = dict(self._calibration_batches()[0])
        if next(iter(batch.values())).shape[0] < 2:  # a dynamic dimension needs an example of 2 or more
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}
        return self._args(batch)

    def calibrate(self, model) -> None:
        import torch

        with torch.no_grad():
            for batch in self._calibration_batches():
                model(*self._args(batch))

    def evaluate(self, model) -> float:
        """Every batch: the metric (the same float as draining evaluate_steps)."""
        from nsd.quant.scoring import drain

        return drain(self.evaluate_steps(model))

    def evaluate_steps(self, model):
        """A generator over evaluation batches yielding the interval the metric can still reach, returning the
        metric (nsd.quant.scoring); metrics without an exact bound yield nothing."""
        raise NotImplementedError

    def export(self, model, example_inputs):
        """The PT2E graph INC's static_quant and pt2e_dynamic_quant configs need: INC's own export, with the
        batch (and, for padded text, sequence) dimensions dynamic so one graph serves every batch."""
        from neural_compressor.torch.export import export

        try:
            return export(model, example_inputs, dynamic_shapes=self._dynamic_shapes(example_inputs))
        except Exception as exc:
            raise RuntimeError(f"PT2E export of {self.model_path} failed ({type(exc).__name__}: {exc}); "
                               f"static_quant and pt2e_dynamic_quant need it, weight-only configs (the woq "
                               f"preset) do not") from exc

    # -- shared machinery ------------------------------------------------------------------------------

    def _load(self):
        import transformers

        cls = getattr(transformers, self.auto_class)
        return cls.from_pretrained(self.model_path, local_files_only=True)

    def _on_first_load(self, model) -> None:
        """Work done once per recipe with the first FP32 model (the feature-extraction reference)."""

    def _calibration_batches(self) -> list[dict]:
        raise NotImplementedError

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        return self._config

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            _quiet_transformers()
            tok = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def max_length(self) -> int:
        """seq_len, capped by what the tokenizer and the model's position embeddings allow."""
        limit = self.seq_len
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            limit = min(limit, tok_max)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                limit = min(limit, value)
                break
        return limit

    def _encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[dict]:
        """Tokenized batches of batch_size, each padded to its longest text, truncated at max_length()."""
        batches = []
        length = self.max_length()
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            pair = list(pairs[start:start + self.batch_size]) if pairs is not None else None
            enc = self.tokenizer(chunk, pair, padding=True, truncation=True, max_length=length,
                                 return_tensors="pt")
            batches.append(dict(enc))
        return batches

    def _args(self, batch: dict) -> tuple:
        """The batch as the positional arguments of the model's forward (PT2E graphs take positional
        arguments only): each tensor at its parameter's place, None in between."""
        names = [n for n in batch if n in self._arg_names]
        if not names:
            raise ValueError(f"the model's forward takes none of the tokenizer's outputs {list(batch)}")
        last = max(self._arg_names.index(n) for n in names)
        return tuple(batch.get(n) for n in self._arg_names[:last + 1])

    def _dynamic_shapes(self, example_inputs: tuple) -> tuple:
        from torch.export import Dim

        batch_dim = Dim("batch", max=_MAX_BATCH)
        seq_dim = Dim("seq", max=max(2, self.max_length()))
        shapes = []
        for arg in example_inputs:
            if arg is None:
                shapes.append(None)
                continue
            dims = {0: batch_dim}
            if self.dynamic_seq and arg.dim() >= 2 and arg.shape[1] >= 2:
                dims[1] = seq_dim
            shapes.append(dims)
        return tuple(shapes)

    def _forward(self, model, batch: dict):
        """The model's first output (logits, or the last hidden state)."""
        return model(*self._args(batch))[0]


class TextClassification(HFRecipe):
    kind = "text-classification"
    default_metric = "accuracy"
    metrics = ("accuracy", "f1")
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
            _same_length(range(seen), labels)

        from nsd.quant.scoring import accuracy_steps

        return (yield from accuracy_steps(correct(), len(labels)))


class FeatureExtraction(HFRecipe):
    kind = "feature-extraction"
    default_metric = "cosine"
    metrics = ("cosine", "spearman")
    auto_class = "AutoModel"

    def __init__(self, spec: dict):
        super().__init__(spec)
        if self.metric == "spearman" and not (is_table(self.data_path) and self.text_pair_column):
            raise ValueError("the spearman metric reads a CSV or JSONL file of sentence pairs and scores: set "
                             "recipe.text_column, recipe.text_pair_column and recipe.label_column")
        self._data = None
        self._reference = None  # FP32 embeddings of the evaluation sentences (cosine)

    def _load(self):
        from transformers import AutoModel

        try:  # BERT-like encoders: the pooler is unused here, and an unused pooler breaks PT2E annotation
            return AutoModel.from_pretrained(self.model_path, local_files_only=True, add_pooling_layer=False)
        except TypeError:
            return AutoModel.from_pretrained(self.model_path, local_files_only=True)

    def _prepared(self):
        if self._data is None:
            if self.metric == "spearman":
                rows = read_rows(self.data_path)
                first = column(rows, self.text_column, self.data_path)
                second = column(rows, self.text_pair_column, self.data_path)
                scores = [_float(v, self.data_path, n) for n, v in
                          enumerate(column(rows, self.label_column, self.data_path, "score"), 1)]
                ev, cal = split(len(rows), self.eval_samples, self.calibration_samples)
                calib_texts = [t for i in cal for t in (first[i], second[i])][:max(1, self.calibration_samples)]
                self._data = {"eval": (self._encode([first[i] for i in ev]), self._encode([second[i] for i in ev])),
                              "scores": [scores[i] for i in ev], "calib": self._encode(calib_texts)}
            else:
                if is_table(self.data_path):
                    rows = read_rows(self.data_path)
                    texts = column(rows, self.text_column, self.data_path)
                    if self.text_pair_column:
                        texts += column(rows, self.text_pair_column, self.data_path)
                else:
                    texts = read_lines(self.data_path)
                if not texts:
                    raise ValueError(f"{self.data_path} has no sentences")
                ev, cal = split(len(texts), self.eval_samples, self.calibration_samples)
                self._data = {"eval": self._encode([texts[i] for i in ev]),
                              "calib": self._encode([texts[i] for i in cal])}
        return self._data

    def _calibration_batches(self) -> list[dict]:
        return self._prepared()["calib"]

    def _on_first_load(self, model) -> None:
        if self.metric == "cosine":
            self._reference = self._embed(model, self._prepared()["eval"])

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
        import torch

        from nsd.quant.scoring import SLACK

        data = self._prepared()
        if self.metric == "spearman":  # a rank correlation: no exact bound from a prefix; runs in full
            first, second = data["eval"]
            similarity = (self._embed(model, first) * self._embed(model, second)).sum(-1)
            return spearman(similarity.tolist(), data["scores"])
            yield  # noqa: unreachable - makes this a generator
        if self._reference is None:
            self.load_model()  # computes the FP32 reference once
        n = self._reference.shape[0]
        cosines, total, seen = [], 0.0, 0
        with torch.no_grad():
            for batch in data["eval"]:
                part = (self.embed(model, batch) * self._reference[seen:seen + batch["attention_mask"].shape[0]]).sum(-1)
                cosines.append(part)
                total, seen = total + part.sum().item(), seen + part.shape[0]
                # Each cosine of unit vectors lies in [-1, 1] (plus rounding: SLACK).
                yield (total - (n - seen)) / n - SLACK, (total + (n - seen)) / n + SLACK
        return torch.cat(cosines).mean().item()


class CausalLM(HFRecipe):
    kind = "causal-lm"
    default_metric = "perplexity"
    metrics = ("perplexity",)
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


RECIPES: dict[str, type[HFRecipe]] = {
    "text-classification": TextClassification,
    "feature-extraction": FeatureExtraction,
    "causal-lm": CausalLM,
}


# ------------------------------------------------------------------------------------------------ helpers

_BACKEND = "nsd_sdpa"


def _plain_attention_masks(model) -> None:
    """Let decoder models build their causal (+ padding) attention mask without torch.vmap.

    transformers (4.5x) builds that mask with torch.vmap when tracing, so the mask lands in a PT2E graph as
    vmap bookkeeping ops with no users; PT2E's convert step (torchao's convert_pt2e) removes them as dead
    code and the quantized graph then fails to run ("tensor may have escaped from inside a function being
    vmapped"). So register an attention backend that is SDPA with the same mask made by broadcasting, and
    switch to it where the model goes through the attention interface. Same numbers (asserted in the
    tests)."""
    if (getattr(model.config, "_attn_implementation", None) != "sdpa"
            or not getattr(type(model), "_supports_attention_backend", False)):
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_BACKEND, sdpa_attention_forward)
    AttentionMaskInterface.register(_BACKEND, _broadcast_mask)
    try:
        model.set_attn_implementation(_BACKEND)
    except (ValueError, AttributeError, ImportError):
        pass  # the model keeps its own attention; weight-only configs work all the same


def _broadcast_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None,
                    local_size=None, allow_is_causal_skip=True, **kwargs):
    """transformers' sdpa_mask (4.57) with the mask function evaluated on broadcast index tensors instead of
    under torch.vmap: a boolean (batch, 1, query, key) mask, True = attend, or None where SDPA's is_causal
    does the same (never while tracing, as in transformers)."""
    import torch
    from transformers import masking_utils as mu

    original = mask_function = mask_function or mu.causal_mask_function
    padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding_mask, cache_position.shape[0], kv_length,
                                                            kv_offset, local_size):
        return None
    if padding_mask is not None:
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding_mask))
    device = cache_position.device
    batch = torch.arange(batch_size, device=device)[:, None, None, None]
    head = torch.arange(1, device=device)[None, :, None, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    try:
        mask = mask_function(batch, head, cache_position[None, None, :, None], kv)
    except Exception:  # a mask function that needs vmap after all: transformers' own
        return mu.sdpa_mask(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length,
                            kv_offset=kv_offset, mask_function=original, attention_mask=attention_mask,
                            local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    return mask.to(torch.bool).expand(batch_size, 1, cache_position.shape[0], kv_length)


def _float(value: Any, path: str, row: int) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path} row {row}: score {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{path} row {row}: score {value!r} is not finite")
    return number


def _quiet_transformers() -> None:
    """transformers logs at WARNING about unused pooler weights and the like: runner log noise."""
    from transformers.utils import logging

    logging.set_verbosity_error()
