"""Offline task generators for the demo library, each asked in many instruction templates (FlanV2-style).

A task makes instances (``fields``, ``answer``) for a split (``train``, ``valid``, ``eval``) and prompts them
with its instruction templates. Every task has its own ``templates``: they differ in wording and shape
(question or imperative, instruction before or after the input, with or without an answer cue, short or long).
A seen task's templates are split into ``TEMPLATE_SPLITS``: the first 7 train its adapter, the next 2 are
validation templates (to fit routers) and the last 2 test templates (to report); held-out templates are never
trained on. Unseen tasks (no adapter) have validation and test templates only.

Held-out scheme for instances (held-out instances are never training instances):

- seeds: split ``train`` uses ``seed``, ``eval`` uses ``EVAL_SEED_OFFSET + seed`` (10_000 + seed) and ``valid``
  ``VALID_SEED_OFFSET + seed`` (20_000 + seed); the demo trains with seed 0, so no held-out seed is a training seed;
- on top of that, per task (``Task.held_out``):
  ``"words"``: word tasks draw from disjoint word pools per split (``logo.train.words``);
  ``"questions"``: every instance belongs to one split by a stable hash of its fields (80 % train, 10 % valid,
  10 % eval) and a split keeps only its own, so the instance sets are disjoint;
  ``"seeds"``: only the seeds differ. Used where the whole instance space is the skill (``products``: the
  10 x 10 times table; ``next_letter``: the alphabet) and for unseen tasks (never trained on).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from logo.errors import LogoError
from logo.train.words import word_pool

EVAL_SEED_OFFSET = 10_000
VALID_SEED_OFFSET = 20_000
SPLIT_OFFSETS = {"train": 0, "valid": VALID_SEED_OFFSET, "eval": EVAL_SEED_OFFSET}
SEEN_TEMPLATE_SPLITS = {"train": 7, "valid": 2, "eval": 2}
"""How a seen task's templates (in order) are split: 7 train its adapter, 2 validate routers, 2 test them."""
UNSEEN_TEMPLATE_SPLITS = {"train": 0, "valid": 2, "eval": 2}

HeldOut = Literal["words", "questions", "seeds"]
Fields = dict[str, str]
Generator = Callable[[random.Random, list[str]], tuple[Fields, str]]


def normalize(text: str) -> str:
    """Lowercase, strip, drop trailing periods and surrounding quotes, collapse whitespace."""
    text = text.strip().lower().rstrip(".").strip().strip("\"'")
    return re.sub(r"\s+", " ", text)


def instance_key(fields: Fields) -> str:
    """A stable string for an instance's fields (what the ``"questions"`` split hashes)."""
    return json.dumps(fields, sort_keys=True)


def question_split(key: str) -> str:
    """The split an instance belongs to under the ``"questions"`` scheme (stable across runs and machines)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "eval" if bucket == 9 else "valid" if bucket == 8 else "train"


@dataclass(frozen=True)
class Task:
    """A task: where its instances come from, the instruction templates that ask it, how it is scored."""

    name: str
    generator: str
    own: Generator
    templates: tuple[str, ...]
    seen: bool = True
    held_out: HeldOut = "questions"

    def __post_init__(self) -> None:
        splits = self.template_splits()
        if len(self.templates) != sum(splits.values()):
            raise LogoError(f"task {self.name} has {len(self.templates)} templates; it needs {sum(splits.values())}")

    def template_splits(self) -> dict[str, int]:
        return SEEN_TEMPLATE_SPLITS if self.seen else UNSEEN_TEMPLATE_SPLITS

    def templates_for(self, split: str) -> tuple[str, ...]:
        """The templates of ``split``: ``train`` (the adapter's), ``valid`` (router fitting), ``eval`` (test)."""
        if split not in SPLIT_OFFSETS:
            raise LogoError(f"unknown split {split!r}; use train, valid or eval")
        sizes = self.template_splits()
        start = {"train": 0, "valid": sizes["train"], "eval": sizes["train"] + sizes["valid"]}[split]
        return self.templates[start : start + sizes[split]]

    def check_trainable(self) -> Task:
        """The task itself if it has training templates; an unseen task (never trained on) is a user error."""
        if not self.templates_for("train"):
            seen = ", ".join(name for name, task in TASKS.items() if task.seen)
            raise LogoError(f"task {self.name!r} is unseen: it has no training templates (it tests routing on tasks "
                            f"without an adapter); give --task a seen task: {seen}")
        return self

    def make(self, seed: int, n: int, split: str = "train") -> list[tuple[Fields, str]]:
        """``n`` (fields, answer) instances of ``split``, deterministic in (seed, n, split); see the module doc."""
        if split not in SPLIT_OFFSETS:
            raise LogoError(f"unknown split {split!r}; use train, valid or eval")
        if n < 0:
            raise LogoError(f"cannot make {n} instances")
        rng = random.Random(SPLIT_OFFSETS[split] + seed)
        words = word_pool(split) if self.held_out == "words" else word_pool("train")
        out: list[tuple[Fields, str]] = []
        for _ in range(1_000_000):
            if len(out) == n:
                break
            fields, answer = self.own(rng, words)
            if self.held_out != "questions" or question_split(instance_key(fields)) == split:
                out.append((fields, answer))
        if len(out) < n:
            raise LogoError(f"task {self.name} has fewer than {n} distinct {split} instances")
        return out

    def prompt(self, fields: Fields, template: str | None = None) -> str:
        """The instance asked with ``template`` (default: the first template)."""
        return (template or self.templates[0]).format(**fields)

    def examples(self, seed: int, n: int, split: str = "train") -> list[tuple[str, str]]:
        """``n`` (prompt, answer) pairs of ``split``: its instances, asked in its templates in turn."""
        templates = self.templates_for(split)
        if not templates:
            raise LogoError(f"task {self.name} has no {split} templates (unseen tasks are never trained on)")
        return [(self.prompt(fields, templates[i % len(templates)]), answer)
                for i, (fields, answer) in enumerate(self.make(seed, n, split))]

    def score(self, prediction: str, answer: str) -> float:
        """1.0 for a normalized exact match, else 0.0."""
        return float(normalize(prediction) == normalize(answer))

    def describe(self) -> dict:
        """The generator, the held-out scheme and the templates per split (train_record.json, the manifest)."""
        return {"source": "logo", "generator": self.generator, "held_out": self.held_out,
                "templates": {split: list(self.templates_for(split)) for split in SPLIT_OFFSETS}}


# --------------------------------------------------------------- generators (seen tasks)
def _uppercase(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    w = rng.choice(words)
    return {"word": w}, w.upper()


def _first_letter(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    w = rng.choice(words)
    return {"word": w}, w[0]


def _numbers(rng: random.Random) -> list[int]:
    return rng.sample(range(1, 100), 4)


def _max_number(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    nums = _numbers(rng)
    return {"nums": ", ".join(map(str, nums))}, str(max(nums))


def _parity(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    n = rng.randint(1, 999)
    return {"n": str(n)}, "even" if n % 2 == 0 else "odd"


def _next_in_sequence(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    start, step = rng.randint(1, 60), rng.randint(2, 12)
    return {"seq": ", ".join(str(start + i * step) for i in range(4))}, str(start + 4 * step)


def _sort_words(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    picked = rng.sample(words, 3)
    return {"words": " ".join(picked)}, " ".join(sorted(picked))


def _repeat_word(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    w = rng.choice(words)
    return {"word": w}, " ".join([w] * 3)


NAMES = ["Alex", "Sam", "Mia", "Leo", "Ada", "Tom", "Eva", "Max", "Ivy", "Ben", "Zoe", "Kai"]


def _syllogism(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    """Yes/no syllogisms over (nonsense) categories: modus ponens, its negation, modus tollens."""
    a, b = rng.sample(words, 2)
    who = rng.choice(NAMES)
    form = rng.randrange(3)
    if form == 0:
        return {"premises": f"All {a}s are {b}s. {who} is a {a}.", "query": f"Is {who} a {b}?"}, "yes"
    if form == 1:
        return {"premises": f"No {a}s are {b}s. {who} is a {a}.", "query": f"Is {who} a {b}?"}, "no"
    return {"premises": f"All {a}s are {b}s. {who} is not a {b}.", "query": f"Is {who} a {a}?"}, "no"


def _chain_sum(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    return {"expr": f"{a} {op} {b}"}, str(a + b if op == "+" else a - b)


def _products(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"a": str(a), "b": str(b)}, str(a * b)


def _word_sequence_reversal(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    picked = rng.sample(words, 3)
    return {"words": ", ".join(picked)}, ", ".join(reversed(picked))


PLURALS = {"wolf": "wolves", "scarf": "scarves", "tomato": "tomatoes", "piano": "pianos", "bamboo": "bamboos"}
NO_PLURAL = {"cactus", "quartz", "sheep", "cotton", "cement", "gravel", "honey", "wool", "sugar", "iron"}


def plural(word: str) -> str:
    """The regular English plural (with the few irregular nouns of the word pool)."""
    if word in PLURALS:
        return PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _plural(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    w = rng.choice([w for w in words if w not in NO_PLURAL])
    return {"word": w}, plural(w)


def _second_word(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    picked = rng.sample(words, 4)
    return {"words": " ".join(picked)}, picked[1]


UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """1..99 in English words, e.g. ``forty-two``."""
    if n < 20:
        return UNITS[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + UNITS[n % 10])


def _number_to_word(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    n = rng.randint(1, 99)
    return {"n": str(n)}, number_words(n)


def _next_letter(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    i = rng.randrange(25)
    return {"letter": "abcdefghijklmnopqrstuvwxyz"[i]}, "abcdefghijklmnopqrstuvwxyz"[i + 1]


def _join_words(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    picked = rng.sample(words, 2)
    return {"words": " ".join(picked)}, "-".join(picked)


# --------------------------------------------------------------- generators (unseen tasks)
def _last_letter(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    w = rng.choice(words)
    return {"word": w}, w[-1]


def _min_number(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    nums = _numbers(rng)
    return {"nums": ", ".join(map(str, nums))}, str(min(nums))


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Norway": "Oslo", "Austria": "Vienna", "Poland": "Warsaw", "Kenya": "Nairobi",
    "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok", "Sweden": "Stockholm", "Finland": "Helsinki",
}


def _capital(rng: random.Random, words: list[str]) -> tuple[Fields, str]:
    country = rng.choice(sorted(CAPITALS))
    return {"country": country}, CAPITALS[country]


def few_shot(*blocks: str) -> str:
    """A few-shot template: the demonstration blocks, then the question block (the unseen tasks' format)."""
    return "\n\n".join(blocks)


# --------------------------------------------------------------- templates
# Seen tasks: 7 training templates, then 2 validation and 2 test templates (never trained on).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "uppercase": (
        "Write this word in capital letters: {word}\nAnswer:",
        "Convert to uppercase: {word}",
        "{word}\nRewrite the word above using only capital letters.",
        'What is "{word}" written in all caps?',
        "Make every letter of this word upper case.\nWord: {word}\nResult:",
        "Q: Uppercase the word {word}.\nA:",
        "I need the word {word} in block capitals, please. Can you write it that way?",
        "Shout this word (all capital letters): {word}\nOutput:",
        "How is {word} spelled in upper-case letters?",
        "Input: {word}\nTask: change every lowercase letter to its capital form.\nAnswer:",
        "Please give me {word} in CAPS.",
    ),
    "first_letter": (
        'What is the first letter of the word "{word}"?\nAnswer:',
        "First letter of {word}:",
        "{word}\nWhich letter does the word above begin with?",
        "Give the initial letter of the word {word}.",
        "Word: {word}\nStarting letter:",
        'Q: What letter does "{word}" start with?\nA:',
        "Tell me the letter at the very beginning of {word}, nothing else.",
        "Identify the opening letter in this word: {word}\nResult:",
        "{word} -- what is its first character?",
        "Look at the word {word}. Which letter comes first in it?",
        "Return the leading letter of the following word.\n{word}\nAnswer:",
    ),
    "max_number": (
        "Which is the largest number: {nums}?\nAnswer:",
        "Find the maximum of {nums}.",
        "{nums}\nWhich of these numbers is the biggest?",
        "Numbers: {nums}\nLargest:",
        "Q: What is the highest value among {nums}?\nA:",
        "Pick the greatest number from the list below.\n{nums}\nAnswer:",
        "Of {nums}, which one is largest?",
        "Here are some numbers: {nums}. Tell me the biggest one.",
        "max({nums}) =",
        "Out of the values {nums}, which is the greatest?",
        "List: {nums}\nReturn the maximum value.\nResult:",
    ),
    "parity": (
        "Is the number {n} even or odd?\nAnswer:",
        "Even or odd: {n}",
        "{n}\nIs the number above odd or even?",
        "Tell me whether {n} is an even number or an odd number.",
        "Number: {n}\nParity:",
        "Q: Would you call {n} even or odd?\nA:",
        "Classify {n} as even or odd.",
        "Decide if {n} is divisible by two; reply even or odd.",
        "Is {n} odd, or is it even?",
        "Determine the parity of the integer {n}.\nAnswer:",
        "Input: {n}\nQuestion: odd or even?\nOutput:",
    ),
    "next_in_sequence": (
        "Continue the sequence: {seq}, ...\nAnswer:",
        "What comes next: {seq}, ?",
        "{seq}\nWhat is the next number in this pattern?",
        "Find the next term of the arithmetic sequence {seq}.",
        "Sequence: {seq}\nNext:",
        "Q: Which number follows {seq}?\nA:",
        "Give the number that continues the series {seq}.",
        "The numbers {seq} follow a rule. What is the fifth number?",
        "{seq}, ___ -- fill in the blank.",
        "Extend this progression by one term: {seq}\nResult:",
        "What number should come after {seq} in this series?",
    ),
    "sort_words": (
        "Sort these words alphabetically: {words}\nAnswer:",
        "Put in alphabetical order: {words}",
        "{words}\nArrange the words above from A to Z.",
        "Alphabetize the following words: {words}.",
        "Words: {words}\nSorted:",
        "Q: What is the alphabetical order of {words}?\nA:",
        "List {words} in dictionary order.",
        "Order these words as they would appear in a dictionary: {words}\nOutput:",
        "Can you sort {words} alphabetically?",
        "Rearrange the words so they go from a to z.\n{words}\nAnswer:",
        "Give me {words} sorted in alphabetical order.",
    ),
    "repeat_word": (
        "Repeat the word three times: {word}\nAnswer:",
        "Say {word} three times.",
        "{word}\nWrite the word above 3 times, separated by spaces.",
        "Repeat thrice: {word}",
        "Word: {word}\nRepeated three times:",
        "Q: What is {word} written three times in a row?\nA:",
        "Echo the word {word} three times.",
        "Type {word} three times over.",
        "Triple this word: {word}\nOutput:",
        "Please write the word {word} 3 times.\nAnswer:",
        "Give me three copies of {word}, space separated.",
    ),
    "syllogism": (
        "{premises} {query} Answer yes or no.\nAnswer:",
        "Premises: {premises}\nQuestion: {query}",
        "{query} Given that: {premises}",
        "Assume the following is true. {premises}\n{query} (yes/no)",
        "Q: {premises} {query}\nA:",
        "Facts: {premises}\nDoes it follow? {query}\nReply:",
        "Using only logic, answer: {premises} {query}",
        "Reason it out. {premises} So, {query}",
        "Statements: {premises}\n{query} Yes or no?",
        "Consider: {premises}\nQuestion: {query}\nAnswer with yes or no:",
        "{premises} Based on that, {query}",
    ),
    "chain_sum": (
        "State the final answer to the following arithmetic problem: {expr} =\nAnswer:",
        "What is {expr}?",
        "{expr} =",
        "Calculate {expr}.",
        "Problem: {expr}\nResult:",
        "Q: How much is {expr}?\nA:",
        "Work out the value of {expr}.",
        "Compute: {expr}\nAnswer:",
        "Can you tell me what {expr} equals?",
        "Evaluate the expression {expr} and give the number.",
        "Expression: {expr}\nValue:",
    ),
    "products": (
        "Solve the following multiplication: {a} * {b}. Give only the result as your final answer.\nAnswer:",
        "What is {a} times {b}?",
        "{a} x {b} =",
        "Multiply {a} by {b}.",
        "Product of {a} and {b}:",
        "Q: How much is {a} multiplied by {b}?\nA:",
        "Compute {a} * {b}.",
        "If you multiply {a} and {b}, what do you get?",
        "{a} × {b} = ?",
        "Calculate the product {a} * {b}.\nAnswer:",
        "Tell me the result of {a} times {b}.",
    ),
    "word_sequence_reversal": (
        "Reverse this list of words: {words}\nAnswer:",
        "Reverse the order: {words}",
        "{words}\nWrite these words in reverse order, comma-separated.",
        "Put the words {words} backwards (last one first).",
        "List: {words}\nReversed:",
        "Q: What is the list {words} in reverse order?\nA:",
        "Flip the order of these words: {words}.",
        "Read this list from the end to the start: {words}\nOutput:",
        "Can you reverse the sequence {words}?",
        "Given the words {words}, list them starting from the last.\nAnswer:",
        "Invert the order of the following comma-separated words: {words}",
    ),
    "plural": (
        "What is the plural of {word}?\nAnswer:",
        "Plural form: {word}",
        "{word}\nWrite the plural of the noun above.",
        "Make the word {word} plural.",
        "Singular: {word}\nPlural:",
        "Q: One {word}, two what?\nA:",
        "Give me the plural noun for {word}.",
        "How do you say more than one {word}?",
        "Turn {word} into its plural form.\nOutput:",
        "Noun: {word}\nWhat is its plural?\nAnswer:",
        "Pluralize this noun: {word}",
    ),
    "second_word": (
        "What is the second word in this list: {words}?\nAnswer:",
        "Second word: {words}",
        "{words}\nWhich word is in position two?",
        "Tell me the 2nd word of: {words}.",
        "Words: {words}\nSecond:",
        'Q: In "{words}", which word comes second?\nA:',
        "Pick out the second item from {words}.",
        "Look at {words}. Which one is number two?",
        "Return word #2 from the sequence: {words}\nOutput:",
        "From the list {words}, give the word right after the first one.\nAnswer:",
        'Which word follows the first in "{words}"?',
    ),
    "number_to_word": (
        "Write the number {n} in words.\nAnswer:",
        "Spell out {n}",
        "{n}\nHow is the number above written in English words?",
        "Number: {n}\nIn words:",
        "Q: How do you write {n} as a word?\nA:",
        "Convert the numeral {n} into words.",
        "What is {n} spelled out?",
        "Give the English name of the number {n}.",
        "Express {n} with letters instead of digits.\nOutput:",
        "Digits: {n}\nWrite them out as a word.\nAnswer:",
        "How would you spell the number {n}?",
    ),
    "next_letter": (
        "Which letter comes after {letter} in the alphabet?\nAnswer:",
        "Next letter after {letter}:",
        "{letter}\nWhat is the following letter of the alphabet?",
        "Give the letter that follows {letter}.",
        "Letter: {letter}\nNext:",
        "Q: In the alphabet, what comes right after {letter}?\nA:",
        "Name the alphabet letter after {letter}.",
        "What letter is one step after {letter} in a-b-c order?",
        "Alphabet successor of {letter}?\nOutput:",
        "Starting from the letter {letter}, move forward one place in the alphabet.\nAnswer:",
        "Tell me which letter comes next after {letter}.",
    ),
    "join_words": (
        "Join these words with a hyphen: {words}\nAnswer:",
        "Hyphenate: {words}",
        "{words}\nConnect the two words above with a dash.",
        "Combine {words} into one word using a hyphen.",
        "Words: {words}\nJoined:",
        "Q: What do you get if you link {words} with a hyphen?\nA:",
        "Put a hyphen between the words {words}.",
        "Glue {words} together with a - between them.",
        "Make a hyphenated compound of these words: {words}\nOutput:",
        "Two words: {words}\nWrite them as one hyphenated term.\nAnswer:",
        "Can you join {words} with a hyphen?",
    ),
    # Unseen tasks (no adapter): 2 validation, then 2 test templates; each has a few-shot and a plain one.
    "last_letter": (
        few_shot('Q: What is the last letter of the word "cat"?\nA: t', 'Q: What is the last letter of the word '
                 '"house"?\nA: e', 'Q: What is the last letter of the word "{word}"?\nA:'),
        'Which letter does the word "{word}" end with?\nAnswer:',
        few_shot("Word: cat\nLast letter: t", "Word: house\nLast letter: e", "Word: {word}\nLast letter:"),
        "What is the final letter of {word}?\nAnswer:",
    ),
    "min_number": (
        few_shot("Q: Which is the smallest number: 12, 7, 30, 25?\nA: 7",
                 "Q: Which is the smallest number: 64, 81, 59, 70?\nA: 59",
                 "Q: Which is the smallest number: {nums}?\nA:"),
        "Which of these numbers is the smallest: {nums}?\nAnswer:",
        few_shot("Numbers: 12, 7, 30, 25\nMinimum: 7", "Numbers: 64, 81, 59, 70\nMinimum: 59",
                 "Numbers: {nums}\nMinimum:"),
        "Find the minimum of {nums}.\nAnswer:",
    ),
    "capital_city": (
        few_shot("Q: What is the capital city of Canada?\nA: Ottawa", "Q: What is the capital city of Brazil?\nA: "
                 "Brasilia", "Q: What is the capital city of {country}?\nA:"),
        "What is the capital of {country}?\nAnswer:",
        few_shot("Country: Canada\nCapital: Ottawa", "Country: Brazil\nCapital: Brasilia",
                 "Country: {country}\nCapital:"),
        "Name the capital city of {country}.\nAnswer:",
    ),
}


# --------------------------------------------------------------- registry
def _task(name: str, fn: Generator, held_out: HeldOut, seen: bool = True) -> Task:
    return Task(name=name, generator=fn.__name__.lstrip("_"), own=fn, templates=TEMPLATES[name], seen=seen,
                held_out=held_out)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task("uppercase", _uppercase, "words"),
        _task("first_letter", _first_letter, "words"),
        _task("max_number", _max_number, "questions"),
        _task("parity", _parity, "questions"),
        _task("next_in_sequence", _next_in_sequence, "questions"),
        _task("sort_words", _sort_words, "words"),
        _task("repeat_word", _repeat_word, "words"),
        _task("syllogism", _syllogism, "words"),
        _task("chain_sum", _chain_sum, "questions"),
        _task("products", _products, "seeds"),
        _task("word_sequence_reversal", _word_sequence_reversal, "words"),
        _task("plural", _plural, "words"),
        _task("second_word", _second_word, "words"),
        _task("number_to_word", _number_to_word, "questions"),
        _task("next_letter", _next_letter, "seeds"),
        _task("join_words", _join_words, "words"),
        _task("last_letter", _last_letter, "words", seen=False),
        _task("min_number", _min_number, "questions", seen=False),
        _task("capital_city", _capital, "seeds", seen=False),
    ]
}

# Tried and dropped (not learnable in the demo's training budget): reasoning-gym spell_backward
# (min_word_len=3, max_word_len=5): own-adapter accuracy 0.02 vs base 0.00 after 80 steps. Letter-level tasks
# (spelling backwards, letter counting, ciphers) fight the BPE tokenizer of a 135M model.


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LogoError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def seen_tasks(names: list[str] | None = None) -> list[Task]:
    """Tasks that get an adapter (restricted to ``names`` if given, e.g. the library's manifest)."""
    return [t for t in TASKS.values() if t.seen and (names is None or t.name in names)]


def unseen_tasks() -> list[Task]:
    """Tasks with no adapter: routing must not make them worse than the base model."""
    return [t for t in TASKS.values() if not t.seen]
