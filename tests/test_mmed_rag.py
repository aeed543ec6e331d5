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


# ---------------------------------------------------------------- prompts, RAG-PT subsets, VQA metrics, end to end

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import dpo  # noqa: E402  (only to check that dpo.py reads the pairs we write)
import llava_med as lm  # noqa: E402
from conftest import ROOT  # noqa: E402


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
        img = f"images/train_{domain}_{n:04d}.png"
        items.append({"id": key, "task": task, "image": img, "domain": domain, "answer": gold, "reports": [f"ref {key}"],
                      "question": f"Question {key}?" if task == "vqa" else ""})
        answers[key] = {"plain": plain, "rag": rag, "noise": noise, "unrelated": unrel}
    return items, answers


def scripted_model(items, answers, calls):
    by_image = {it["image"]: it for it in items}

    def generate(jobs):
        out = []
        for j in jobs:
            calls.append(j)
            if j["image"].startswith("noise:"):
                it, kind = by_image[j["image"][len("noise:"):]], "noise"
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
    got = {(p["id"], p["subset"]) for p in pairs}
    # the report item is in two subsets: it copies the reports onto noise, and only RAG makes it right
    assert got == {("copy_cm", "cm"), ("helps_oa1", "oa1"), ("hurts_oa2", "oa2"), ("report_cm", "cm"),
                   ("report_oa1", "oa1")}
    assert {k: sizes[k] for k in ("cm", "oa1", "oa2")} == {"cm": 2, "oa1": 2, "oa2": 1}
    p = {x["id"]: x for x in pairs}
    rag = mr.rag_prompt("vqa", "radiology", ["ref copy"], "Question copy?")
    assert p["copy_cm"]["conversations"] == [{"from": "human", "value": "<image>\n" + rag}, {"from": "gpt", "value": "yes"}]
    assert p["copy_cm"]["rejected_conversations"][0] == p["copy_cm"]["conversations"][0]  # same RAG prompt
    assert p["copy_cm"]["rejected_conversations"][1]["value"] == "yes" and p["copy_cm"]["rejected_noised"] == 1
    assert p["helps_oa1"]["rejected_conversations"][1]["value"] == "yes"  # the no-retrieval answer
    assert p["hurts_oa2"]["rejected_conversations"][1]["value"] == "no"  # the answer retrieval misled
    assert p["hurts_oa2"]["conversations"][1]["value"] == "yes" and "rejected_noised" not in p["hurts_oa2"]
    # the unrelated-image variant, and both: the "copy" item survives only the noise image
    pairs_u, sizes_u = mr.rag_pt_pairs(items, scripted_model(items, answers, []), "unrelated", report_threshold=50)
    assert {x["id"] for x in pairs_u if x["subset"] == "cm"} == {"report_cm"}
    ru = next(x for x in pairs_u if x["subset"] == "cm")["rejected_image"]
    assert ru != items[4]["image"] and "radiology" not in ru  # another domain's image
    pairs_b, sizes_b = mr.rag_pt_pairs(items, scripted_model(items, answers, []), "both", report_threshold=50)
    assert sizes_b["cm"] == 3 and {x["id"] for x in pairs_b if x["subset"] == "cm"} == \
        {"copy_cm_noise", "report_cm_noise", "report_cm_unrelated"}
    # the written pairs are what dpo.py's PairData trains on (released format, noise image included)
    tok = AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER)
    cfg = lm.tiny_config(tok)
    data = dpo.PairData([(f"pairs {x['id']}", json.loads(json.dumps(x))) for x in pairs_b], ROOT / "data" / "toy", tok,
                        cfg, 512, False)
    assert len(data) == len(pairs_b) and data.items[0]["rejected_images"][0].startswith("noise:")


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


def test_default_pipeline_end_to_end_small(tmp_path):
    """The whole default run, small, on 2 ranks (gloo): retrievers with gathered InfoNCE, warm start, retrieval,
    two-stage DPO on released-format pairs (given by --rag-pt-data so both stages train whatever the tiny model
    answers), sharded generation, evaluation table, adapter export."""
    items, answers = scripted_items()  # real toy images, so PairData can open them
    pairs, _ = mr.rag_pt_pairs(items[:3], scripted_model(items, answers, []), "noise", 50)
    pairs = [dict(p, id=f"{p['id']}_{n}") for n in range(4) for p in pairs]  # 4 cm, 4 oa1, 4 oa2
    (tmp_path / "pt.json").write_text(json.dumps(pairs))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29671",
           str(ROOT / "mmed_rag.py"), "--out", str(out), "--retriever-epochs", "2", "--epochs", "1",
           "--sft-warmup-steps", "2", "--sft-rag-steps", "2", "--eval-limit", "4", "--micro-batch-size", "2", "--batch-size", "4",
           "--lora-r", "4", "--lora-alpha", "8", "--rag-pt-data", str(tmp_path / "pt.json"),
           "--report-max-new-tokens", "4", "--pt-fraction", "0.05"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["rag_pt_sizes"]["total"]["cm"] == 4 and res["rag_pt_sizes"]["total"]["oa1"] == 4
    assert res["dpo"]["stage1"]["steps"] == 1 and res["dpo"]["stage2"]["steps"] == 2  # 4 cm pairs; 8 oa; batch 4
    assert "| + RAG-PT (with RAG) |" in res["table"]
    for key in ("before", "after"):
        assert res[key]["rag"]["vqa"]["n"] == 4 and "auroc" in res[key]["rag"]["vqa"]
        assert res[key]["rag"]["report"]["n"] == 4
        assert 0 <= res[key]["copy_reference_rate"] <= 100
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    row = json.loads((out / "retrieved_test.jsonl").read_text().splitlines()[0])
    assert row["retrieve_k"] == len(row["reference_reports"]) >= 1
    assert (out / "stage2" / "checkpoints").exists() and (out / "retriever" / "rag_config.json").exists()


def test_read_items_toy_and_llava_vqa_formats():
    toy = mr.read_items(ROOT / "data" / "toy" / "test.json")
    assert sum(it["task"] == "report" for it in toy) == 90 and sum(it["task"] == "vqa" for it in toy) == 270
    assert {it["answer"] for it in toy if it["task"] == "vqa"} == {"yes", "no"}
    vqa = mr.read_items(ROOT / "data" / "toy" / "test_vqa.json")  # LLaVA format: open questions are skipped
    assert len(vqa) == 270 and vqa[0]["question"] == "Is there a nodule in this image?" and vqa[0]["domain"] == "radiology"
    assert mr.read_items(ROOT / "data" / "toy" / "test.json", tasks=("report",))[0]["answer"].startswith("Chest")
