"""The task registry: deterministic generators, right answers, held-out splits that never repeat training data."""

from __future__ import annotations

import pytest

from logo.errors import LogoError
from logo.train.tasks import (
    EVAL_SEED_OFFSET,
    SPLIT_OFFSETS,
    TASKS,
    get_task,
    normalize,
    question_split,
    seen_tasks,
    unseen_tasks,
)
from logo.train.words import word_pool


def test_registry_api():
    assert len(seen_tasks()) >= 8 and len(unseen_tasks()) >= 2
    assert {t.name for t in seen_tasks()}.isdisjoint(t.name for t in unseen_tasks())
    assert [t.name for t in seen_tasks(["parity", "uppercase", "nope"])] == ["uppercase", "parity"]
    for task in TASKS.values():
        assert get_task(task.name) is task
        assert "{question}" in task.prompt_template and task.prompt("QQ").count("QQ") == 1
    with pytest.raises(LogoError, match="unknown task"):
        get_task("nope")
    with pytest.raises(LogoError, match="unknown split"):
        get_task("parity").make(0, 3, split="test")


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
    train = {q for q, _ in task.make(0, 800, "train")}  # the demo trains on 100 steps x 8 = 800 instances
    for split in ("valid", "eval"):
        held_out = {q for q, _ in task.make(0, 50, split)}
        assert not train & held_out, f"{name}: a {split} question is a training question"
    assert {q for q, _ in task.make(0, 50, "valid")}.isdisjoint(q for q, _ in task.make(0, 50, "eval"))


def test_split_schemes():
    pools = [set(word_pool(s)) for s in ("train", "valid", "eval")]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])
    assert question_split("Is the number 7 even or odd?") == question_split("Is the number 7 even or odd?")
    shares = [question_split(f"q{i}") for i in range(2000)]
    assert 0.75 < shares.count("train") / 2000 < 0.85 and shares.count("eval") > 150
    for q, _ in get_task("parity").make(0, 20, "eval"):
        assert question_split(q) == "eval"


def test_generators_give_right_answers():
    q, a = get_task("uppercase").make(1, 1)[0]
    assert a == q.rsplit(": ", 1)[1].upper()
    q, a = get_task("sort_words").make(1, 1)[0]
    assert a.split() == sorted(q.rsplit(": ", 1)[1].split())
    q, a = get_task("max_number").make(1, 1)[0]
    assert int(a) == max(int(x) for x in q.split(": ")[1].rstrip("?").split(", "))
    q, a = get_task("next_in_sequence").make(1, 1)[0]
    seq = [int(x) for x in q.split(": ")[1].rstrip(", .").split(", ")]
    assert int(a) - seq[-1] == seq[1] - seq[0]
    for q, a in get_task("syllogism").make(0, 30):
        assert a == ("yes" if q.startswith("All") and " not " not in q else "no")
    for q, a in get_task("chain_sum").make(0, 5, "eval"):
        assert int(a) == eval(q.rsplit(": ", 1)[1].rstrip(" ="))  # noqa: S307 - generated arithmetic


def test_scoring_normalizes():
    task = get_task("parity")
    assert task.score(" Odd.", "odd") == 1.0 and task.score("odd number", "odd") == 0.0
    assert normalize(' "Paris". ') == "paris" and normalize("a   b\n") == "a b"


def test_unseen_tasks_use_their_own_few_shot_format():
    seen_templates = {t.prompt_template for t in seen_tasks()}
    for task in unseen_tasks():
        assert task.prompt_template not in seen_templates and task.prompt_template.count("Q: ") >= 3
