"""The task registry: deterministic generators, right answers, held-out splits that never repeat training data."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from logo.errors import LogoError
from logo.train import cli as train_cli
from logo.train.tasks import (
    EVAL_SEED_OFFSET,
    SPLIT_OFFSETS,
    TASKS,
    get_task,
    instance_key,
    normalize,
    number_words,
    plural,
    question_split,
    seen_tasks,
    unseen_tasks,
)
from logo.train.words import word_pool


def test_registry_api():
    assert len(seen_tasks()) >= 16 and len(unseen_tasks()) >= 3
    assert {t.name for t in seen_tasks()}.isdisjoint(t.name for t in unseen_tasks())
    assert [t.name for t in seen_tasks(["parity", "uppercase", "nope"])] == ["uppercase", "parity"]
    for task in TASKS.values():
        assert get_task(task.name) is task
        fields, _ = task.make(0, 1)[0] if task.seen else task.make(0, 1, "eval")[0]
        for template in task.templates:
            prompt = task.prompt(fields, template)
            assert all(value in prompt for value in fields.values()), (task.name, template)
    with pytest.raises(LogoError, match="unknown task"):
        get_task("nope")
    with pytest.raises(LogoError, match="unknown split"):
        get_task("parity").make(0, 3, split="test")


def test_templates_flan_style():
    """Seen tasks: >= 10 templates, 7 trained, >= 3 held out (valid + test), no held-out template is a training one;
    unseen tasks: asked in more than one way."""
    for task in seen_tasks():
        train, valid, test = (task.templates_for(s) for s in ("train", "valid", "eval"))
        assert len(task.templates) >= 10 and len(train) >= 7 and len(valid) + len(test) >= 3
        assert len(set(task.templates)) == len(task.templates), task.name
        assert not set(train) & (set(valid) | set(test)) and not set(valid) & set(test)
        for (prompt, _), (fields, _) in zip(task.examples(0, 14), task.make(0, 14)):
            assert prompt in {task.prompt(fields, t) for t in train}, "training prompts use training templates"
        shapes = {t.rstrip().endswith(("?", "?\nA:", "? ")) for t in task.templates}
        assert shapes == {True, False}, f"{task.name}: questions and imperatives"
        assert {t.startswith("{") for t in task.templates} == {True, False}, f"{task.name}: input first and last"
    for task in unseen_tasks():
        assert len(task.templates_for("valid")) >= 1 and len(task.templates_for("eval")) >= 2
        with pytest.raises(LogoError, match="never trained"):
            task.examples(0, 2, "train")


def test_only_seen_tasks_are_trainable():
    for task in seen_tasks():
        assert task.check_trainable() is task
    for task in unseen_tasks():
        with pytest.raises(LogoError, match=f"^task '{task.name}' is unseen: .*give --task a seen task: uppercase, "):
            task.check_trainable()


def test_generators_are_deterministic_by_seed():
    for task in TASKS.values():
        assert task.make(3, 6) == task.make(3, 6)
        assert task.make(3, 4) == task.make(3, 6)[:4], "a prefix must not depend on n"
        assert task.make(3, 6) != task.make(4, 6) or task.held_out == "seeds"


def test_held_out_seeds_are_never_training_seeds():
    assert SPLIT_OFFSETS == {"train": 0, "valid": 20_000, "eval": EVAL_SEED_OFFSET} and EVAL_SEED_OFFSET == 10_000


@pytest.mark.parametrize("name", [t.name for t in TASKS.values() if t.held_out != "seeds"])
def test_held_out_instances_never_appear_in_training(name):
    task = get_task(name)
    train = {instance_key(f) for f, _ in task.make(0, 800, "train")}  # the demo trains on 100 steps x 8
    for split in ("valid", "eval"):
        held_out = {instance_key(f) for f, _ in task.make(0, 50, split)}
        assert not train & held_out, f"{name}: a {split} instance is a training instance"
    assert {instance_key(f) for f, _ in task.make(0, 50, "valid")}.isdisjoint(
        instance_key(f) for f, _ in task.make(0, 50, "eval"))


def test_split_schemes():
    pools = [set(word_pool(s)) for s in ("train", "valid", "eval")]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])
    assert question_split("Is the number 7 even or odd?") == question_split("Is the number 7 even or odd?")
    shares = [question_split(f"q{i}") for i in range(2000)]
    assert 0.75 < shares.count("train") / 2000 < 0.85 and shares.count("eval") > 150
    for fields, _ in get_task("parity").make(0, 20, "eval"):
        assert question_split(instance_key(fields)) == "eval"


def test_generators_give_right_answers():
    f, a = get_task("uppercase").make(1, 1)[0]
    assert a == f["word"].upper()
    f, a = get_task("sort_words").make(1, 1)[0]
    assert a.split() == sorted(f["words"].split())
    f, a = get_task("max_number").make(1, 1)[0]
    assert int(a) == max(int(x) for x in f["nums"].split(", "))
    f, a = get_task("next_in_sequence").make(1, 1)[0]
    seq = [int(x) for x in f["seq"].split(", ")]
    assert int(a) - seq[-1] == seq[1] - seq[0]
    for f, a in get_task("syllogism").make(0, 30):
        assert a == ("yes" if f["premises"].startswith("All") and " not " not in f["premises"] else "no")
    for f, a in get_task("chain_sum").make(0, 5, "eval"):
        assert int(a) == eval(f["expr"])  # noqa: S307 - generated arithmetic
    for f, a in get_task("products").make(0, 5):
        assert int(a) == int(f["a"]) * int(f["b"])
    for f, a in get_task("word_sequence_reversal").make(0, 5):
        assert a.split(", ") == f["words"].split(", ")[::-1]
    assert plural("box") == "boxes" and plural("cherry") == "cherries"
    assert plural("valley") == "valleys" and plural("wolf") == "wolves" and plural("table") == "tables"
    assert [number_words(n) for n in (7, 13, 40, 42, 99)] == ["seven", "thirteen", "forty", "forty-two", "ninety-nine"]
    f, a = get_task("second_word").make(0, 1)[0]
    assert a == f["words"].split()[1]
    f, a = get_task("next_letter").make(0, 1)[0]
    assert ord(a) == ord(f["letter"]) + 1
    f, a = get_task("join_words").make(0, 1)[0]
    assert a == f["words"].replace(" ", "-")


def test_scoring_normalizes():
    task = get_task("parity")
    assert task.score(" Odd.", "odd") == 1.0 and task.score("odd number", "odd") == 0.0
    assert normalize(' "Paris". ') == "paris" and normalize("a   b\n") == "a b"


def test_unseen_tasks_are_asked_few_shot_and_plainly():
    for task in unseen_tasks():
        for split in ("valid", "eval"):
            counts = [t.count("\n\n") for t in task.templates_for(split)]
            assert max(counts) >= 2 and min(counts) == 0, f"{task.name} {split}: a few-shot and a plain template"


def test_tasks_command_lists_every_task():
    app = typer.Typer()
    train_cli.register(app)
    result = CliRunner().invoke(app, ["tasks"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(TASKS)
    for line, task in zip(lines, TASKS.values()):
        assert line.split()[:2] == [task.name, "seen" if task.seen else "unseen"] and task.held_out in line
