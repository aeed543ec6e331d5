"""Evaluation scorers against the released code's own outputs.

tests/fixtures/llava_med_eval_cases.json: LLaVA-Med v1.0.0's normalize_word, calculate_f1score and the evaluate()
of run_eval.py / run_eval_batch.py, run unmodified on the inputs listed there (commit and method in its "source").
tests/fixtures/huatuo_match_choice.json: HuatuoGPT-Vision's scorer.py match_choice3, likewise.
Every case is checked; the default scorers' own behaviour is pinned separately where it differs on purpose.
"""

import json
from pathlib import Path

import pytest

import llava_med as lm
import huatuo_vision as hv

FIX = Path(__file__).resolve().parent / "fixtures"
LLAVA = json.loads((FIX / "llava_med_eval_cases.json").read_text(encoding="utf-8"))
HUATUO = json.loads((FIX / "huatuo_match_choice.json").read_text(encoding="utf-8"))


def _id(case, key):
    return repr(case[key])[:40]


# ---------------------------------------------------------------- LLaVA-Med: the one normaliser


@pytest.mark.parametrize("case", LLAVA["normalize_word"], ids=lambda c: _id(c, "text"))
def test_normalize_answer_is_the_released_normalize_word(case):
    assert lm.normalize_answer(case["text"]) == case["normalize_word"]


def test_contraction_table_has_exactly_the_released_keys_that_can_match():
    inputs = {c["text"]: c["normalize_word"] for c in LLAVA["normalize_word"]}
    released_keys = [t for t in inputs if " " not in t and t.replace("'", "").isalpha()]
    for key, value in lm.CONTRACTIONS.items():  # no key of ours that the release lacks: each was run upstream
        assert inputs.get(key) == value, key
    changed = {t for t in released_keys if inputs[t] != t and t.islower() and t not in lm.CONTRACTIONS}
    assert changed <= {"none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                       "an", "the"}  # the rest are number words and articles


def test_normaliser_quirks_named_in_comments():
    n = lm.normalize_answer
    assert n("Left-sided (pleural) effusion!") == "left sided pleural effusion"  # issue 15's example
    assert n("left-sided, x - ray") == "leftsided x ray"  # one spaced '-' deletes every '-'
    assert n("1,000 x-ray") == "1000 xray"  # a digit comma deletes every mark
    assert n("lung" + "." * 40) == "lung" + "." * 8  # only 32 periods go
    assert n("none") == "0" and n("The one") == "1" and n("Im sure") == "im sure"


# ---------------------------------------------------------------- LLaVA-Med: open recall


@pytest.mark.parametrize("case", LLAVA["open"], ids=lambda c: _id(c, "prediction") + "|" + _id(c, "answer"))
def test_compat_token_recall_is_run_eval_calculate_f1score(case):
    p, r, f1 = lm.token_recall(case["prediction"], case["answer"], compat=True)
    up_f1, up_p, up_r = case["run_eval_f1score"]
    assert (p, r, f1) == pytest.approx((up_p, up_r, up_f1), abs=1e-12)
    assert 100 * r == pytest.approx(case["run_eval_recall_x100"], abs=1e-9)
    assert 100 * r == pytest.approx(case["run_eval_batch_recall_x100"], abs=1e-9)
    s = lm.score_vqa([{"answer": case["answer"], "prediction": case["prediction"], "answer_type": "OPEN"}],
                      closed_scoring="llava_med_batch")
    assert s["compat_n_open"] == 1 and 100 * s["compat_open_recall"] == pytest.approx(case["run_eval_recall_x100"])


def test_default_recall_clips_repeated_words():
    assert lm.token_recall("effusion effusion", "pleural effusion") == (0.5, 0.5, 0.5)
    p, r, f1 = lm.token_recall("effusion effusion", "pleural effusion", compat=True)
    assert (p, r) == (1.0, pytest.approx(2 / 3))  # the released count: tp on the prediction side
    assert lm.token_recall("lung lung", "lung") == (0.5, 1.0, pytest.approx(2 / 3))
    assert lm.token_recall("", "lung") == (0.0, 0.0, 0.0) and lm.token_recall("lung", "the") == (0.0, 0.0, 0.0)
    assert lm.token_recall("Three nodules", "3") == (0.5, 1.0, pytest.approx(2 / 3))


# ---------------------------------------------------------------- LLaVA-Med: closed rules


@pytest.mark.parametrize("case", LLAVA["closed"], ids=lambda c: _id(c, "prediction") + "|" + _id(c, "answer"))
def test_compat_closed_rules_are_run_eval_and_run_eval_batch(case):
    row = [{"answer": case["answer"], "prediction": case["prediction"], "answer_type": "CLOSED"}]
    a, b = lm.score_vqa(row, "llava_med"), lm.score_vqa(row, "llava_med_batch")
    assert a["compat"] == "llava_med" and a["compat_closed_accuracy"] == case["run_eval_hit"]
    assert b["compat"] == "llava_med_batch" and b["compat_closed_accuracy"] == case["run_eval_batch_hit"]
    assert a["closed_accuracy"] == b["closed_accuracy"] == lm.score_vqa(row)["closed_accuracy"]  # default unchanged


@pytest.mark.parametrize("mode,name", [("llava_med", "run_eval"), ("llava_med_batch", "run_eval_batch")])
def test_compat_aggregates_equal_released_evaluate(mode, name):
    rows = [{"answer": c["answer"], "prediction": c["prediction"], "answer_type": "OPEN"} for c in LLAVA["open"]]
    rows += [{"answer": c["answer"], "prediction": c["prediction"], "answer_type": "CLOSED"} for c in LLAVA["closed"]]
    rows.append({"answer": "yes", "prediction": "yes", "answer_type": "open"})  # skipped there: not exactly OPEN
    s = lm.score_vqa(rows, mode)
    assert (s["compat_n_open"], s["compat_n_closed"]) == (len(LLAVA["open"]), len(LLAVA["closed"]))
    assert 100 * s["compat_open_recall"] == pytest.approx(LLAVA["aggregate"][name]["recall_x100"], abs=1e-9)
    assert 100 * s["compat_closed_accuracy"] == pytest.approx(LLAVA["aggregate"][name]["yes_no_accuracy_x100"])


def test_default_and_compat_differ_where_readme_says():
    rows = [{"answer": "no", "prediction": "Normal chest x-ray.", "answer_type": "CLOSED"},
            {"answer": "left", "prediction": "left", "answer_type": "CLOSED"},
            {"answer": "pleural effusion", "prediction": "effusion effusion", "answer_type": "OPEN"}]
    s = lm.score_vqa(rows, "llava_med")
    assert s["closed_accuracy"] == 0.5 and s["compat_closed_accuracy"] == 0.5  # each gets the other one right
    assert lm.score_vqa(rows[:1], "llava_med")["compat_closed_accuracy"] == 1.0  # 'no' inside 'normal'
    assert lm.score_vqa(rows[1:2], "llava_med")["compat_closed_accuracy"] == 0.0  # no yes/no letters in 'left'
    assert lm.score_vqa(rows[1:2], "llava_med_batch")["compat_closed_accuracy"] == 1.0
    assert s["open_recall"] == 0.5 and s["compat_open_recall"] == pytest.approx(2 / 3)
    assert "compat_closed_accuracy" not in lm.score_vqa(rows)  # the default returns our numbers only
    with pytest.raises(ValueError, match="closed_scoring"):
        lm.score_vqa(rows, "llava-med")


def test_yes_no_takes_the_first_yes_or_no_word():
    assert lm.yes_no("Answer:no") == "no" and lm.yes_no("'Yes', it is") == "yes"
    assert lm.yes_no("yes, it is not normal") == "yes" and lm.yes_no("Nope, normal, I don't know") is None
    assert lm.yes_no("none") is None  # normalised to '0', as the released normaliser does


# ---------------------------------------------------------------- HuatuoGPT-Vision: match_choice3


@pytest.mark.parametrize("case", HUATUO["cases"], ids=lambda c: _id(c, "text"))
def test_huatuo_scoring_is_match_choice3(case):
    as_dict = {hv.LETTERS[i]: o for i, o in enumerate(case["options"])}
    assert hv.match_choice(case["text"], case["options"], scoring="huatuo") == case["match_choice3"]
    assert hv.match_choice(case["text"], as_dict, scoring="huatuo") == case["match_choice3"]


@pytest.mark.parametrize("case", [c for c in HUATUO["call_site"] if "test_mmlu" in c], ids=lambda c: _id(c, "text"))
def test_huatuo_correctness_is_released_test_mmlu(case):
    assert (hv.match_choice(case["text"], case["options"], "huatuo") == case["answer_label"]) == case["test_mmlu"]


def test_ours_improves_on_match_choice3():
    four = ["Pneumonia", "Tuberculosis", "Lung cancer", "Normal"]
    m = hv.match_choice
    assert m("b", four) == "B" and m("b", four, "huatuo") == "b"  # lower-case letter
    assert m("I think it is C", four) == "C" and m("I think it is C", four, "huatuo") == "I"  # 'I' names no option
    assert m("", four) == "A" and m("", four, "huatuo") == "D"  # difflib tie: first vs last option
    assert m("abnormal", ["Normal", "Abnormal"]) == "B" and m("abnormal", ["Normal", "Abnormal"], "huatuo") == "A"
    assert m("Heart", ["Brain", "", "Heart"]) == "C" and m("Heart", ["Brain", "", "Heart"], "huatuo") == "B"
    assert m("选B", four) == m("选B", four, "huatuo") == "B"  # no letter after '选'; difflib picks B here
    assert m("lung cancer or lung", ["lung", "lung cancer"]) == "A"  # the option mentioned last
    assert m("tuberculosis", {"A": "Pneumonia", "B": "Tuberculosis"}) == m("tuberculosis", four) == "B"
    with pytest.raises(ValueError, match="ours or huatuo"):
        m("A", four, "paper")
    n_differ = sum(m(c["text"], c["options"]) != c["match_choice3"] for c in HUATUO["cases"])
    assert n_differ == 18  # of 60 cases (README)


def test_mc_scoring_flag_reaches_the_matcher(tmp_path, monkeypatch):
    seen, real = [], hv.match_choice
    monkeypatch.setattr(hv, "match_choice", lambda text, options, scoring="ours": seen.append(scoring) or
                        real(text, options, scoring))
    hv.main(["--stages", "eval", "--eval-limit", "3", "--eval-batch-size", "3", "--mc-scoring", "huatuo",
             "--out", str(tmp_path)])
    assert seen == ["huatuo"] * 3
