"""The lm-eval backend: offline local tasks through simple_evaluate, log-likelihoods checked against PEFT."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from logo.engine import LoGoEngine  # noqa: E402
from logo.eval.lm_eval_backend import LoGoLM  # noqa: E402
from logo.library import AdapterLibrary  # noqa: E402
from logo.router import RouterConfig  # noqa: E402
from tests.test_mixture import official_peft  # noqa: E402

TASK_MC = """
task: logo_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: [" yes", " no"]
metric_list:
  - metric: acc
"""
TASK_GEN = """
task: logo_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
metric_list:
  - metric: exact_match
"""


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture
def engine(tiny_library, tokenizer):
    model, root = tiny_library("llama")
    eng = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2))
    yield eng
    eng.close()


def test_loglikelihood_equals_official_peft_with_context_routing(engine, tiny_library, tokenizer):
    _, root = tiny_library("llama")
    lm = LoGoLM(engine=engine, batch_size=3)
    requests = [_Req("Q: is it?\nA:", " yes"), _Req("Q: a much longer question here\nA:", " no way"),
                _Req("Hi", " there")]
    got = lm.loglikelihood(requests)
    for req, (logprob, _) in zip(requests, got):
        context, continuation = req.args
        route = engine.route([context])[0]
        ref_model = official_peft("llama", root, route.names, route.weights)
        ctx = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        with torch.no_grad():
            logits = ref_model(input_ids=torch.tensor([whole])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        expected = sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        assert logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_simple_evaluate_on_local_tasks(engine, tiny_library, tokenizer, tmp_path):
    from lm_eval.tasks import TaskManager

    _, root = tiny_library("llama")

    data = tmp_path / "toy.jsonl"
    rows = [{"question": f"is {i} small", "label": i % 2, "answer": "yes"} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "mc.yaml").write_text(TASK_MC.format(data=data))
    (tmp_path / "gen.yaml").write_text(TASK_GEN.format(data=data))
    manager = TaskManager(include_path=str(tmp_path))
    results = lm_eval.simple_evaluate(model=LoGoLM(engine=engine, batch_size=4),
                                      tasks=["logo_toy_mc", "logo_toy_gen"], task_manager=manager)
    mc = results["results"]["logo_toy_mc"]
    expected = []  # accuracy recomputed independently: the official PEFT path, routed on each question
    for row in rows:
        context = f"Q: {row['question']}\nA:"
        route = engine.route([context])[0]
        ref_model = official_peft("llama", root, route.names, route.weights)
        totals = []
        for choice in (" yes", " no"):
            ctx, whole = tokenizer(context)["input_ids"], tokenizer(context + choice)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(ref_model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            totals.append(sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        expected.append(int(totals.index(max(totals)) == row["label"]))
    assert mc["acc,none"] == pytest.approx(sum(expected) / len(expected))
    assert "exact_match,none" in results["results"]["logo_toy_gen"]
    samples = results["samples"]["logo_toy_gen"]
    assert len(samples) == 6 and all("\n" not in s["resps"][0][0] for s in samples)


def test_by_name_with_an_argument_string(tiny_model_dir, tiny_library, tmp_path):
    from lm_eval.api.registry import get_model

    from tests.helpers import make_library

    model, _ = tiny_library("llama")
    lib = tmp_path / "lib"
    make_library(model, lib, [{"name": f"t{i}", "r": 4, "alpha": 8} for i in range(3)])
    lm = get_model("logo").create_from_arg_string(
        f"base_model={tiny_model_dir('llama')},adapters={lib},k=2,device=cpu",
        {"batch_size": "auto", "max_batch_size": None, "device": None})
    assert isinstance(lm, LoGoLM) and lm.engine.router.config.k == 2 and lm.batch_size == 8
    [(logprob, greedy)] = lm.loglikelihood([_Req("Q: is it?\nA:", " yes")])
    assert logprob < 0 and isinstance(greedy, bool)


def reference_logprob(engine, root, route_ids: list[int], ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(cont | ctx) on the official PEFT path, under the mixture routed on ``route_ids``."""
    route = engine.route_batch(torch.tensor([route_ids]), torch.ones(1, len(route_ids), dtype=torch.long))[0]
    ref_model = official_peft("llama", root, route.names, route.weights)
    whole = ctx + cont
    with torch.no_grad():
        lp = torch.log_softmax(ref_model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
    return sum(lp[len(ctx) - 1 + i, token].item() for i, token in enumerate(cont))


def test_requests_are_encoded_as_lm_evals_hf_model_does(engine, tiny_library, tokenizer):
    """A context's trailing space moves to the continuation; an empty context is the prefix token, so every
    continuation token is scored; a rolling log-likelihood sums disjoint windows of max_length tokens, every
    token of the string scored once (each checked on the official PEFT path)."""
    _, root = tiny_library("llama")
    lm = LoGoLM(engine=engine, batch_size=2)
    [(spaced, _)], [(moved, _)] = lm.loglikelihood([_Req("Q: is it?\nA: ", "yes")]), lm.loglikelihood(
        [_Req("Q: is it?\nA:", " yes")])
    assert spaced == moved
    prefix = tokenizer.bos_token_id
    text = "Hello world"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    [(empty, _)] = lm.loglikelihood([_Req("", text)])
    assert empty == pytest.approx(reference_logprob(engine, root, [prefix], [prefix], ids), rel=1e-4, abs=1e-4)
    [rolling] = LoGoLM(engine=engine, batch_size=2, max_length=6).loglikelihood_rolling([_Req(text)])
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, 6, 1)]
    assert sum(len(cont) for _, cont in windows) == len(ids) and len(windows) > 1
    route_on = [prefix, *ids][:6]
    expected = sum(reference_logprob(engine, root, route_on, ctx, cont) for ctx, cont in windows)
    assert rolling == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_a_context_over_max_length_is_cut_from_the_left_as_lm_evals_hf_model_cuts_it(engine, tiny_library,
                                                                                     tokenizer):
    """lm-eval's hf model scores ``(context + continuation)[-(max_length + 1):][:-1]``: the context loses its first
    tokens. The cut context is routed and scored (checked on the official PEFT path), with a warning."""
    _, root = tiny_library("llama")
    context, continuation = "Q: hello there, how are you\nA:", " fine thanks"
    ctx, cont = tokenizer(context)["input_ids"], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    max_length = len(ctx) + len(cont) - 4
    kept = ctx[-(max_length + 1 - len(cont)):]
    assert len(kept) == len(ctx) - 3
    lm = LoGoLM(engine=engine, max_length=max_length)
    with pytest.warns(UserWarning, match=f"1 of 2 loglikelihood request\\(s\\) over max_length={max_length}"):
        [(cut, _), (short, _)] = lm.loglikelihood([_Req(context, continuation), _Req("Q:", " fine")])
    assert cut == pytest.approx(reference_logprob(engine, root, kept, kept, cont), rel=1e-4, abs=1e-4)
    [(whole, _)] = LoGoLM(engine=engine, max_length=len(ctx) + len(cont)).loglikelihood([_Req(context, continuation)])
    assert whole == pytest.approx(reference_logprob(engine, root, ctx, ctx, cont), rel=1e-4, abs=1e-4)
    assert whole != pytest.approx(cut, rel=1e-4)


@pytest.mark.parametrize("args, message", [
    ("k=abc", "k must be a whole number, got 'abc'"), ("batch_size=0", "batch_size must be at least 1"),
    ("max_length=many", "max_length must be a whole number"), ("temperature=hot", "temperature must be a number")])
def test_bad_model_args_name_the_argument(tiny_model_dir, args, message):
    from lm_eval.api.registry import get_model

    from logo.errors import LogoError

    with pytest.raises(LogoError, match=message):
        get_model("logo").create_from_arg_string(f"base_model={tiny_model_dir('llama')},{args}", {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="lm-eval's default device is usable where CUDA is")
def test_lm_evals_default_device_is_set_aside_without_cuda(tiny_model_dir, tiny_library):
    """lm-eval passes ``device="cuda:0"`` when nobody gave ``--device``: without CUDA that runs on the CPU with a
    warning, while ``device=cuda`` written in ``model_args`` is still refused."""
    from lm_eval.api.registry import get_model

    from logo.errors import LogoError

    _, root = tiny_library("llama")
    args = f"base_model={tiny_model_dir('llama')},adapters={root}"
    with pytest.warns(UserWarning, match="--device cuda:0 is not available here"):
        lm = get_model("logo").create_from_arg_string(args, {"device": "cuda:0"})
    assert lm.engine.device.type == "cpu"
    with pytest.raises(LogoError, match="cuda"):
        get_model("logo").create_from_arg_string(f"{args},device=cuda", {"device": "cuda:0"})


def test_bad_requests_are_one_clear_error(engine):
    from logo.errors import LogoError

    lm = LoGoLM(engine=engine, max_length=8)
    with pytest.raises(LogoError, match="request 1 has an empty continuation"):
        lm.loglikelihood([_Req("Q:", " a"), _Req("Q: hello", "")])
    with pytest.raises(LogoError, match="request 1's continuation has 18 tokens, over max_length=8"):
        lm.loglikelihood([_Req("Q:", " a"), _Req("Q:", " a b c d e f g h i")])
    with pytest.raises(LogoError, match=r"setting\(s\) \['top_k'\] are not supported"):
        lm.generate_until([_Req("Q:", {"until": ["\n"], "max_gen_toks": 2, "top_k": 5})])
    # a prompt's number is its request's index, whatever group of settings it falls in
    mixed = [_Req("ok", {"max_gen_toks": 2}), _Req("ok", {"max_gen_toks": 3}), _Req("x " * 3000, {"max_gen_toks": 3})]
    with pytest.raises(LogoError, match=r"generate_until request 2 has \d+ tokens, over the limit of 2048"):
        lm.generate_until(mixed)
    with pytest.raises(LogoError, match="generate_until request 1 is empty"):
        lm.generate_until([_Req("ok", {"max_gen_toks": 2}), _Req("  ", {"max_gen_toks": 3})])
    sampled = lm.generate_until([_Req("Q:", {"max_gen_toks": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9})])
    assert len(sampled) == 1


def test_lm_evals_command_line_with_the_model_registered(tiny_model_dir, tiny_library, tmp_path):
    """``python -m logo.eval.lm_eval_backend`` is lm-eval's own command line with ``--model logo`` known."""
    import subprocess
    import sys

    _, root = tiny_library("llama")
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"is {i} small", "answer": "yes"}) for i in range(3)))
    (tmp_path / "gen.yaml").write_text(TASK_GEN.format(data=data))
    args = [sys.executable, "-m", "logo.eval.lm_eval_backend", "--model", "logo", "--model_args",
            f"base_model={tiny_model_dir('llama')},adapters={root},k=1", "--tasks", "logo_toy_gen",
            "--include_path", str(tmp_path), "--limit", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "logo_toy_gen" in done.stdout and "exact_match" in done.stdout


def test_lm_evals_command_line_prints_a_model_arg_mistake_in_one_line(tiny_model_dir, tmp_path):
    """``python -m logo.eval.lm_eval_backend`` with a bad logo model argument: ``error: ...`` and exit 2, as the
    ``logo`` command prints a user mistake, not a traceback (the argument fails before the model loads)."""
    import subprocess
    import sys

    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"question": "is 1 small", "answer": "yes"}))
    (tmp_path / "gen.yaml").write_text(TASK_GEN.format(data=data))
    args = [sys.executable, "-m", "logo.eval.lm_eval_backend", "--model", "logo", "--model_args",
            f"base_model={tiny_model_dir('llama')},k=0", "--tasks", "logo_toy_gen", "--include_path", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: k must be at least 1, got 0"


def test_an_unknown_model_argument_names_the_known_ones():
    """``--model_args foo=1`` is a one-line error listing the arguments (not a TypeError traceback)."""
    from logo.errors import LogoError
    from logo.eval.lm_eval_backend import LoGoLM

    with pytest.raises(LogoError, match=r"unknown model argument 'strategy' in --model_args; did you mean "
                                        r"'selection_strategy'\? known: base_model, adapters"):
        LoGoLM.create_from_arg_obj({"strategy": "norm"})
