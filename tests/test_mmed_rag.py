"""MMed-RAG: the report metrics (llava_med.py's, moved there from mmed_rag.py) against the test-only references
(sacrebleu, rouge-score), NLTK's METEOR (fixture) and hand-computed cases; prompts, the release's noise image, RAG-PT
subsets, rates, gamma by accuracy, routing, knowledge-base disjointness, the cache keys, the one-image mode,
--eval-only, the fault suite and the complete pipeline on 2 ranks."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from transformers import AutoTokenizer

import faults
import llava_med as lm
import mmed_rag as mr
from data.toy_readers import toy_splits
from conftest import ROOT

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
    ours = lm.corpus_bleu(HYPS, REFS)
    join = lambda xs: [" ".join(lm.report_tokens(x)) for x in xs]  # noqa: E731
    for n in range(1, 5):
        bleu = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n, effective_order=False)
        ref = bleu.corpus_score(join(HYPS), [join(REFS)]).score
        assert ours[n - 1] == pytest.approx(ref, abs=1e-9), n
    assert ours[0] > ours[1] > ours[2] > ours[3] > 0
    assert lm.corpus_bleu(["a b"], ["c d e"]) == [0.0] * 4  # no smoothing: nothing matched -> 0, as pycocoevalcap


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for h, r in zip(HYPS, REFS):
        ref = 100 * scorer.score(r, h)["rougeL"].fmeasure
        assert lm.rouge_l(h, r) == pytest.approx(ref, abs=1e-9)
    assert lm.lcs_length(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example
    assert lm.rouge_l("x y", "z") == 0.0


def test_rouge_l_beta_12_is_pycocoevalcap_weighting():
    # hyp "a b c d", ref "a b e": LCS 2, P = 1/2, R = 2/3; F_beta = (1 + b^2) P R / (R + b^2 P)
    p, r = 0.5, 2 / 3
    assert lm.rouge_l("a b c d", "a b e", beta=1.2) == pytest.approx(100 * 2.44 * p * r / (r + 1.44 * p))
    assert lm.rouge_l("a b c d", "a b e") == pytest.approx(100 * 2 * p * r / (p + r))
    out = lm.report_scores(["a b c d"], ["a b e"], rouge_beta=1.2)
    assert out["rouge_l"] == pytest.approx(100 * 2.44 * p * r / (r + 1.44 * p))


def test_meteor_exact_hand_computed():
    # Identical 6 words: P = R = 1, one chunk of 6 matches -> 100 * (1 - 0.5 * (1/6)^3).
    s = "no pleural effusion or pneumothorax seen"
    assert lm.meteor_exact(s, s) == pytest.approx(100 * (1 - 0.5 / 216))
    # hyp "effusion no pleural" vs ref "no pleural effusion": 3 matches in 2 chunks ("effusion" | "no pleural").
    assert lm.meteor_exact("effusion no pleural", "no pleural effusion") == pytest.approx(100 * (1 - 0.5 * (2 / 3) ** 3))
    # hyp 4 words, 2 match as one chunk; ref 3 words: P = 1/2, R = 2/3, Fmean = PR/(0.9P + 0.1R).
    p, r = 0.5, 2 / 3
    expect = 100 * p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (1 / 2) ** 3)
    assert lm.meteor_exact("small left nodule noted", "small left effusion") == pytest.approx(expect)
    # A repeated word is matched once per reference occurrence.
    assert lm.meteor_exact("no no no", "no") == pytest.approx(100 * (1 / 3) / (0.9 / 3 + 0.1) * (1 - 0.5))
    assert lm.meteor_exact("", "x") == 0.0 and lm.meteor_exact("a", "b") == 0.0


def test_meteor_exact_against_nltk():
    """NLTK's single_meteor_score with stemming and WordNet off (run once, tests/fixtures/meteor_nltk.json). Where
    a reference word repeats, NLTK aligns to its last free occurrence and we to the one extending the chunk: fewer
    chunks, a higher score. The stem stage is what exact matching leaves out (48.1 vs 75.5 on 'nodules')."""
    cases = json.loads((ROOT / "tests" / "fixtures" / "meteor_nltk.json").read_text())["cases"]
    differ = 0
    for c in cases:
        ours, ref = lm.meteor_exact(c["hypothesis"], c["reference"]), c["nltk_exact"]
        toks = lm.report_tokens(c["reference"])
        repeats = any(toks.count(w) > 1 and w in lm.report_tokens(c["hypothesis"]) for w in toks)
        if ours != pytest.approx(ref, abs=1e-4):
            assert repeats and ours > ref, c
            differ += 1
    assert differ == 2
    # one of the two by hand: 8 matches of 10 hyp / 13 ref words in 3 chunks (NLTK: 'is' -> the second 'is', 5)
    c = cases[2]
    p, r = 8 / 10, 8 / 13
    assert lm.meteor_exact(c["hypothesis"], c["reference"]) == pytest.approx(100 * p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (3 / 8) ** 3))
    first = cases[0]
    assert round(lm.meteor_exact(first["hypothesis"], first["reference"]), 1) == 48.1
    assert round(first["nltk_exact_stem"], 1) == 75.5


def test_bleu_hand_computed_two_sentences():
    """hyp 1 "the cat sat on the mat" / ref "the cat is on the mat"; hyp 2 "a dog ran" / ref "a dog ran away".
    Clipped matches over the corpus: 1-grams 5 + 3 of 6 + 3, 2-grams 3 + 2 of 5 + 2, 3-grams 1 + 1 of 4 + 1,
    4-grams 0 of 3 (no smoothing: BLEU-4 = 0); lengths c = 9 < r = 10: brevity penalty exp(1 - 10/9)."""
    bp = math.exp(1 - 10 / 9)
    p1, p2, p3 = 8 / 9, 5 / 7, 2 / 5
    expect = [100 * bp * p1, 100 * bp * (p1 * p2) ** 0.5, 100 * bp * (p1 * p2 * p3) ** (1 / 3), 0.0]
    hyps, refs = ["The cat sat on the mat.", "A dog ran"], ["the cat is on the mat", "a dog ran away"]
    assert lm.corpus_bleu(hyps, refs) == pytest.approx(expect)
    out = lm.report_scores(hyps, refs)
    assert [out[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(expect)
    assert out["bleu"] == pytest.approx(sum(expect) / 4) and out["n"] == 2
    assert out["meteor_exact"] == pytest.approx((lm.meteor_exact(hyps[0], refs[0]) + lm.meteor_exact(hyps[1], refs[1])) / 2)


# ---------------------------------------------------------------- prompts, RAG-PT subsets, VQA metrics, end to end

def test_prompts_are_the_released_strings():
    note = ("It should be noted that the diagnostic information in the reference reports cannot be directly used as "
            "the basis for diagnosis, but should only be used for reference and comparison.")
    assert mr.rag_prompt("vqa", "ophthalmology", ["r one.", "r two."], "Is there edema?") == (
        "You are provided with a fundus image, a image-related question and 2 reference report(s): 1. r one. "
        "2. r two. \nPlease answer the question based on the image and report and choose from the following two "
        f"options: [yes, no]. {note} Question: Is there edema?")
    assert mr.rag_prompt("report", "radiology", ["r1"]) == (
        "You are a professional radiologist. You are provided with an X-ray image and 1 reference report(s): 1. r1 "
        f"\nPlease generate a report based on the image. {note} Please only include the content of the report in "
        "your response.")
    assert "a chest X-ray image" in mr.rag_prompt("vqa", "radiology", ["x"], "q")
    assert mr.plain_prompt("vqa", "radiology", "Is it?") == (
        "Is it? Please answer the question based on the image and choose from the following two options: [yes, no].")
    assert "professional pathologist" in mr.rag_prompt("report", "pathology", ["x"])


TOK = AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER)
TINY_CFG = lm.tiny_config(TOK)


TOY = ROOT / "data" / "toy"


def scripted_items():
    """Five items whose answers are scripted per condition: (plain, with RAG, noise image + RAG, unrelated + RAG)."""
    rep = "Chest x-ray. There is a nodule in the right upper lung."
    script = {  # id: (task, domain, answer, plain, rag, noise, unrelated)
        "copy": ("vqa", "radiology", "yes", "yes", "yes", "yes", "no"),  # right even on noise -> D_cm (noise only)
        "helps": ("vqa", "pathology", "no", "yes", "no", "yes", "yes"),  # wrong alone, right with RAG -> D_oa1
        "hurts": ("vqa", "ophthalmology", "yes", "yes it is", "no", "no", "no"),  # right alone, wrong with RAG -> D_oa2
        "never": ("vqa", "radiology", "no", "yes", "yes", "yes", "yes"),  # always wrong -> nothing
        "report": ("report", "radiology", rep, "Normal chest.", rep, rep, rep),  # right only with RAG, any image
    }
    items, answers = [], {}
    for n, (key, (task, domain, gold, plain, rag, noise, unrel)) in enumerate(script.items()):
        items.append({"id": key, "task": task, "image": f"images/train_{domain}_{n:04d}.png", "domain": domain,
                      "answer": gold, "reports": [f"ref {key}"], "question": f"Question {key}?" if task == "vqa" else ""})
        answers[key] = {"plain": plain, "rag": rag, "noise": noise, "unrelated": unrel}
    return items, answers


def scripted_model(items, answers, calls):
    by_image = {it["image"]: it for it in items}

    def generate(jobs):
        out = []
        for j in jobs:
            calls.append(j)
            if j["image"].startswith("noise:"):
                it, kind = by_image[j["image"].removeprefix("noise:")], "noise"
            else:
                it = next(x for x in items if f"ref {x['id']}" in j["prompt"]) if "reference report" in j["prompt"] \
                    else by_image[j["image"]]
                kind = "plain" if "reference report" not in j["prompt"] else \
                    ("rag" if j["image"] == it["image"] else "unrelated")
            out.append(answers[it["id"]][kind])
        return out
    return generate


def test_rag_pt_subsets_from_a_scripted_model():
    items, answers = scripted_items()
    calls = []
    pairs, sizes = mr.rag_pt_pairs(items, scripted_model(items, answers, calls), "noise", report_threshold=50)
    assert len(calls) == 3 * len(items)  # plain, RAG, noise + RAG per item; greedy answers come from the model
    assert [c["image"] for c in calls[:3]] == [items[0]["image"]] * 2 + ["noise:" + items[0]["image"]]
    got = {(p["id"], p["subset"]) for p in pairs}
    # the report item is in two subsets: it copies the reports onto noise, and only RAG makes it right
    assert got == {("copy_cm", "cm"), ("helps_oa1", "oa1"), ("hurts_oa2", "oa2"), ("report_cm", "cm"),
                   ("report_oa1", "oa1")}
    assert {k: sizes[k] for k in ("cm", "oa1", "oa2")} == {"cm": 2, "oa1": 2, "oa2": 1}
    p = {x["id"]: x for x in pairs}
    rag = mr.rag_prompt("vqa", "radiology", ["ref copy"], "Question copy?")
    assert p["copy_cm"]["conversations"] == [{"from": "human", "value": "<image>\n" + rag}, {"from": "gpt", "value": "yes"}]
    assert p["copy_cm"]["rejected_conversations"][0] == p["copy_cm"]["conversations"][0]  # same RAG prompt
    assert p["copy_cm"]["rejected_conversations"][1]["value"] == "yes"
    assert p["copy_cm"]["rejected_noised"] == 1 and "rejected_image" not in p["copy_cm"]  # the released format
    assert p["helps_oa1"]["rejected_conversations"][1]["value"] == "yes"  # the no-retrieval answer
    assert p["hurts_oa2"]["rejected_conversations"][1]["value"] == "no"  # the answer retrieval misled
    assert p["hurts_oa2"]["conversations"][1]["value"] == "yes" and "rejected_noised" not in p["hurts_oa2"]
    # the unrelated-image variant, and both: the "copy" item survives only the noise image
    pairs_u, sizes_u = mr.rag_pt_pairs(items, scripted_model(items, answers, []), "unrelated", report_threshold=50)
    assert {x["id"] for x in pairs_u if x["subset"] == "cm"} == {"report_cm"}
    ru = next(x for x in pairs_u if x["subset"] == "cm")
    assert ru["rejected_image"] != items[4]["image"] and "radiology" not in ru["rejected_image"]  # another domain's
    assert "rejected_noised" not in ru
    pairs_b, sizes_b = mr.rag_pt_pairs(items, scripted_model(items, answers, []), "both", report_threshold=50)
    assert sizes_b["cm"] == 3 and {x["id"] for x in pairs_b if x["subset"] == "cm"} == \
        {"copy_cm_noise", "report_cm_noise", "report_cm_unrelated"}
    # the written pairs are what dpo.py's PairData trains on: its "noise:" key for the noised pair, the file otherwise
    recs = [(f"pairs {x['id']}", json.loads(json.dumps(x))) for x in pairs_b]
    data = mr.PairData(recs, TOY, TOK, TINY_CFG, 512, False, allow_outside=True)
    rejected = {it["id"]: it["rejected_images"] for it in data.items}
    assert len(data) == len(pairs_b) and rejected["copy_cm_noise"] == ["noise:" + items[0]["image"]]
    assert rejected["report_cm_unrelated"] == [next(x for x in pairs_b if x["id"] == "report_cm_unrelated")["rejected_image"]]
    assert rejected["helps_oa1"] == [items[1]["image"]]


def test_truncated_or_empty_rejected_answers_make_no_pair():
    items, answers = scripted_items()
    answers["helps"]["plain"] = ""  # wrong without retrieval (D_oa1), but an empty rejected answer
    inner = scripted_model(items, answers, [])

    def capped(jobs):  # the D_oa2 rejected answer (RAG prompt, real image) of "hurts" hit the token cap
        out = inner(jobs)
        for j in jobs:
            j["truncated"] = j["image"] == items[2]["image"] and "reference report" in j["prompt"]
        return out
    pairs, sizes = mr.rag_pt_pairs(items, capped, "noise", report_threshold=50)
    assert {p["id"] for p in pairs} == {"copy_cm", "report_cm", "report_oa1"}
    assert sizes["skipped_empty"] == 1 and sizes["skipped_truncated"] == 1


def test_cross_modality_pairs_teach_reading_the_image_on_held_out_images():
    """RAG-PT's own part, on images it never trained on: DPO on D_cm pairs (chosen: the answer with the real image;
    rejected: the same answer with the release's noise image, the reports kept) makes the policy prefer the answer
    with the real image over the one from the reports alone (noise image) on held-out images, i.e. the
    copy-reference direction of the paper's analysis. Without the cross-modality part (the same pairs with the noise
    image taken away: the rejected input is the real image again) nothing moves: the held-out margin stays 0."""
    def cm_pairs(split, n_images):
        items = [dict(it, reports=[it["own_report"]]) for it in mr.read_items(TOY / split, ("vqa",))][:3 * n_images]
        # a model that answers every question right on any image (3 jobs per item: plain, RAG, noise + RAG)
        pairs, sizes = mr.rag_pt_pairs(items, lambda jobs: [it["answer"] for it in items for _ in range(3)])
        assert sizes["cm"] == len(items) and sizes["oa1"] == sizes["oa2"] == 0
        return [(f"{split} pair {n}", p) for n, p in enumerate(pairs)]

    def held_out_margin(train_recs, steps=4):
        torch.manual_seed(0)
        model, _ = lm.load("tiny", seed=0)
        args = mr.Args(lora_r=8, lora_alpha=16, lora_dropout=0.0, beta=0.5, lr=3e-3)
        model, ref = lm.policy_and_reference(model, args.full_finetune, args.lora_r, args.lora_alpha,
                                             args.lora_dropout, args.tune_projector)
        data = mr.PairData(train_recs, TOY, TOK, model.config, 512, False, allow_outside=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        for step in range(steps):
            idx = [(6 * step + i) % len(data) for i in range(6)]
            stats = mr.dpo_step(args, model.train(), ref, data, idx, TOK, "cpu")
            (stats["loss"] / stats["n"]).backward()
            opt.step()
            opt.zero_grad()
        held = mr.PairData(cm_pairs("val.json", 4), TOY, TOK, model.config, 512, False, allow_outside=True)
        with torch.no_grad():
            stats = mr.dpo_step(args, model.eval(), ref, held, list(range(len(held))), TOK, "cpu")
        return float(stats["margin"] / stats["n"]), float(stats["accuracy"] / stats["n"])

    train = cm_pairs("ragpt.json", 8)
    assert all(p["rejected_noised"] == 1 for _, p in train)
    margin, accuracy = held_out_margin(train)
    no_noise = [(w, {k: v for k, v in p.items() if k != "rejected_noised"}) for w, p in train]
    margin0, accuracy0 = held_out_margin(no_noise)
    print(f"held-out D_cm margin {margin:.3f}, reward accuracy {accuracy:.2f}; without the noise image {margin0}")
    assert margin > 0.5 and accuracy > 0.9, (margin, accuracy)
    assert abs(margin0) < 1e-4 and accuracy0 == 0, (margin0, accuracy0)


def test_noise_image_is_the_released_one(tmp_path):
    """Release (train_dpo_2stages.py): generate_gaussian_noise = N(0,1) of the image's shape clipped to [0,1], uint8,
    then expand2square and CLIPImageProcessor. Ours: dpo.py's PairData.pixel for the "noise:<image>" key, which
    generation reaches through mmed_rag.pixel_loader: one fixed draw per source image, the same pixels in both."""
    import hashlib

    src = tmp_path / "wide.png"
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(src)  # non-square: the padding matters
    Image.fromarray(np.full((40, 40, 3), 50, np.uint8)).save(tmp_path / "other.png")
    key = "noise:wide.png"
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))  # the draw PairData seeds
    noise = (np.clip(rng.normal(0, 1, (30, 50, 3)), 0, 1) * 255).astype(np.uint8)
    assert abs((noise == 0).mean() - 0.5) < 0.05 and abs((noise == 255).mean() - 0.159) < 0.03  # half black
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    padded = lm.expand2square(Image.fromarray(noise), tuple(int(x * 255) for x in lm.CLIP_MEAN))
    release = torch.as_tensor(np.asarray(proc(images=padded, return_tensors="np")["pixel_values"][0]))
    pixel = mr.pixel_loader(TINY_CFG, tmp_path)
    ours = pixel(key)
    torch.testing.assert_close(ours, release, atol=1e-5, rtol=0)
    rec = {"id": "p", "image": "wide.png", "rejected_noised": 1,
           "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "yes"}],
           "rejected_conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "no"}]}
    data = mr.PairData([("pairs p", rec)], tmp_path, TOK, TINY_CFG, 512, False)
    assert data.items[0]["rejected_images"] == [key] and torch.equal(data.pixel(key), ours)  # DPO sees those pixels
    assert torch.equal(pixel(key), ours) and not torch.equal(pixel("noise:other.png")[:, :8, :8], ours[:, :8, :8])
    assert torch.equal(pixel("wide.png"), lm.image_tensor(TINY_CFG, src))  # a plain key is the image
    # the test items name their image by its absolute path: the draw is seeded by the path inside the image folder,
    # so the same file in a checkout elsewhere (and by a relative key) gets the same noise
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "wide.png").write_bytes(src.read_bytes())
    assert torch.equal(pixel("noise:" + str(src)), ours)
    assert torch.equal(mr.pixel_loader(TINY_CFG, moved)("noise:" + str(moved / "wide.png")), ours)


def test_auroc_and_vqa_metrics():
    assert mr.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert mr.auroc([1, 1, 1], [True, False, True]) == 0.5 and mr.auroc([1, 2], [True, True]) is None
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.4  # many ties
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert mr.auroc(s.tolist(), y.tolist()) == pytest.approx(brute)
    items = [{"answer": a} for a in ("yes", "yes", "no", "no")]
    m = mr.vqa_metrics(items, ["Yes, there is.", "no", "maybe", "no."], [2.0, -1.0, 0.5, -3.0])
    assert m["acc"] == 50 and m["f1"] == pytest.approx(100 * 2 / 3) and m["auroc"] == 75
    assert mr.is_correct({"task": "report", "answer": "a b c d"}, "a b c d", 90)
    assert not mr.is_correct({"task": "vqa", "answer": "no"}, "normal", 0)  # 'normal' is not 'no'


def test_rates_paper_copy_reference_and_over_reliance():
    items = [{"task": "vqa", "answer": a} for a in ("yes", "yes", "no", "no")]
    plain = ["yes", "no", "no", "yes"]  # right: 0, 2
    rag = ["yes", "Yes.", "yes", "no"]  # right: 0, 1, 3
    # on the noise image, item 0 repeats what its retrieved report says ("Yes, a nodule in the right upper lung, as
    # the reference report describes"): right without the image, a copy; item 3 too; 1 and 2 are wrong
    noise = ["Yes, a nodule in the right upper lung, as the reference report describes.", "no", "yes", "No."]
    r = mr.rates(items, plain, rag, noise)
    assert r["copy_reference_rate"] == 50  # the paper's: 2 of all 4 questions right on noise
    assert r["copy_reference_rate_of_correct"] == pytest.approx(200 / 3)  # 2 of the 3 right with the real image
    assert r["over_reliance_rate"] == 50  # of 0 and 2 (right without retrieval), 2 is wrong with it
    none = mr.rates(items[:1], ["no"], ["no"], ["no"])
    assert none == {"copy_reference_rate": 0, "copy_reference_rate_of_correct": None, "over_reliance_rate": None}


def test_gamma_is_tuned_by_validation_accuracy():
    # A: a sharp drop after the first candidate; B: after the second. A is answered right only with 1 report, B only
    # with 2: accuracy is 100 % only at a gamma that cuts both at their drop (the retrieval F1 plays no part)
    items = [{"id": "A", "task": "vqa", "answer": "yes", "scores": [0.9, 0.5, 0.49]},
             {"id": "B", "task": "vqa", "answer": "no", "scores": [0.9, 0.89, 0.5]}]
    for it in items:
        it.update(image=f"{it['id']}.png", domain="radiology", question="Q?", reports=[f"r{i}" for i in range(3)])
    calls, right = [], {("A.png", 1): "yes", ("B.png", 2): "no"}  # the only (image, k) answered right

    def answer(jobs):
        calls.extend(jobs)
        ks = [int(j["prompt"].split(" reference report(s)")[0].split()[-1]) for j in jobs]
        return [right.get((j["image"], k), "maybe") for j, k in zip(jobs, ks)]
    gamma, table = mr.tune_gamma([0.001, 0.1, 1.0], items, answer)
    assert len(calls) == 6  # once per item and prefix length, not per gamma
    assert gamma == 0.1 and [row["score"] for row in table] == [50, 100, 0] and "f1" not in table[0]
    assert [row["mean_k"] for row in table] == [1, 1.5, 3]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    """A retrieve.py output built in seconds: 12 toy pairs per domain, 1 epoch (the router still separates the
    toy domains, which differ in colour)."""
    tmp = tmp_path_factory.mktemp("retriever")
    train = json.loads((ROOT / "data" / "toy" / "train.json").read_text())
    sub = [dict(r, image=str(ROOT / "data" / "toy" / r["image"])) for d in ("radiology", "pathology", "ophthalmology")
           for r in [x for x in train if x["domain"] == d][:12]]
    (tmp / "pairs.json").write_text(json.dumps(sub))
    proc = subprocess.run([sys.executable, str(ROOT / "retrieve.py"), "--data", str(tmp / "pairs.json"), "--out",
                           str(tmp / "r"), "--epochs", "1", "--batch-size", "8", "--val-fraction", "0"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "r", sub


def test_routing_by_default_oracle_by_flag(retriever):
    import retrieve
    folder, sub = retriever
    rag = retrieve.DomainRAG.load(folder)
    img = sub[0]["image"]  # a radiology image whose record claims pathology
    item = lambda: [{"id": "x", "path": img, "domain": "pathology", "task": "vqa"}]  # noqa: E731
    routed = item()
    assert rag.attach(routed, 3, "fixed", 0.1, 1.5) == 1  # one image sent elsewhere than its record says
    assert routed[0]["domain"] == "radiology" and set(routed[0]["reports"]) <= set(rag.indexes["radiology"].reports)
    oracle = item()
    assert rag.attach(oracle, 3, "fixed", 0.1, 1.5, oracle=True) == 0
    assert oracle[0]["domain"] == "pathology" and set(oracle[0]["reports"]) <= set(rag.indexes["pathology"].reports)
    assert len(oracle[0]["scores"]) == 3
    wide = item()
    rag.attach(wide, 3, "paper", 0.1, 1.5, fixed_k=5, oracle=True)  # --pt-k above --k-max: that many, not k_max
    assert len(wide[0]["reports"]) == 5
    with pytest.raises(lm.DataError, match="oracle-domain"):
        rag.attach([{"id": "y", "path": img, "domain": None}], 3, "fixed", 0.1, 1.5, oracle=True)


def test_knowledge_base_images_are_refused(retriever, capsys):
    import retrieve
    folder, sub = retriever
    rag = retrieve.DomainRAG.load(folder)
    kb = rag.kb_images()
    assert kb == {str(lm.resolve_image(ROOT, r["image"], "", True)) for r in sub}
    items = [{"id": "a", "path": sorted(kb)[0]}, {"id": "b", "path": str(ROOT / "data" / "toy" / "images" / "test_x.png")}]
    with pytest.raises(lm.DataError, match="in the retriever's knowledge base"):
        rag.drop_kb_images(items, "test", skip=False)
    assert rag.drop_kb_images(items, "test", skip=True) == items[1:]
    assert "test: 1 items skipped" in capsys.readouterr().err


def test_one_image_mode(retriever, capsys):
    import retrieve
    folder, sub = retriever
    img = str(ROOT / "data" / "toy" / "images" / "test_radiology_0000.png")
    got = mr.main(["--image", img, "--question", "Is there a nodule?", "--retriever", str(folder),
                   "--vqa-max-new-tokens", "4", "--k-max", "2"])
    printed = capsys.readouterr().out
    assert got["domain"] == "radiology" and 1 <= len(got["reports"]) <= 2
    assert set(got["reports"]) <= set(retrieve.DomainRAG.load(folder).indexes["radiology"].reports)
    assert got["prompt"] == mr.rag_prompt("vqa", "radiology", got["reports"], "Is there a nodule?")
    assert got["prompt"] in printed and all(r in printed for r in got["reports"]) and printed.rstrip().endswith(got["answer"])
    report = mr.main(["--image", img, "--retriever", str(folder), "--report-max-new-tokens", "4"])
    assert report["prompt"].startswith("You are a professional radiologist.")


LAUNCH = r"""
import sys
sys.path.insert(0, sys.argv.pop(1))
import mmed_rag as mr
from data.toy_readers import toy_splits
real = mr.answer_jobs


def answer_jobs(args, model, tokenizer, jobs, pixel, rank, world, desc):
    # the RAG-PT answers are generated (sharded, on every rank), then replaced by a script: the tiny model after a
    # few warm-start steps answers nothing, and an empty rejected answer makes no pair. Per item (plain, RAG, noise):
    # no / yes / yes, so every yes-question gives a D_cm and a D_oa1 pair and every no-question a D_oa2 pair.
    got = real(args, model, tokenizer, jobs, pixel, rank, world, desc)
    if desc != "RAG-PT":
        return got
    for j in jobs:
        j["truncated"] = False
    return ["yes" if k % 3 else "no" for k in range(len(jobs))]


mr.answer_jobs = answer_jobs
mr.cli(mr.main)
"""


def test_complete_pipeline_on_two_ranks_and_eval_only_on_its_export(tmp_path):
    """Every stage of the default run, small, under torchrun with 2 ranks (gloo) from an empty --out: router +
    retrievers (the copied loop, gathered InfoNCE), warm starts (dpo.py's, then two phases), gamma swept by
    validation accuracy, routing, RAG-PT pairs built from sharded generation (answers scripted, see LAUNCH), two DPO stages, evaluation
    before and after, adapter and llava-hf export. Then --eval-only on that export, on one rank, reading no training
    data (--data, --pt-data and --rag-pt-data name missing files), gives the run's after-RAG-PT numbers."""
    (tmp_path / "launch.py").write_text(LAUNCH)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "launch.py"), str(ROOT), "--out", str(out), "--retriever-epochs", "1", "--tasks", "vqa",
           "--sft-base-steps", "2", "--sft-warmup-steps", "2", "--sft-rag-steps", "2", "--eval-limit", "4",
           "--micro-batch-size", "2", "--batch-size", "4", "--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8",
           "--vqa-max-new-tokens", "4", "--pt-fraction", "0.05", "--val-fraction", "0.05", "--export-merged",
           "--eval-batch-size", "4"]
    faults.run(cmd)
    res = json.loads((out / "results.json").read_text())
    phases = [json.loads(line)["phase"] for line in open(out / "metrics.jsonl")]
    assert phases == (["router"] * 300 + [p for d in ("radiology", "pathology", "ophthalmology")
                                          for p in [f"retriever_{d}"] * 5 + ["recall"]] + ["sft_warmup"] * 2 + ["warm_plain"] * 2
                      + ["warm_rag"] * 2 + ["eval_before", "rag_pt"] + ["stage1"] * 2 + ["stage2"] * 2 + ["eval_after"])
    pt = [it for it in mr.read_items(TOY / "ragpt.json", ("vqa",)) if it["id"].rsplit("_", 1)[0] in toy_splits(TOY, 0.05, 0.05)["pt"]]
    yes = sum(it["answer"] == "yes" for it in pt)
    sizes = res["rag_pt_sizes"]["total"]
    assert sizes["candidates"] == len(pt) == 9 and (sizes["cm"], sizes["oa1"], sizes["oa2"]) == (yes, yes, len(pt) - yes)
    written = json.loads((out / "rag_pt.json").read_text())
    assert len(written) == 2 * yes + len(pt) - yes and all(p.get("rejected_noised") == 1 for p in written if p["subset"] == "cm")
    assert res["dpo"]["stage1"] == {"pairs": yes, "skipped_records": {}, "steps": 2, "nonfinite_skipped": 0}
    assert res["dpo"]["stage2"]["pairs"] == len(pt) and res["dpo"]["stage2"]["steps"] == 2
    r = res["retrieval"]
    assert r["routing"] == "router" and set(r["misrouted"]) == {"warm", "val", "pt", "test"}
    assert r["gamma"] in [row["gamma"] for row in r["gamma_sweep"]] and "score" in r["gamma_sweep"][0]
    assert res["before"]["rag"]["vqa"]["n"] == res["after"]["rag"]["vqa"]["n"] == 4 and "| + RAG-PT (with RAG) |" in res["table"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "llava_hf" / "config.json").exists()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(out / "warm_start" / "model")
    row = json.loads((out / "retrieved_test.jsonl").read_text().splitlines()[0])
    assert row["retrieve_k"] == len(row["reference_reports"]) >= 1
    missing = str(tmp_path / "missing.json")
    ev = faults._in_process(mr, ["--eval-only", "--model", str(out / "llava_hf"), "--retriever", str(out / "retriever"),
                                 "--gamma", str(r["gamma"]), "--data", missing, "--pt-data", missing, "--rag-pt-data",
                                 missing, "--test-data", str(TOY / "test.json"), "--tasks", "vqa", "--eval-limit", "4",
                                 "--vqa-max-new-tokens", "4", "--eval-batch-size", "4", "--out", str(tmp_path / "eval")])
    assert set(ev) == {"retrieval", "eval", "table", "seconds"} and "RAG-PT" not in ev["table"]
    for key in ("plain", "rag", "copy_reference_rate", "over_reliance_rate"):
        assert ev["eval"][key] == res["after"][key], key
    preds = [json.loads((d / "predictions.json").read_text()) for d in (out, tmp_path / "eval")]
    assert preds[1]["eval"] == preds[0]["after"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["args.json", "metrics.jsonl", "predictions.json",
                                                                     "results.json", "retrieved_test.jsonl"]


@pytest.fixture
def one_rank(monkeypatch):
    """A one-process gloo group (what `python mmed_rag.py` makes), for the helpers that synchronise ranks."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    mr.setup_distributed()
    yield
    torch.distributed.destroy_process_group()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


def test_caches_are_keyed_on_the_args_that_change_them(tmp_path, one_rank):
    """The RAG-PT pairs are rebuilt when --template changes (and when the retriever's files do), reused when only a
    training argument does or the retriever folder moved; each cache's key covers the Args above its field; a keyed
    folder (retriever, warm start) made from other inputs is moved aside instead of reused."""
    items, answers = scripted_items()
    calls, log = [], lambda row: None
    gen = lambda jobs, desc: scripted_model(items, answers, calls)(jobs)  # noqa: E731
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "rag_config.json").write_text("{}")
    args = mr.Args(out=str(tmp_path), retriever=str(tmp_path / "r"))
    pairs, key, sizes = mr.rag_pt_set(args, {"pt": items}, gen, 0.01, 0, log)
    assert len(calls) == 15 and sizes["total"]["cm"] == 2 and json.loads((tmp_path / "rag_pt.json").read_text()) == pairs
    assert mr.rag_pt_set(dataclasses.replace(args, lr=1.0, epochs=9), {"pt": items}, gen, 0.01, 0, log)[:2] == \
        (pairs, key) and len(calls) == 15  # reused: nothing generated
    shutil.copytree(tmp_path / "r", tmp_path / "moved")  # copy2 keeps the file times, as cp -a / rsync -a do
    assert mr.rag_pt_set(dataclasses.replace(args, retriever=str(tmp_path / "moved")), {"pt": items}, gen, 0.01, 0,
                         log)[1] == key and len(calls) == 15  # the same retriever elsewhere: reused
    template = dataclasses.replace(args, template="vicuna_v1")
    _, key2, _ = mr.rag_pt_set(template, {"pt": items}, gen, 0.01, 0, log)
    assert len(calls) == 30 and key2 != key  # rebuilt
    (tmp_path / "r" / "rag_config.json").write_text('{"retrained": 1}')
    _, key3, _ = mr.rag_pt_set(args, {"pt": items}, gen, 0.01, 0, log)
    assert len(calls) == 45 and key3 not in (key, key2)
    assert sorted(p.name for p in tmp_path.glob("rag_pt_*.json")) == sorted(f"rag_pt_{k}.json" for k in (key, key2, key3))
    k = lambda a, field: mr.cache_key(a, field)  # noqa: E731
    assert k(template, "model") == k(args, "model")  # the retriever does not depend on the chat template
    assert all(k(template, f) != k(args, f) for f in ("gamma_tune", "pt_data", "stages"))  # warm start, gamma, pairs
    for field, value in (("warmup_ratio", 0.2), ("weight_decay", 0.1), ("grad_clip", 0.5)):  # the warm starts train
        assert all(k(dataclasses.replace(args, **{field: value}), f) != k(args, f) for f in ("gamma_tune", "pt_data", "stages"))
    assert k(dataclasses.replace(args, retriever_epochs=3), "model") != k(args, "model")
    assert k(dataclasses.replace(args, cm_image="both"), "pt_data") == k(args, "pt_data")  # gamma: not the pair options
    assert k(dataclasses.replace(args, cm_image="both"), "stages") != k(args, "stages")
    assert all(k(dataclasses.replace(args, lr=1.0, out="x"), f) == k(args, f) for f in ("model", "gamma_tune", "stages"))
    stage = mr.keyed_folder(tmp_path / "stage1", key, 0)
    (stage / "checkpoints").mkdir()
    assert (mr.keyed_folder(tmp_path / "stage1", key, 0) / "checkpoints").exists()  # same pairs: resumed
    assert not (mr.keyed_folder(tmp_path / "stage1", key2, 0) / "checkpoints").exists()  # other pairs: a fresh stage
    assert (tmp_path / f"stage1.{key}" / "checkpoints").exists() and (stage / "cache_key").read_text() == key2


# ---------------------------------------------------------------- the fault suite (tests/faults.py) on stage 1


@pytest.fixture(scope="module")
def pt_json(tmp_path_factory):
    """Released-format pairs of toy images: 4 D_cm (noised), 4 D_oa1, 4 D_oa2."""
    items, answers = scripted_items()
    pairs, _ = mr.rag_pt_pairs(items[:3], scripted_model(items, answers, []), "noise", 50)
    path = tmp_path_factory.mktemp("pt") / "pt.json"
    path.write_text(json.dumps([dict(p, id=f"{p['id']}_{n}") for n in range(4) for p in pairs]))
    return path


def fast(retriever, pt_json, epochs):
    """Stage 1 = 1 step per epoch (4 pairs, batch 4), stage 2 = 2; no warm start, one test item per task."""
    return ["--retriever", str(retriever[0]), "--rag-pt-data", str(pt_json), "--sft-base-steps", "0",
            "--sft-warmup-steps", "0", "--sft-rag-steps", "0", "--gamma", "0.01", "--eval-limit", "1",
            "--vqa-max-new-tokens", "2", "--report-max-new-tokens", "2", "--lora-r", "4", "--lora-alpha", "8", "--micro-batch-size", "2",
            "--batch-size", "4", "--eval-batch-size", "4", "--epochs", str(epochs)]


def test_kill_and_resume_gives_the_same_weights(retriever, pt_json, tmp_path):
    faults.check_kill_and_resume("mmed_rag.py", fast(retriever, pt_json, 3) + ["--save-every", "1"], "stage1", tmp_path)
    res = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert res["dpo"]["stage1"]["steps"] == 3 and res["dpo"]["stage2"]["steps"] == 6  # then stage 2 trained too


def test_another_seed_or_dpo_value_trains_the_stages_afresh(retriever, pt_json, tmp_path):
    """--seed no longer changes the starting system (--warm-start-seed fixes it), so a stage's checkpoints are bound
    to --seed and the DPO values as well as to the pairs: in the same --out, the same command resumes the finished
    stages (nothing trains), another --seed (or DPO value) trains them again instead of reporting the first run's
    model."""
    out = tmp_path / "run"
    stage_rows = lambda: sum('"phase": "stage1"' in line for line in open(out / "metrics.jsonl"))  # noqa: E731
    adapter = lambda: (out / "adapter" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    faults._in_process(mr, fast(retriever, pt_json, 1) + ["--out", str(out)])
    trained, first = stage_rows(), adapter()
    faults._in_process(mr, fast(retriever, pt_json, 1) + ["--out", str(out)])
    assert stage_rows() == trained > 0 and adapter() == first  # resumed
    faults._in_process(mr, fast(retriever, pt_json, 1) + ["--out", str(out), "--seed", "1"])
    assert stage_rows() == 2 * trained and adapter() != first  # trained afresh: another LoRA init
    assert len(list(tmp_path.glob("run/stage1/checkpoints.*"))) == 1  # the first run's, moved aside, not resumed


def test_nonfinite_step_stops_or_is_skipped(retriever, pt_json, monkeypatch, tmp_path):
    faults.check_nonfinite(mr, fast(retriever, pt_json, 3), "stage1", tmp_path, monkeypatch, call=2)


# "stalled" (SIGSTOP, caught by --dist-timeout-s in the copied setup_distributed) runs once, in test_reliability.py
@pytest.mark.parametrize("fault", ["killed"])
def test_a_dead_or_stalled_rank_makes_the_other_exit(retriever, pt_json, tmp_path, fault):
    faults.check_dead_rank("mmed_rag.py", fast(retriever, pt_json, 300), "stage1", tmp_path, fault)


def test_bad_data_and_bad_model_exit_2_with_one_line(retriever, pt_json, tmp_path):
    pairs = json.loads(pt_json.read_text())
    pairs[5]["image"] = "images/missing.png"
    (tmp_path / "bad.json").write_text(json.dumps(pairs))
    faults.check_bad_inputs("mmed_rag.py", fast(retriever, pt_json, 1), ["--rag-pt-data", str(tmp_path / "bad.json")],
                            tmp_path)


def test_the_user_s_own_splits_are_read_whole_with_images_next_to_each_file(tmp_path, monkeypatch):
    """The README's real-data command (--pt-data / --val-data / --test-data, no --data: the toy folder is the default)
    reads those files whole, each image next to its own file; before, the toy's id filter emptied --pt-data and the
    images were looked for in the toy folder."""
    monkeypatch.chdir(ROOT)  # where --data's default, data/toy, exists
    rows = [r for r in json.loads((TOY / "test_vqa.json").read_text())][:4]
    for split in ("pt", "val", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        for r in rows:
            shutil.copy(TOY / r["image"], tmp_path / split / r["image"])
        (tmp_path / split / f"{split}.json").write_text(json.dumps(rows))
    args = mr.Args(retriever="r", pt_data=str(tmp_path / "pt" / "pt.json"), val_data=str(tmp_path / "val" / "val.json"),
                   test_data=str(tmp_path / "test" / "test.json"))
    s = mr.read_splits(args, ("vqa",))
    assert s["warm"] == [] and all(len(s[k]) == len([r for r in rows if mr.lm.normalize_answer(
        r["conversations"][1]["value"]) in ("yes", "no")]) > 0 for k in ("pt", "val", "test"))
    for k in ("pt", "val", "test"):
        assert all(it["path"].startswith(str(tmp_path / k / "images")) for it in s[k]), k
    assert s["folder"] == tmp_path / "pt"
    toy = mr.read_splits(mr.Args(), ("vqa",))  # the default: the toy's splits, images in the toy folder
    assert toy["warm"] and toy["pt"] and all(it["path"].startswith(str(ROOT / "data" / "toy")) for it in toy["test"])


def test_read_items_toy_and_llava_vqa_formats():
    toy = mr.read_items(ROOT / "data" / "toy" / "test.json")
    assert sum(it["task"] == "report" for it in toy) == 96 and sum(it["task"] == "vqa" for it in toy) == 288
    assert {it["answer"] for it in toy if it["task"] == "vqa"} == {"yes", "no"}
    vqa = mr.read_items(ROOT / "data" / "toy" / "test_vqa.json")  # LLaVA format: open questions are skipped
    assert len(vqa) == 288 and vqa[0]["question"] == "Is there a nodule in this image?" and vqa[0]["domain"] == "radiology"
    assert mr.read_items(ROOT / "data" / "toy" / "test.json", tasks=("report",))[0]["answer"].startswith("Chest")
