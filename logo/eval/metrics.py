"""Metrics, as the official LoGo code computes them.

- ``em``: lowercase, strip, remove every ``.``, exact match (BBH, ARC, ANLI, GLUE);
- ``em_multi``: ``em`` against any of a list of answers (NQ, TQA). The official code means the same, but its
  ``DataLoader`` (batch size 1, default collation) turns a list label inside out and its ``zip`` then keeps the
  first answer only; this module scores against every answer, so NQ/TQA can come out higher than the paper's;
- ``bleu``: NLTK ``sentence_bleu`` (BLEU-4, smoothing method1) on whitespace tokens, per sentence (WMT);
- ``rouge``: ROUGE-1/2/L F1 with stemming, per instance (GEM).
Dataset scores are the mean over instances (per key for ROUGE).
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("em", "em_multi", "bleu", "rouge")


def _norm(text: str) -> str:
    return text.strip().lower().replace(".", "")


def exact_match(prediction: str, label: str) -> int:
    return int(_norm(prediction) == _norm(label))


def exact_match_multi(prediction: str, labels: Sequence[str]) -> int:
    return int(any(_norm(prediction) == _norm(label) for label in labels))


def bleu(prediction: str, label: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return float(
        sentence_bleu([label.split()], prediction.split(), weights=(0.25, 0.25, 0.25, 0.25),
                      smoothing_function=SmoothingFunction().method1)
    )


_ROUGE = None


def rouge(prediction: str, label: str) -> dict[str, float]:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _ROUGE.score(label, prediction)
    # floats always (rouge_score gives the int 0 for an empty prediction)
    return {"rouge-1": float(scores["rouge1"].fmeasure), "rouge-2": float(scores["rouge2"].fmeasure),
            "rouge-L": float(scores["rougeL"].fmeasure)}


def score_instance(metric: str, prediction: str, label):
    """One instance's score under ``metric`` (int, float, or a dict of ROUGE F1s)."""
    if metric == "em":
        return exact_match(prediction, label)
    if metric == "em_multi":
        return exact_match_multi(prediction, label if isinstance(label, (list, tuple)) else [label])
    if metric == "bleu":
        return bleu(prediction, label)
    if metric == "rouge":
        return rouge(prediction, label)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def aggregate(scores: list) -> dict[str, float]:
    """Mean over instances: ``{"score": x}`` for scalar metrics, one entry per ROUGE key otherwise."""
    if not scores:
        return {}
    if isinstance(scores[0], dict):
        return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
    return {"score": sum(scores) / len(scores)}


def headline(metric: str, scores: list) -> tuple[str, float]:
    """The number the official code prints: Accuracy (x100) for EM metrics, BLEU (x100), ROUGE-L (x100)."""
    agg = aggregate(scores)
    if metric == "rouge":
        return "ROUGE-L", 100 * agg.get("rouge-L", 0.0)
    if metric == "bleu":
        return "BLEU", 100 * agg.get("score", 0.0)
    return "Accuracy", 100 * agg.get("score", 0.0)


def summary_line(metric: str, scores: list) -> str:
    """What `logo run` prints, like the official code: ``Accuracy: 71.33`` (``BLEU: ..``; all three ROUGE F1s)."""
    if metric == "rouge":
        agg = aggregate(scores)
        return ", ".join(f"{key.upper()}: {100 * value:.2f}" for key, value in agg.items())
    label, value = headline(metric, scores)
    return f"{label}: {value:.2f}"
