"""Zero-shot task scoring: sample-file parsing, agreement with a plain per-choice scorer
written here (its own prompts from the raw files, one full-sequence forward per choice,
log-softmax by hand), batched == one-at-a-time, batch cuts, and spec errors. The token
tries of `stages.evaluate.tasks.scoring` are tested in test_tasks_scoring.py."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stages.evaluate.tasks.scoring
from stages.evaluate.perplexity import causal_lm_forward
from stages.evaluate.tasks.formats import Item, preprocess, read_items
from stages.evaluate.tasks.zeroshot import (
    TaskSpec,
    choice_length,
    encode_pair,
    evaluate_tasks,
    length_batches,
    load_task,
    loglikelihood,
    parse_task_spec,
    score_items,
)
from tests.numerics import assert_sums_close

SAMPLES = Path(__file__).parents[3].parent / "shared" / "data" / "task-samples"
FILES = {
    "lambada": "lambada_test.jsonl",
    "piqa": "piqa_valid.jsonl",
    "arc_easy": "ARC-Easy-Dev.jsonl",
    "arc_challenge": "ARC-Easy-Dev.jsonl",
    "hellaswag": "hellaswag_val_6lines.txt",
    "winogrande": "winogrande_dev.jsonl",
    "boolq": "boolq_dev.jsonl",
    "storycloze": "storycloze_val_spring2016.csv",
}
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"task samples not found at {SAMPLES}")


def spec(name: str) -> str:
    return f"{name}={SAMPLES / FILES[name]}"


def first_line(name: str) -> str:
    return (SAMPLES / FILES[name]).read_text(encoding="utf-8").splitlines()[0]


def reference_prompt(name: str) -> tuple[list[tuple[str, str]], list[str], int]:
    """(requests, choice texts, gold) of the first item, from the raw file and lm-eval's templates."""
    if name == "lambada":
        text = json.loads(first_line(name))["text"]
        ctx, word = text.rsplit(" ", 1)
        return [(ctx, " " + word)], [word], 0
    if name == "piqa":
        d = json.loads(first_line(name))
        gold = int((SAMPLES / "piqa_valid-labels.lst").read_text().split()[0])
        return [(f"Question: {d['goal']}\nAnswer:", " " + d[s]) for s in ("sol1", "sol2")], [d["sol1"], d["sol2"]], gold
    if name.startswith("arc"):
        d = json.loads(first_line(name))
        texts = [c["text"] for c in d["question"]["choices"]]
        gold = [c["label"] for c in d["question"]["choices"]].index(d["answerKey"])
        return [(f"Question: {d['question']['stem']}\nAnswer:", " " + t) for t in texts], texts, gold
    if name == "hellaswag":
        lines = (SAMPLES / FILES[name]).read_text().splitlines()[:6]
        endings = [e.strip() for e in lines[2:6]]
        return [(lines[0].strip(), " " + e) for e in endings], endings, int(lines[1])
    if name == "winogrande":
        d = json.loads(first_line(name))
        before, after = d["sentence"].split("_")
        ctxs = [before + d["option1"], before + d["option2"]]
        return [(c, " " + after.strip()) for c in ctxs], ctxs, int(d["answer"]) - 1
    if name == "boolq":
        d = json.loads(first_line(name))
        ctx = d["title"] + " -- " + d["passage"] + "\nQuestion: " + d["question"] + "?\nAnswer:"  # SuperGLUE's passage
        return [(ctx, " no"), (ctx, " yes")], ["no", "yes"], int(d["answer"])
    with (SAMPLES / FILES[name]).open(newline="") as f:
        row = next(csv.DictReader(f))
    ctx = " ".join(row[f"InputSentence{i}"] for i in range(1, 5))
    ends = [row["RandomFifthSentenceQuiz1"], row["RandomFifthSentenceQuiz2"]]
    return [(ctx, " " + e) for e in ends], ends, int(row["AnswerRightEnding"]) - 1


@torch.no_grad()
def reference_loglik(model, tok, ctx: str, cont: str, max_length: int = 10_000) -> tuple[float, bool]:
    """One full-sequence forward; log-softmax by hand; lm-eval's tokenization rule written out."""
    n_sp = len(ctx) - len(ctx.rstrip())
    if n_sp:
        ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    cont_ids = whole[len(tok(ctx, add_special_tokens=False)["input_ids"]) :]
    seq = whole[-(max_length + 1) :]
    logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].double()  # (len(seq), vocab)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    total, greedy = 0.0, True
    for k, tok_id in enumerate(cont_ids):
        p = len(seq) - len(cont_ids) + k  # position of the token; predicted by logits at p - 1
        total += float(logp[p - 1, tok_id])
        greedy &= int(logp[p - 1].argmax()) == tok_id
    return total, greedy


def cont_tokens(tok, reqs) -> list[int]:
    """How many continuation tokens each request's log-likelihood sums."""
    return [len(encode_pair(tok, c, x)[1]) for c, x in reqs]


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def check_against_reference(model, tok, name: str, batch_size: int, atol: float, whole_task: bool = True) -> None:
    """The module's first item of `name` scores like the reference prompts and scorer
    (and, if `whole_task`, `evaluate_tasks` with limit 1 reports the same metrics)."""
    reqs, choices, gold = reference_prompt(name)
    ref = [reference_loglik(model, tok, c, x) for c, x in reqs]
    items = load_task(spec(name), limit=1)
    assert list(items[0].requests) == reqs and items[0].gold == gold
    (score,) = score_items(model, tok, items, batch_size=batch_size, max_length=10_000)
    assert_sums_close(score.lls, [ll for ll, _ in ref], cont_tokens(tok, reqs), atol=atol)
    assert list(score.greedy) == [g for _, g in ref]
    lls = [ll for ll, _ in ref]
    assert score.pred == argmax(lls)
    assert score.pred_norm == argmax([ll / len(c) for ll, c in zip(lls, choices, strict=True)])
    if not whole_task:
        return
    metrics = evaluate_tasks(model, tok, [spec(name)], limit=1, batch_size=batch_size, max_length=10_000)[name]
    assert metrics["n"] == 1
    if name == "lambada":
        assert metrics["acc"] == float(ref[0][1])
        assert metrics["ppl"] == pytest.approx(math.exp(-ref[0][0]), rel=1e-4)
    else:
        assert metrics["acc"] == float(argmax(lls) == gold)


@needs_samples
@pytest.mark.parametrize("name", list(FILES))
def test_first_item_matches_reference_scorer(tiny, name: str) -> None:
    check_against_reference(*tiny, name, batch_size=8, atol=1e-4)


@needs_samples
def test_batched_equals_one_at_a_time_with_truncation(tiny) -> None:
    model, tok = tiny
    forward = causal_lm_forward(model)
    reqs = [r for name in FILES for item in load_task(spec(name), limit=3) for r in item.requests]
    single = loglikelihood(forward, tok, reqs, batch_size=1, max_length=200)
    for batched in (
        loglikelihood(forward, tok, reqs, batch_size=8, max_length=200),
        loglikelihood(model, tok, reqs, batch_size=8, max_length=200),
    ):
        assert [g for _, g in batched] == [g for _, g in single]
        assert_sums_close([ll for ll, _ in batched], [ll for ll, _ in single], cont_tokens(tok, reqs))
    seen = []

    def counting(ids):
        seen.append(ids.shape[0])
        return forward(ids)

    one_token = [(item.requests[0][0], c) for item in load_task(spec("boolq"), limit=3) for c in "ny"]
    shared = [ll for ll, _ in loglikelihood(counting, tok, one_token, 8, 200)]
    expect = [reference_loglik(model, tok, c, x, 200)[0] for c, x in one_token]
    assert_sums_close(shared, expect, cont_tokens(tok, one_token), atol=1e-4)
    assert seen == [3]  # one-token continuations of one context share an input row, as in lm-eval
    # left truncation to 200 tokens agrees with the reference (BoolQ, LAMBADA texts are longer)
    ends = reqs[-6:] + reqs[:3]
    expect = [reference_loglik(model, tok, c, x, 200)[0] for c, x in ends]
    assert_sums_close([batched[reqs.index(r)][0] for r in ends], expect, cont_tokens(tok, ends), atol=1e-4)


@needs_samples
def test_sample_files_parse_with_gold_labels() -> None:
    counts = {name: len(load_task(spec(name))) for name in FILES}
    assert counts == dict.fromkeys(FILES, 20)
    golds = {name: [it.gold for it in load_task(spec(name), limit=3)] for name in FILES}
    assert golds["piqa"] == [0, 1, 1]  # piqa_valid-labels.lst
    assert golds["arc_easy"] == [0, 2, 0]  # answerKey A, C, A
    assert load_task(spec("arc_easy"))[8].gold == 0  # numeric labels: answerKey "1"
    assert golds["hellaswag"] == [3, 3, 2]
    assert golds["winogrande"] == [1, 0, 1]  # answer "2", "1", "2"
    assert golds["boolq"] == [0, 1, 1]  # false, true, true
    assert golds["storycloze"] == [0, 0, 1]  # AnswerRightEnding 1, 1, 2
    (lam,) = load_task(spec("lambada"), limit=1)
    assert lam.requests[0][1] == " signs" and lam.requests[0][0].endswith("I don't care about")
    hs = load_task(spec("hellaswag"), limit=1)[0]
    assert hs.requests[0] == (
        "Roof shingle removal: A man is sitting on a roof. he",
        " is using wrap to wrap a pair of skis.",
    )
    wg = load_task(spec("winogrande"), limit=1)[0]
    assert wg.requests[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")
    assert len(load_task(spec("lambada"), limit=5)) == 5


def test_hellaswag_jsonl_preprocess(tmp_path: Path) -> None:
    row = {
        "activity_label": "Home",
        "ctx_a": "[header] How to clean. [title] Get a cloth.",
        "ctx_b": "then",
        "endings": ["Wipe [step] it.", "a", "b", "c"],
        "label": "0",
    }
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (item,) = read_items("hellaswag", path)
    assert item.requests[0] == ("Home: How to clean.. Get a cloth. Then", " Wipe it.")
    assert item.choices[0] == "Wipe it." and preprocess("  x [title]y ") == "x. y"


def test_encode_pair_moves_trailing_spaces_and_prefixes_empty_context(tiny) -> None:
    _, tok = tiny
    ctx, cont = encode_pair(tok, "ab  ", "c")
    assert tok.decode(ctx) == "ab" and tok.decode(cont) == "  c"
    ctx, cont = encode_pair(tok, "", "xy")
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "xy"


@needs_samples
def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        parse_task_spec("mmlu=x.jsonl")
    with pytest.raises(ValueError, match="task file for piqa not found"):
        parse_task_spec(f"piqa={tmp_path / 'nope.jsonl'}")
    with pytest.raises(ValueError, match="empty PATH"):
        parse_task_spec("boolq=")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_task(spec("boolq"), limit=0)
    with pytest.raises(ValueError, match="storycloze has no hub copy"):
        load_task("storycloze")
    assert parse_task_spec(" PIQA=" + str(SAMPLES / FILES["piqa"])) == TaskSpec("piqa", SAMPLES / FILES["piqa"])
    lone = tmp_path / "valid.jsonl"
    shutil.copy(SAMPLES / FILES["piqa"], lone)
    with pytest.raises(ValueError, match="valid-labels.lst is missing"):
        load_task(f"piqa={lone}")
    bad = tmp_path / "hs.txt"
    bad.write_text("a\n0\nb\nc\n")
    with pytest.raises(ValueError, match="not a multiple of 6"):
        load_task(f"hellaswag={bad}")
    with pytest.raises(ValueError, match="does not look like boolq"):
        load_task(f"boolq={SAMPLES / FILES['piqa']}")
    with pytest.raises(ValueError, match="unique"):
        evaluate_tasks(lambda ids: ids, None, [spec("piqa"), spec("piqa")])


@needs_samples
@pytest.mark.slow
def test_smollm2_scores_samples(smollm2_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    specs = [spec(name) for name in FILES if name != "arc_challenge"]
    assert stages.evaluate.tasks.scoring._ModelRunner(model).shares_prefixes
    # The real tokenizer and model score every task once (token tries),
    # two items per task equal full rows one at a time, and one item per task is rescored independently.
    batched = evaluate_tasks(model, tok, specs, limit=3, batch_size=8)
    for m in batched.values():
        assert m["n"] == 3 and 0.0 <= m["acc"] <= 1.0 and 0.0 <= m.get("acc_norm", 0.0) <= 1.0
    assert 1.0 < batched["lambada"]["ppl"] < 1e6
    items = [item for s in specs for item in load_task(s, limit=2)]
    shared = score_items(model, tok, items, batch_size=8)
    single = score_items(causal_lm_forward(model), tok, items, batch_size=1)
    n = cont_tokens(tok, [r for item in items for r in item.requests])
    assert_sums_close([ll for s in shared for ll in s.lls], [ll for s in single for ll in s.lls], n, atol=1e-4)
    assert [(s.greedy, s.pred, s.pred_norm) for s in shared] == [(s.greedy, s.pred, s.pred_norm) for s in single]
    for name in FILES:
        if name != "arc_challenge":
            check_against_reference(model, tok, name, batch_size=4, atol=2e-3, whole_task=False)


def test_acc_norm_divides_by_characters_as_lm_eval(tiny) -> None:
    """lm-eval divides by `len(choice)` (code points): with uniform logits "abc" (4 tokens with its
    space, 3 characters) beats "éé" (3 tokens, 2 characters but 4 UTF-8 bytes); by bytes it would lose."""
    _, tok = tiny
    assert choice_length("naïve") == 5

    def uniform(ids):  # every token has log p = -log 128
        return torch.zeros(*ids.shape, 128)

    item = Item((("Question: x\nAnswer:", " abc"), ("Question: x\nAnswer:", " éé")), 0, ("abc", "éé"))
    (score,) = score_items(uniform, tok, [item], max_length=64)
    assert score.lls == pytest.approx((-4 * math.log(128), -3 * math.log(128)))
    assert (score.pred, score.pred_norm) == (1, 0)


def test_batches_cut_at_the_least_padding_plus_pass_cost(tiny) -> None:
    _, tok = tiny
    shapes = []

    def uniform(ids):
        shapes.append(tuple(ids.shape))
        return torch.zeros(*ids.shape, 128)

    reqs = [("a" * n, " x") for n in (60, 28, 55, 5, 30)]  # input rows of n + 1 tokens
    res = loglikelihood(uniform, tok, reqs, batch_size=8, max_length=64)
    assert shapes == [(2, 61), (2, 31), (1, 6)]  # 24 + 122 + 24 + 62 + 24 + 6: any other cut pads or passes more
    assert [ll for ll, _ in res] == pytest.approx([-2 * math.log(128)] * 5)
    assert [len(b) for b in length_batches([((0,) * 10,)] * 5, batch_size=2)] == [2, 2, 1]
    rows = [((0,) * n,) for n in (40, 30, 20, 10)]
    assert [len(b) for b in length_batches(rows, batch_size=8)] == [2, 2]  # 24 + 80 + 24 + 40
    assert [len(b) for b in length_batches(rows, batch_size=8, pass_tokens=0)] == [1, 1, 1, 1]
    assert [len(b) for b in length_batches(rows, batch_size=8, pass_tokens=1000)] == [4]
    assert length_batches([], batch_size=8) == []


def test_boolq_prompt_is_lm_evals_from_googles_file_and_from_superglues_rows():
    """lm-eval scores SuperGLUE's BoolQ, whose passage is `title -- passage`; Google's dev.jsonl keeps the title
    apart. Both give lm-eval's exact prompt string; a SuperGLUE row's passage is not prefixed twice."""
    from stages.evaluate.tasks.formats import boolq_item

    google = {"question": "is it so", "title": "Some topic", "answer": True, "passage": "It is so."}
    superglue = {"question": "is it so", "passage": "Some topic -- It is so.", "idx": 0, "label": 1}
    want = "Some topic -- It is so.\nQuestion: is it so?\nAnswer:"
    for row in (google, superglue):
        item = boolq_item(row)
        assert [ctx for ctx, _ in item.requests] == [want, want] and item.gold == 1
