"""The built-in recipes' metrics, plain python (unit-tested without torch models).

accuracy and macro F1 (text-classification), Spearman rank correlation (feature-extraction on scored
sentence pairs), perplexity (causal-lm). The mean cosine to the FP32 model is computed in torch by the
feature-extraction recipe (`nsd.quant.builtin`); bounds for early stopping are in `nsd.quant.scoring`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    same_length(predictions, labels)
    return sum(p == t for p, t in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over every class seen in labels or predictions (sklearn's 'macro');
    a class with no true and no predicted positives cannot occur, one with a zero denominator scores 0."""
    same_length(predictions, labels)
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
    same_length(x, y)
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


def same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a metric needs two equally long, non-empty sequences (got {len(a)} and {len(b)})")

