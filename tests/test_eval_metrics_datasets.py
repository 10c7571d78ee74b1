"""Metrics with hand-checked values, and the dataset registry and loaders (offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from logo.errors import LogoError
from logo.eval import datasets as ds
from logo.eval.metrics import aggregate, bleu, exact_match, exact_match_multi, headline, rouge, score_instance

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


def test_exact_match_official_normalisation():
    assert exact_match(" True. ", "true") == 1
    assert exact_match("(A)", "(a)") == 1
    assert exact_match("3.5", "35") == 1  # the official code removes every '.'
    assert exact_match("False", "True") == 0
    assert exact_match_multi("Paris.", ["paris", "City of Paris"]) == 1
    assert exact_match_multi("Lyon", ["paris"]) == 0


def test_bleu_hand_checked():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 -> method1 epsilon 0.1/3; brevity penalty 1
    expected = math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)) / 4)
    assert bleu("the cat sat on the mat", "the cat is on the mat") == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.2541, abs=1e-4)


def test_rouge_hand_checked():
    assert rouge("the cat sat", "the cat sat") == pytest.approx({"rouge-1": 1.0, "rouge-2": 1.0, "rouge-L": 1.0})
    got = rouge("the cat", "the cat sat on the mat")
    assert got["rouge-1"] == pytest.approx(0.5)  # P = 1, R = 2/6
    assert got["rouge-2"] == pytest.approx(2 * 1 * 0.2 / 1.2)  # P = 1, R = 1/5
    assert rouge("cats running", "cat runs")["rouge-1"] == pytest.approx(1.0)  # stemming


def test_aggregate_and_headline():
    assert aggregate([1, 0, 1, 1]) == {"score": 0.75}
    assert headline("em", [1, 0, 1, 1]) == ("Accuracy", 75.0)
    r = [{"rouge-1": 1.0, "rouge-2": 0.5, "rouge-L": 0.5}, {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-L": 0.25}]
    assert headline("rouge", r) == ("ROUGE-L", pytest.approx(37.5))
    assert score_instance("em_multi", "x", "x") == 1
    with pytest.raises(ValueError, match="unknown metric"):
        score_instance("f1", "a", "b")


def test_registry_has_the_papers_26_datasets():
    assert len(ds.PAPER_DATASETS) == 26
    metrics = {name: ds.get_dataset_spec(name).metric for name in ds.PAPER_DATASETS}
    assert sum(n.startswith("bbh.") for n in metrics) == 8
    assert {metrics[n] for n in metrics if n.startswith("wmt")} == {"bleu"}
    assert {metrics[n] for n in metrics if n.startswith("gem")} == {"rouge"}
    assert metrics["nq.natural-questions"] == metrics["tqa.rc"] == "em_multi"
    assert metrics["glue.qnli"] == metrics["anli.r2"] == metrics["ai2_arc.ARC-Easy"] == "em"
    with pytest.raises(LogoError, match="unknown dataset"):
        ds.get_dataset_spec("squad.v2")


@needs_shared
def test_official_jsonl_layout():
    inst = ds.load_instances("bbh.boolean_expressions", SHARED / "logo-format")
    assert len(inst) == 150
    first = json.loads((SHARED / "logo-format/bbh/boolean_expressions/test.jsonl").read_text().splitlines()[0])
    assert inst[0].prompt == first["context"] and inst[0].label == first["completion"]
    assert ds.load_instances("bbh.boolean_expressions", SHARED / "logo-format", limit=7)[6] == inst[6]


@needs_shared
def test_bbh_json_with_official_prompt_format():
    inst = ds.load_instances("bbh.word_sorting", SHARED / "bbh")
    assert len(inst) == 250
    raw = json.loads((SHARED / "bbh/word_sorting.json").read_text())["examples"][0]
    assert inst[0].prompt == f"Sort a list of words.\n\nQ: {raw['input']}\nA:"
    assert inst[0].label == raw["target"]
    # a BBH task outside the paper's eight still loads, with a generic description
    assert ds.load_instances("bbh.navigate", SHARED, limit=2)[0].prompt.startswith("Given a series")


def test_bad_local_files_are_named(tmp_path):
    (tmp_path / "bbh" / "navigate").mkdir(parents=True)
    (tmp_path / "bbh" / "navigate" / "test.jsonl").write_text('{"context": "x"}\n')
    with pytest.raises(LogoError, match="lacks 'context'/'completion'"):
        ds.load_instances("bbh.navigate", tmp_path)
    (tmp_path / "bbh" / "navigate" / "test.jsonl").write_text("{not json\n")
    with pytest.raises(LogoError, match=r"test.jsonl:1 is not valid JSON"):
        ds.load_instances("bbh.navigate", tmp_path)
    with pytest.raises(LogoError, match="does not exist"):
        ds.load_instances("bbh.navigate", tmp_path / "missing")


# Rows laid out like the hub datasets' (fields as published), converted offline.
HUB_ROWS = {
    "wmt14.fr-en": {"translation": {"fr": "Le chat dort.", "en": "The cat sleeps."}},
    "wmt16.en-ro": {"translation": {"ro": "Pisica doarme.", "en": "The cat sleeps."}},
    "gem.common_gen": {"concepts": ["dog", "ball", "run"], "target": "The dog runs after the ball."},
    "gem.dart": {"tripleset": [["Paris", "capital_of", "France"]], "target": "Paris is the capital of France."},
    "gem.e2e_nlg": {"meaning_representation": "name[The Olive], food[Italian]", "target": "The Olive serves Italian."},
    "gem.web_nlg": {"input": ["Paris | capitalOf | France"], "target": "Paris is France's capital."},
    "ai2_arc.ARC-Easy": {"question": "Which is a mammal?", "choices": {"text": ["shark", "whale"], "label": ["A", "B"]},
                         "answerKey": "B"},
    "nq.natural-questions": {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
    "tqa.rc": {"question": "Capital of Peru?", "answer": {"aliases": ["Lima", "Lima, Peru"], "value": "Lima"}},
    "anli.r1": {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0},
    "glue.qnli": {"question": "Where is Paris?", "sentence": "Paris is in France.", "label": 1},
}
EXPECTED = {
    "wmt14.fr-en": ("Le chat dort.", "The cat sleeps."),
    "wmt16.en-ro": ("The cat sleeps.", "Pisica doarme."),
    "gem.common_gen": ("dog, ball, run", "The dog runs after the ball."),
    "gem.dart": ("Paris : capital_of : France", "Paris is the capital of France."),
    "gem.e2e_nlg": ("name[The Olive], food[Italian]", "The Olive serves Italian."),
    "gem.web_nlg": ("Paris | capitalOf | France", "Paris is France's capital."),
    "ai2_arc.ARC-Easy": ("Which is a mammal?\nOptions:\n- shark\n- whale", "whale"),
    "nq.natural-questions": ("who wrote hamlet", ["Shakespeare", "William Shakespeare"]),
    "tqa.rc": ("Capital of Peru?", ["Lima", "Lima, Peru"]),
    "anli.r1": (None, "yes"),
    "glue.qnli": (None, "no"),
}


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_hub_row_conversion(name):
    spec = ds.get_dataset_spec(name)
    [inst] = ds.convert_rows(spec, [HUB_ROWS[name]])
    question, label = EXPECTED[name]
    assert inst.label == label
    assert inst.prompt.startswith(spec.description + "\n\nQ: ") and inst.prompt.endswith("\nA:")
    if question is not None:
        assert inst.prompt == ds.format_prompt(spec.description, question)


def test_hub_path_uses_datasets_and_reports_failures(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, config=None, split=None):
        calls.append((path, config, split))
        if path == "allenai/ai2_arc":
            return datasets.Dataset.from_list([HUB_ROWS["ai2_arc.ARC-Easy"]] * 3)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(ds.load_instances("ai2_arc.ARC-Easy", limit=2)) == 2
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "test")]
    with pytest.raises(LogoError, match="cannot load wmt16.de-en from the hub"):
        ds.load_instances("wmt16.de-en")
    assert calls[-1] == ("wmt16", "de-en", "test")
    with pytest.raises(LogoError, match="row 0 does not have the expected fields"):
        ds.convert_rows(ds.get_dataset_spec("glue.qnli"), [{"question": "x"}])
