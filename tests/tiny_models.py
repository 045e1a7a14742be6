"""Tiny transformers for the built-in recipes' tests: a vocabulary written here, a synthetic language, and
a BERT sentiment classifier and a Llama language model trained on it for a few seconds (so quantization
can move their metric), saved with save_pretrained with their data files. Nothing comes from a hub."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

SUBJECTS = ["the cat", "the dog", "my friend", "the teacher", "our neighbor", "the child", "a farmer", "the pilot"]
VERB_OF = {"the cat": "chased", "the dog": "found", "my friend": "bought", "the teacher": "painted",
           "our neighbor": "sold", "the child": "liked", "a farmer": "carried", "the pilot": "fixed"}
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
OBJECTS = ["ball", "house", "car", "book", "kite", "boat", "chair", "hat"]
GOOD = ["great", "wonderful", "lovely", "excellent", "amazing"]
BAD = ["awful", "terrible", "boring", "dreadful", "ugly"]
WORDS = sorted({w for s in SUBJECTS for w in s.split()} | set(VERB_OF.values()) | set(COLORS) | set(OBJECTS)
               | set(GOOD) | set(BAD) | {"a", "the", "and", "it", "was", ".", "very", "not"})


def review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    subject = rng.choice(SUBJECTS)
    adjective = rng.choice(GOOD if label == "positive" else BAD)
    return (f"{subject} {VERB_OF[subject]} a {rng.choice(COLORS)} {rng.choice(OBJECTS)} and it was "
            f"{adjective} .", label)


def corpus_line(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    return f"{subject} {VERB_OF[subject]} the {rng.choice(COLORS)} {rng.choice(OBJECTS)} ."


def build_assets(root: Path) -> dict[str, Path]:
    """Tokenizer, a trained tiny BERT sentiment classifier, a trained tiny Llama and their data files."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, \
        LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), model_max_length=64)
    torch.manual_seed(0)
    rng = random.Random(0)

    # Sentiment classifier: the label is carried by one adjective among seven words.
    train = [review(rng) for _ in range(512)]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    classifier = BertForSequenceClassification(config)
    _train(classifier, [tokenizer([t for t, _ in train[i:i + 32]], padding=True, return_tensors="pt")
                        | {"labels": torch.tensor([config.label2id[lb] for _, lb in train[i:i + 32]])}
                        for i in range(0, len(train), 32)], epochs=3, lr=3e-3)
    classifier.save_pretrained(root / "classifier")
    tokenizer.save_pretrained(root / "classifier")

    # Causal LM: subject -> its verb is certain, colour and object are not.
    lines = " ".join(corpus_line(rng) for _ in range(1200))
    ids = torch.tensor(tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"])
    blocks = ids[: len(ids) // 32 * 32].view(-1, 32)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
                                      bos_token_id=2, eos_token_id=3))
    _train(lm, [{"input_ids": blocks[i:i + 16], "labels": blocks[i:i + 16]} for i in range(0, len(blocks), 16)],
           epochs=2, lr=5e-3)
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")

    # Data files (other draws than the training data).
    rng = random.Random(1)
    with open(root / "reviews.jsonl", "w") as f:
        for _ in range(96):
            text, label = review(rng)
            f.write(json.dumps({"sentence": text, "sentiment": label}) + "\n")
    (root / "corpus.txt").write_text("\n".join(corpus_line(rng) for _ in range(300)) + "\n")
    (root / "sentences.txt").write_text("\n".join(review(rng)[0] for _ in range(64)) + "\n")
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", "score"])
        for _ in range(64):
            (a, la), (b, lb) = review(rng), review(rng)
            writer.writerow([a, b, float(la == lb) + rng.random() * 0.1])
    return {"classifier": root / "classifier", "lm": root / "lm", "reviews": root / "reviews.jsonl",
            "corpus": root / "corpus.txt", "sentences": root / "sentences.txt", "pairs": root / "pairs.csv"}


def _train(model, batches: list[dict], epochs: int, lr: float) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
