"""The dataset registry and its loaders, offline: official jsonl, BBH JSON, and hub repositories laid out as on
the hub (tests/fixtures/eval/hub_snapshots.json, written as parquet) read with the real ``datasets.load_dataset``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logo.errors import LogoError
from logo.eval import datasets as ds
from logo.eval.hub import PARQUET_EXPORT

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
SNAPSHOTS = json.loads((Path(__file__).parent / "fixtures" / "eval" / "hub_snapshots.json").read_text())


def test_registry_has_the_papers_26_datasets():
    names = ds.list_datasets()
    assert len(names) == 26 and names[0] == "bbh.boolean_expressions"
    metrics = {name: ds.get_dataset_spec(name).metric for name in names}
    assert sum(n.startswith("bbh.") for n in metrics) == 8
    assert {metrics[n] for n in metrics if n.startswith("wmt")} == {"bleu"}
    assert sum(n.startswith("wmt") for n in metrics) == 6
    assert {metrics[n] for n in metrics if n.startswith("gem")} == {"rouge"}
    assert metrics["nq.natural-questions"] == metrics["tqa.rc"] == "em_multi"
    assert metrics["glue.qnli"] == metrics["anli.r2"] == metrics["ai2_arc.ARC-Easy"] == "em"
    assert ds.get_dataset_spec("bbh.boolean_expressions").load  # spec -> loader
    with pytest.raises(LogoError, match="unknown dataset 'squad.v2'"):
        ds.get_dataset_spec("squad.v2")


def test_unregistered_names_of_a_known_family_take_its_metric(tmp_path):
    assert ds.get_dataset_spec("wmt16.cs-en").metric == "bleu"
    assert ds.get_dataset_spec("code_x_glue.code_to_text").metric == "bleu"
    (tmp_path / "gem" / "xsum").mkdir(parents=True)
    (tmp_path / "gem" / "xsum" / "test.jsonl").write_text(json.dumps({"context": "c", "completion": "d"}) + "\n")
    assert ds.load_instances("gem.xsum", tmp_path) == [ds.Instance("c", "d")]
    with pytest.raises(LogoError, match=r"unknown dataset 'gem.other': .* there is no .*gem/other/test.jsonl"):
        ds.load_instances("gem.other", tmp_path)


def test_dataset_names_are_checked_against_what_exists_without_the_hub(tmp_path, monkeypatch):
    """A misspelt name fails the check (did you mean ...), before any loading and without asking the hub; a BBH
    task outside the paper's 8 has a hub source, and any name of a known family exists once its file does."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(LogoError, match=r"^unknown dataset 'bbh.boolen_expressions' \(did you mean "
                                        r"bbh.boolean_expressions\?\): it is not one of the paper's 26 datasets or the "
                                        r"27 BBH tasks, and no --data-dir was given"):
        ds.check_dataset("bbh.boolen_expressions")
    with pytest.raises(LogoError, match=r"unknown dataset 'bbh.boolen_expressions' \(did you mean"):
        ds.load_instances("bbh.boolen_expressions")  # the loader checks too: no hub error about a missing config
    assert ds.check_dataset("bbh.date_understanding").source.data_files == "date_understanding/test/*.parquet"
    assert ds.check_dataset("wmt14.fr-en", tmp_path).name == "wmt14.fr-en"
    with pytest.raises(LogoError, match=r"unknown dataset 'wmt16.de-em' \(did you mean wmt16.de-en"):
        ds.check_dataset("wmt16.de-em", tmp_path)
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "my_task.json").write_text(json.dumps({"examples": [{"input": "q", "target": "a"}]}))
    (tmp_path / "gem" / "xsum").mkdir(parents=True)
    (tmp_path / "gem" / "xsum" / "test.jsonl").write_text(json.dumps({"context": "c", "completion": "d"}) + "\n")
    assert ds.local_datasets(tmp_path) == ["gem.xsum", "bbh.my_task"]
    assert ds.check_dataset("bbh.my_task", tmp_path).metric == "em"
    assert len(ds.load_instances("bbh.my_task", tmp_path)) == 1
    with pytest.raises(LogoError, match=r"unknown dataset 'gem.xsun' \(did you mean gem.xsum\?\): .* there is no "
                                        r".*gem/xsun/test.jsonl"):
        ds.check_dataset("gem.xsun", tmp_path)
    with pytest.raises(LogoError, match=r"unknown dataset 'bbh.my_tsak' \(did you mean bbh.my_task\?\).*my_tsak.json"):
        ds.check_dataset("bbh.my_tsak", tmp_path)
    with pytest.raises(LogoError, match=r"^--data-dir .*nowhere does not exist; give the folder"):
        ds.check_dataset("bbh.navigate", tmp_path / "nowhere")


@needs_shared
def test_official_jsonl_layout():
    inst = ds.load_instances("bbh.boolean_expressions", SHARED / "logo-format")
    assert len(inst) == 150
    first = json.loads((SHARED / "logo-format/bbh/boolean_expressions/test.jsonl").read_text().splitlines()[0])
    assert inst[0] == ds.Instance(first["context"], first["completion"])
    assert ds.load_instances("bbh.boolean_expressions", SHARED / "logo-format", limit=7) == inst[:7]


@needs_shared
def test_bbh_json_prompts_are_the_official_prompts():
    """Every official test (and train) instance is one of ours from the original BBH JSON, prompt and label."""
    ours = {i.prompt: i.label for i in ds.load_instances("bbh.boolean_expressions", SHARED / "bbh")}
    assert len(ours) == 250
    for split in ("test", "train"):
        for line in (SHARED / f"logo-format/bbh/boolean_expressions/{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert ours[row["context"]] == row["completion"]


@needs_shared
def test_bbh_json_descriptions():
    inst = ds.load_instances("bbh.word_sorting", SHARED / "bbh")
    assert len(inst) == 250
    raw = json.loads((SHARED / "bbh/word_sorting.json").read_text())["examples"][0]
    assert inst[0] == ds.Instance(f"Sort a list of words.\n\nQ: {raw['input']}\nA:", raw["target"])
    assert ds.load_instances("bbh.navigate", SHARED, limit=2)[0].prompt.startswith("Given a series of navigation")
    # a BBH task outside the paper's eight: generic description, still from its JSON
    other = ds.load_instances("bbh.geometric_shapes", SHARED / "bbh", limit=1)[0]
    assert other.prompt.startswith("Answer the following question.\n\nQ: ")


def test_bad_local_files_are_named(tmp_path):
    (tmp_path / "bbh" / "navigate").mkdir(parents=True)
    (tmp_path / "bbh" / "navigate" / "test.jsonl").write_text('{"context": "x"}\n')
    with pytest.raises(LogoError, match="line 1 lacks 'context'/'completion'"):
        ds.load_instances("bbh.navigate", tmp_path)
    (tmp_path / "bbh" / "navigate" / "test.jsonl").write_text("{not json\n")
    with pytest.raises(LogoError, match=r"test.jsonl:1 is not valid JSON"):
        ds.load_instances("bbh.navigate", tmp_path)
    (tmp_path / "bbh" / "web_of_lies.json").write_text('{"examples": [{"question": "x"}]}')
    with pytest.raises(LogoError, match=r"web_of_lies.json is not BBH JSON"):
        ds.load_instances("bbh.web_of_lies", tmp_path)
    with pytest.raises(LogoError, match="does not exist"):
        ds.load_instances("bbh.navigate", tmp_path / "missing")
    with pytest.raises(LogoError, match="--limit must be at least 1"):
        ds.load_instances("bbh.navigate", SHARED, limit=0)



@pytest.mark.parametrize(("row", "message"), [
    ({"context": "Q: x\nA:", "completion": 3},
     r"test.jsonl:2: 'completion' must be a string \(metric em\), got a number 3"),
    ({"context": None, "completion": "a"}, r"test.jsonl:2: 'context' must be a string, got null"),
    ({"context": "Q: x\nA:", "completion": ["a", "b"]}, r"'completion' must be a string \(metric em\), got an array"),
])
def test_wrong_types_in_jsonl_are_named_when_loading(tmp_path, row, message):
    (tmp_path / "bbh" / "navigate").mkdir(parents=True)
    good = json.dumps({"context": "Q: y\nA:", "completion": "yes"})
    (tmp_path / "bbh" / "navigate" / "test.jsonl").write_text(good + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LogoError, match=message):
        ds.load_instances("bbh.navigate", tmp_path)


def test_labels_take_the_metrics_types(tmp_path):
    """em_multi (NQ, TQA) takes a list of answers; not an empty one, nor one with a non-string."""
    (tmp_path / "nq" / "x").mkdir(parents=True)
    file = tmp_path / "nq" / "x" / "test.jsonl"
    file.write_text(json.dumps({"context": "q", "completion": ["a", "b"]}) + "\n")
    assert ds.load_instances("nq.x", tmp_path) == [ds.Instance("q", ["a", "b"])]
    for bad in ([], ["a", 1], {"a": 1}):
        file.write_text(json.dumps({"context": "q", "completion": bad}) + "\n")
        with pytest.raises(LogoError, match=r"test.jsonl:1: 'completion' must be a string or a list of strings"):
            ds.load_instances("nq.x", tmp_path)


def test_wrong_types_in_bbh_json_are_named(tmp_path):
    file = tmp_path / "web_of_lies.json"
    file.write_text(json.dumps({"examples": [{"input": "x", "target": "Yes"}, {"input": "y", "target": 5}]}))
    with pytest.raises(LogoError, match=r"web_of_lies.json: example 1: 'target' must be a string .*got a number 5"):
        ds.load_instances("bbh.web_of_lies", tmp_path)
    file.write_text(json.dumps({"examples": [{"input": None, "target": "Yes"}]}))
    with pytest.raises(LogoError, match=r"web_of_lies.json: example 0: 'input' must be a string, got null"):
        ds.load_instances("bbh.web_of_lies", tmp_path)


def test_files_not_in_utf8_are_named(tmp_path):
    (tmp_path / "bbh" / "navigate").mkdir(parents=True)
    (tmp_path / "bbh" / "navigate" / "test.jsonl").write_bytes(
        b'{"context": "a", "completion": "b"}\n{"context": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(LogoError, match=r"navigate/test.jsonl:2 is not UTF-8 text .*save the file as UTF-8"):
        ds.load_instances("bbh.navigate", tmp_path)
    (tmp_path / "web_of_lies.json").write_bytes(b'{"examples": [{"input": "caf\xe9", "target": "b"}]}')
    with pytest.raises(LogoError, match=r"web_of_lies.json:1 is not UTF-8 text"):
        ds.load_instances("bbh.web_of_lies", tmp_path)


def test_hub_rows_of_the_wrong_types_are_refused():
    spec = ds.get_dataset_spec("bbh.navigate")
    with pytest.raises(LogoError, match=r"bbh.navigate: row 0: 'label' must be a string \(metric em\), got a number 5"):
        ds.convert_rows(spec, [{"input": "x", "target": 5}])
    with pytest.raises(LogoError, match=r"bbh.navigate: row 0's question must be a string, got null"):
        ds.convert_rows(spec, [{"input": None, "target": "Yes"}])


# ------------------------------------------------------------------ hub repositories, offline
def write_snapshots(root: Path) -> Path:
    """Write each repository's files as parquet, with a README declaring its configs as the real repo's does."""
    import datasets

    for repo, snap in SNAPSHOTS.items():
        for rel, rows in snap["files"].items():
            (root / repo / rel).parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(root / repo / rel))
        if snap["configs"]:
            lines = ["---", "configs:"]
            for config, splits in snap["configs"].items():
                lines += [f"- config_name: {config}", "  data_files:"]
                lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
            (root / repo / "README.md").write_text("\n".join(lines + ["---", ""]))
    return root


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    return write_snapshots(tmp_path_factory.mktemp("hub"))


# name -> (number of instances, question of the first, its label)
EXPECTED = {
    "bbh.boolean_expressions": (2, "not ( True ) and ( True ) is", "False"),
    "bbh.navigate": (1, "Always face forward. Take 1 step forward. Take 1 step backward.", "Yes"),
    "wmt14.fr-en": (2, "Le chat dort.", "The cat sleeps."),
    "wmt14.en-fr": (2, "The cat sleeps.", "Le chat dort."),
    "wmt16.de-en": (1, "Die Katze schläft.", "The cat sleeps."),
    "wmt16.en-de": (1, "The cat sleeps.", "Die Katze schläft."),
    "wmt16.ro-en": (1, "Pisica doarme.", "The cat sleeps."),
    "wmt16.en-ro": (1, "The cat sleeps.", "Pisica doarme."),
    "gem.common_gen": (1, "field, look, stand", "The player stood in the field looking at the batter."),
    "gem.dart": (1, "Mars Hill College | JOINED | 1973; Mars Hill College | LOCATION | Mars Hill, North Carolina",
                 "A school from Mars Hill, North Carolina, joined in 1973."),
    "gem.e2e_nlg": (1, "name[The Eagle], eatType[coffee shop]", "The Eagle is a coffee shop."),
    "gem.web_nlg": (1, "Aarhus | leader | Jacob_Bundsgaard; Aarhus | country | Denmark",
                    "Jacob Bundsgaard leads Aarhus, in Denmark."),
    "ai2_arc.ARC-Challenge": (1, "Which planet is closest to the Sun?\nOptions:\n- Mercury\n- Venus\n- Mars\n- Earth",
                              "Mercury"),
    "ai2_arc.ARC-Easy": (1, "Which is a mammal?\nOptions:\n- shark\n- whale\n- trout", "whale"),
    "nq.natural-questions": (1, "who wrote hamlet", ["Shakespeare", "William Shakespeare"]),
    "tqa.rc": (1, "What is the capital of Peru?", ["Lima", "Lima, Peru"]),
    "anli.r1": (2, "Premise: A dog runs in a park.\nHypothesis: An animal moves.\nDoes the premise entail the "
                   "hypothesis? Options: yes, it is not possible to tell, no", "yes"),
    "anli.r3": (1, None, "it is not possible to tell"),
    "glue.qnli": (2, 'Does the sentence "Paris is in France." answer the question "Where is Paris?"? Options: yes, no',
                  "yes"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hub_layouts_through_datasets(snapshots, name):
    n, question, label = EXPECTED[name]
    spec = ds.get_dataset_spec(name)
    inst = ds.load_instances(name, snapshots)
    assert len(inst) == n
    assert inst[0].label == label
    assert inst[0].prompt.startswith(spec.description + "\n\nQ: ") and inst[0].prompt.endswith("\nA:")
    if question is not None:
        assert inst[0].prompt == ds.format_prompt(spec.description, question)


def test_second_rows_and_limit(snapshots):
    assert ds.load_instances("anli.r1", snapshots)[1].label == "no"
    assert ds.load_instances("glue.qnli", snapshots)[1].label == "no"
    assert len(ds.load_instances("wmt14.fr-en", snapshots, limit=1)) == 1


def test_hub_requests_and_failures(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if path == "allenai/ai2_arc":
            return datasets.Dataset.from_list(SNAPSHOTS[path]["files"]["ARC-Easy/test-00000-of-00001.parquet"] * 3)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(ds.load_instances("ai2_arc.ARC-Easy", limit=2)) == 2
    assert calls == [("allenai/ai2_arc", "ARC-Easy", {"split": "test"})]
    hint = r"cannot load wmt16.en-de \(wmt/wmt16, de-en, test\) from the hub.*hf download wmt/wmt16"
    with pytest.raises(LogoError, match=hint):
        ds.load_instances("wmt16.en-de")
    with pytest.raises(LogoError, match="GEM/web_nlg"):
        ds.load_instances("gem.web_nlg")
    assert calls[-1] == ("GEM/web_nlg", None, {"split": "test", "data_files": {"test": "en/test/*.parquet"},
                                               "revision": PARQUET_EXPORT})
    with pytest.raises(LogoError, match="bbh.sports_understanding"):  # no local file: the hub's parquet export
        ds.load_instances("bbh.sports_understanding")
    assert calls[-1][2]["data_files"] == {"test": "sports_understanding/test/*.parquet"}


def test_unlabelled_rows_are_refused():
    spec = ds.get_dataset_spec("glue.qnli")
    with pytest.raises(LogoError, match="row 0 does not have the expected fields"):
        ds.convert_rows(spec, [{"question": "q", "sentence": "s", "label": -1}])
    with pytest.raises(LogoError, match="row 0 does not have the expected fields"):
        ds.convert_rows(spec, [{"question": "x"}])
    with pytest.raises(LogoError, match="row 0 does not have the expected fields"):
        ds.convert_rows(ds.get_dataset_spec("gem.common_gen"), [{"concepts": ["a"], "target": "", "references": []}])
