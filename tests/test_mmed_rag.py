"""MMed-RAG: report metrics against the test-only references (sacrebleu, rouge-score) and hand-computed cases."""

import math

import pytest
from sacrebleu.metrics import BLEU
from rouge_score import rouge_scorer

import mmed_rag as mr

HYPS = ["The heart size is normal. No pleural effusion or pneumothorax.",
        "There is a small left pleural effusion with adjacent atelectasis.",
        "Lungs are clear bilaterally, no focal consolidation.",
        "Mild cardiomegaly. The lungs are clear. No effusion.",
        "no acute cardiopulmonary process"]
REFS = ["Heart size is normal. There is no pleural effusion. No pneumothorax is seen.",
        "Small left pleural effusion and left basilar atelectasis.",
        "The lungs are clear. No focal consolidation, effusion or pneumothorax.",
        "The heart is mildly enlarged. Lungs are clear without effusion.",
        "No acute cardiopulmonary abnormality."]


def test_bleu_matches_sacrebleu():
    ours = mr.corpus_bleu(HYPS, REFS)
    join = lambda xs: [" ".join(mr.report_tokens(x)) for x in xs]  # noqa: E731
    for n in range(1, 5):
        bleu = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n, effective_order=False)
        ref = bleu.corpus_score(join(HYPS), [join(REFS)]).score
        assert ours[n - 1] == pytest.approx(ref, abs=1e-9), n
    assert ours[0] > ours[1] > ours[2] > ours[3] > 0
    assert mr.corpus_bleu(["a b"], ["c d e"]) == [0.0] * 4  # no smoothing: nothing matched -> 0, as pycocoevalcap


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for h, r in zip(HYPS, REFS):
        ref = 100 * scorer.score(r, h)["rougeL"].fmeasure
        assert mr.rouge_l(h, r) == pytest.approx(ref, abs=1e-9)
    assert mr.lcs_length(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example
    assert mr.rouge_l("x y", "z") == 0.0


def test_meteor_hand_computed():
    # Identical 6 words: P = R = 1, one chunk of 6 matches -> 100 * (1 - 0.5 * (1/6)^3).
    s = "no pleural effusion or pneumothorax seen"
    assert mr.meteor(s, s) == pytest.approx(100 * (1 - 0.5 / 216))
    # hyp "effusion no pleural" vs ref "no pleural effusion": 3 matches in 2 chunks ("effusion" | "no pleural").
    assert mr.meteor("effusion no pleural", "no pleural effusion") == pytest.approx(100 * (1 - 0.5 * (2 / 3) ** 3))
    # hyp 4 words, 2 match as one chunk; ref 3 words: P = 1/2, R = 2/3, Fmean = PR/(0.9P + 0.1R).
    p, r = 0.5, 2 / 3
    expect = 100 * p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (1 / 2) ** 3)
    assert mr.meteor("small left nodule noted", "small left effusion") == pytest.approx(expect)
    # A repeated word is matched once per reference occurrence.
    assert mr.meteor("no no no", "no") == pytest.approx(100 * (1 / 3) / (0.9 / 3 + 0.1) * (1 - 0.5))
    assert mr.meteor("", "x") == 0.0 and mr.meteor("a", "b") == 0.0


def test_report_scores_average():
    out = mr.report_scores(HYPS, REFS)
    assert out["bleu"] == pytest.approx(sum(out[f"bleu{n}"] for n in range(1, 5)) / 4)
    assert out["n"] == 5 and 0 < out["rouge_l"] < 100 and 0 < out["meteor"] < 100 and not math.isnan(out["bleu"])
