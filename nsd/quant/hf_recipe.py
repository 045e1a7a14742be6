"""What the built-in recipes (`nsd.quant.builtin`) share: spec fields, the tokenizer, positional model
inputs and the PT2E export. An HFRecipe is a `nsd.quant.recipes.Recipe` (structurally: it has
load_model, example_inputs, calibrate, evaluate, export and evaluate_steps).

PT2E graphs are exported with INC's `export`, positional arguments only (mapped onto the model's forward
signature), batch and sequence dimensions dynamic. Decoder models get an attention backend that builds the
causal/padding mask without torch.vmap, which PT2E's convert step would otherwise break
(`nsd.quant.hf_attention`). Everything is loaded from local paths (`local_files_only=True`).
"""

from __future__ import annotations

import inspect
import os
from typing import Sequence

from nsd.quant.hf_attention import plain_attention_masks
from nsd.quant.scoring import drain
from nsd.spec import BUILTIN_RECIPES, RecipeSpec, default_metric

# PT2E graphs are exported with these dimensions dynamic, so one graph serves every batch.
MAX_BATCH = 1 << 16


class HFRecipe:
    """What the built-in recipes share: spec fields, tokenizer, positional model inputs, PT2E export."""

    kind = ""  # a key of nsd.spec.BUILTIN_RECIPES (the metrics it offers)
    auto_class = "AutoModel"
    dynamic_seq = True  # export with the sequence length dynamic too (padded batches vary in length)

    def __init__(self, spec: dict):
        """`spec`: a validated spec (`nsd.spec.validate(...).to_dict()`); recipe fields it leaves out take
        RecipeSpec's defaults, and a missing metric the kind's default (both from nsd.spec)."""
        r = RecipeSpec(**spec["recipe"])
        self.model_path, self.data_path = spec["model"].get("path"), r.data
        for what, path in (("model.path", self.model_path), ("recipe.data", self.data_path)):
            if not path or not os.path.exists(path):
                raise FileNotFoundError(f"{what} {path} does not exist on this worker")
        metrics = BUILTIN_RECIPES[self.kind]
        self.metric = r.metric or default_metric(self.kind)
        if self.metric not in metrics:
            raise ValueError(f"the {self.kind} recipe offers the metrics {', '.join(metrics)}, not {self.metric!r}")
        self.text_column, self.text_pair_column, self.label_column = r.text_column, r.text_pair_column, r.label_column
        self.calibration_samples, self.eval_samples = r.calibration_samples, r.eval_samples
        self.seq_len, self.batch_size = r.seq_len, r.batch_size
        self._tokenizer = self._config = None
        self._arg_names: list[str] | None = None  # the model's forward parameters, in order
        self._loaded = False

    # -- the recipe contract ---------------------------------------------------------------------------

    def load_model(self):
        """A freshly loaded FP32 model, in eval mode (a new one each call: INC quantizes in place)."""
        import torch

        quiet_transformers()
        model = self._load()
        model.eval()
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False  # a KV cache in the outputs: no use here, and PT2E cannot export it
        plain_attention_masks(model)
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

    def benchmark_inputs(self) -> tuple:
        """What deployment figures time (`nsd.quant.deploy`): a batch of batch_size evaluation samples (cycled
        where there are fewer), each padded to max_length() tokens, as the model's positional inputs."""
        if self._arg_names is None:
            self.load_model()
        texts, pairs = self._benchmark_texts()
        pick = [i % len(texts) for i in range(self.batch_size)]
        enc = self.tokenizer([texts[i] for i in pick], [pairs[i] for i in pick] if pairs else None,
                             padding="max_length", truncation=True, max_length=self.max_length(), return_tensors="pt")
        return self._args(dict(enc))

    def input_names(self) -> list[str]:
        """The names of the positional inputs `_args` gives the model (in its forward's order)."""
        if self._arg_names is None:
            self.load_model()
        return list(self._arg_names)

    def _benchmark_texts(self) -> tuple[list[str], list[str] | None]:
        """The evaluation texts (and their pairs) benchmark_inputs() draws from."""
        raise NotImplementedError

    def calibrate(self, model) -> None:
        import torch

        with torch.no_grad():
            for batch in self._calibration_batches():
                model(*self._args(batch))

    def evaluate(self, model) -> float:
        """Every batch: the metric (the same float as draining evaluate_steps)."""
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
            quiet_transformers()
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

        batch_dim = Dim("batch", max=MAX_BATCH)
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


def quiet_transformers() -> None:
    """transformers logs at WARNING about unused pooler weights and the like: runner log noise."""
    from transformers.utils import logging

    logging.set_verbosity_error()
