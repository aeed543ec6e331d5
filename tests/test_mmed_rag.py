"""MMed-RAG: report metrics against the test-only references (sacrebleu, rouge-score), NLTK's METEOR (fixture) and
hand-computed cases; prompts, noise images, RAG-PT subsets, rates, gamma by accuracy, routing, knowledge-base
disjointness, the one-image mode and the default pipeline end to end."""

import json
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


def test_rouge_l_beta_12_is_pycocoevalcap_weighting():
    # hyp "a b c d", ref "a b e": LCS 2, P = 1/2, R = 2/3; F_beta = (1 + b^2) P R / (R + b^2 P)
    p, r = 0.5, 2 / 3
    assert mr.rouge_l("a b c d", "a b e", beta=1.2) == pytest.approx(100 * 2.44 * p * r / (r + 1.44 * p))
    assert mr.rouge_l("a b c d", "a b e") == pytest.approx(100 * 2 * p * r / (p + r))
    out = mr.report_scores(["a b c d"], ["a b e"], rouge_beta=1.2)
    assert out["rouge_l"] == pytest.approx(100 * 2.44 * p * r / (r + 1.44 * p))


def test_meteor_exact_hand_computed():
    # Identical 6 words: P = R = 1, one chunk of 6 matches -> 100 * (1 - 0.5 * (1/6)^3).
    s = "no pleural effusion or pneumothorax seen"
    assert mr.meteor_exact(s, s) == pytest.approx(100 * (1 - 0.5 / 216))
    # hyp "effusion no pleural" vs ref "no pleural effusion": 3 matches in 2 chunks ("effusion" | "no pleural").
    assert mr.meteor_exact("effusion no pleural", "no pleural effusion") == pytest.approx(100 * (1 - 0.5 * (2 / 3) ** 3))
    # hyp 4 words, 2 match as one chunk; ref 3 words: P = 1/2, R = 2/3, Fmean = PR/(0.9P + 0.1R).
    p, r = 0.5, 2 / 3
    expect = 100 * p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (1 / 2) ** 3)
    assert mr.meteor_exact("small left nodule noted", "small left effusion") == pytest.approx(expect)
    # A repeated word is matched once per reference occurrence.
    assert mr.meteor_exact("no no no", "no") == pytest.approx(100 * (1 / 3) / (0.9 / 3 + 0.1) * (1 - 0.5))
    assert mr.meteor_exact("", "x") == 0.0 and mr.meteor_exact("a", "b") == 0.0


def test_meteor_exact_against_nltk():
    """NLTK's single_meteor_score with stemming and WordNet off (run once, tests/fixtures/meteor_nltk.json). Where
    a reference word repeats, NLTK aligns to its last free occurrence and we to the one extending the chunk: fewer
    chunks, a higher score. The stem stage is what exact matching leaves out (48.1 vs 75.5 on 'nodules')."""
    cases = json.loads((ROOT / "tests" / "fixtures" / "meteor_nltk.json").read_text())["cases"]
    differ = 0
    for c in cases:
        ours, ref = mr.meteor_exact(c["hypothesis"], c["reference"]), c["nltk_exact"]
        toks = mr.report_tokens(c["reference"])
        repeats = any(toks.count(w) > 1 and w in mr.report_tokens(c["hypothesis"]) for w in toks)
        if ours != pytest.approx(ref, abs=1e-4):
            assert repeats and ours > ref, c
            differ += 1
    assert differ == 2
    # one of the two by hand: 8 matches of 10 hyp / 13 ref words in 3 chunks (NLTK: 'is' -> the second 'is', 5)
    c = cases[2]
    p, r = 8 / 10, 8 / 13
    assert mr.meteor_exact(c["hypothesis"], c["reference"]) == pytest.approx(100 * p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (3 / 8) ** 3))
    first = cases[0]
    assert round(mr.meteor_exact(first["hypothesis"], first["reference"]), 1) == 48.1
    assert round(first["nltk_exact_stem"], 1) == 75.5


def test_bleu_hand_computed_two_sentences():
    """hyp 1 "the cat sat on the mat" / ref "the cat is on the mat"; hyp 2 "a dog ran" / ref "a dog ran away".
    Clipped matches over the corpus: 1-grams 5 + 3 of 6 + 3, 2-grams 3 + 2 of 5 + 2, 3-grams 1 + 1 of 4 + 1,
    4-grams 0 of 3 (no smoothing: BLEU-4 = 0); lengths c = 9 < r = 10: brevity penalty exp(1 - 10/9)."""
    bp = math.exp(1 - 10 / 9)
    p1, p2, p3 = 8 / 9, 5 / 7, 2 / 5
    expect = [100 * bp * p1, 100 * bp * (p1 * p2) ** 0.5, 100 * bp * (p1 * p2 * p3) ** (1 / 3), 0.0]
    hyps, refs = ["The cat sat on the mat.", "A dog ran"], ["the cat is on the mat", "a dog ran away"]
    assert mr.corpus_bleu(hyps, refs) == pytest.approx(expect)
    out = mr.report_scores(hyps, refs)
    assert [out[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(expect)
    assert out["bleu"] == pytest.approx(sum(expect) / 4) and out["n"] == 2
    assert out["meteor_exact"] == pytest.approx((mr.meteor_exact(hyps[0], refs[0]) + mr.meteor_exact(hyps[1], refs[1])) / 2)


# ---------------------------------------------------------------- prompts, RAG-PT subsets, VQA metrics, end to end

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
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


TOK = AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER)
TINY_CFG = lm.tiny_config(TOK)


def scripted_items(noise_folder):
    """Five items whose answers are scripted per condition: (plain, with RAG, noise image + RAG, unrelated + RAG);
    their noise images are real files (noise_png) in noise_folder."""
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
                      "question": f"Question {key}?" if task == "vqa" else "",
                      "noise": mr.noise_png(noise_folder, ROOT / "data" / "toy" / img, TINY_CFG, 0)})
        answers[key] = {"plain": plain, "rag": rag, "noise": noise, "unrelated": unrel}
    return items, answers


def scripted_model(items, answers, calls):
    by_image, by_noise = {it["image"]: it for it in items}, {it["noise"]: it for it in items}

    def generate(jobs):
        out = []
        for j in jobs:
            calls.append(j)
            if j["image"] in by_noise:
                it, kind = by_noise[j["image"]], "noise"
            else:
                it = next(x for x in items if f"ref {x['id']}" in j["prompt"]) if "reference report" in j["prompt"] \
                    else by_image[j["image"]]
                kind = "plain" if "reference report" not in j["prompt"] else \
                    ("rag" if j["image"] == it["image"] else "unrelated")
            out.append(answers[it["id"]][kind])
        return out
    return generate


def test_rag_pt_subsets_from_a_scripted_model(tmp_path):
    items, answers = scripted_items(tmp_path)
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
    assert p["copy_cm"]["rejected_image"] == items[0]["noise"]  # the noise file, next to the released flag
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
    # the written pairs are what dpo.py's PairData trains on: the noise image is the file, not dpo.py's "noise:"
    tok = AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER)
    recs = [(f"pairs {x['id']}", mr.training_pair(json.loads(json.dumps(x)))) for x in pairs_b]
    data = dpo.PairData(recs, ROOT / "data" / "toy", tok, TINY_CFG, 512, False, allow_outside=True)
    assert len(data) == len(pairs_b) and data.items[0]["rejected_images"] == [items[0]["noise"]]
    assert torch.equal(data.pixel(items[0]["noise"]), lm.preprocess_image(lm.load_image(items[0]["noise"]), 64))


def test_truncated_or_empty_rejected_answers_make_no_pair(tmp_path):
    items, answers = scripted_items(tmp_path)
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


def test_noise_image_is_the_released_one(tmp_path, monkeypatch):
    """Release: generate_gaussian_noise (N(0,1) of the image's shape clipped to [0,1], uint8), then expand2square
    and CLIPImageProcessor. Ours: the same noise, pre-processed once into a PNG that preprocesses to the same pixels."""
    src = tmp_path / "wide.png"
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(src)  # non-square: the padding matters
    made = []
    real = mr.release_noise
    monkeypatch.setattr(mr, "release_noise", lambda *a: made.append(real(*a)) or made[-1])
    path = mr.noise_png(tmp_path / "noise", str(src), TINY_CFG, 0)
    full = np.asarray(made[0])
    assert made[0].size == (50, 30) and abs((full == 0).mean() - 0.5) < 0.05 and abs((full == 255).mean() - 0.159) < 0.03
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    padded = lm.expand2square(made[0], tuple(int(x * 255) for x in lm.CLIP_MEAN))
    release = torch.as_tensor(np.asarray(proc(images=padded, return_tensors="np")["pixel_values"][0]))
    ours = lm.preprocess_image(lm.load_image(path), 64)
    torch.testing.assert_close(ours, release, atol=1e-5, rtol=0)
    assert torch.equal(ours, lm.preprocess_image(made[0], 64))  # exactly what preprocessing the full noise gives
    assert mr.noise_png(tmp_path / "noise", str(src), TINY_CFG, 0) == path and len(made) == 1  # written once
    assert mr.noise_png(tmp_path / "noise", str(src), TINY_CFG, 1) != path  # another seed, another image


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


def test_default_pipeline_end_to_end_small(tmp_path):
    """The whole default run, small, on 2 ranks (gloo): retrievers with gathered InfoNCE, warm start, retrieval,
    two-stage DPO on released-format pairs (given by --rag-pt-data so both stages train whatever the tiny model
    answers), gamma swept by validation accuracy, routing, sharded generation, evaluation table, adapter export."""
    items, answers = scripted_items(tmp_path / "noise")  # real toy images, so PairData can open them
    pairs, _ = mr.rag_pt_pairs(items[:3], scripted_model(items, answers, []), "noise", 50)
    pairs = [dict(p, id=f"{p['id']}_{n}") for n in range(4) for p in pairs]  # 4 cm, 4 oa1, 4 oa2
    (tmp_path / "pt.json").write_text(json.dumps(pairs))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29671",
           str(ROOT / "mmed_rag.py"), "--out", str(out), "--retriever-epochs", "2", "--epochs", "1",
           "--sft-warmup-steps", "2", "--sft-rag-steps", "2", "--eval-limit", "4", "--micro-batch-size", "2", "--batch-size", "4",
           "--lora-r", "4", "--lora-alpha", "8", "--rag-pt-data", str(tmp_path / "pt.json"),
           "--report-max-new-tokens", "4", "--vqa-max-new-tokens", "4", "--pt-fraction", "0.05",
           "--val-fraction", "0.05"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["rag_pt_sizes"]["total"]["cm"] == 4 and res["rag_pt_sizes"]["total"]["oa1"] == 4
    assert res["dpo"]["stage1"]["steps"] == 1 and res["dpo"]["stage2"]["steps"] == 2  # 4 cm pairs; 8 oa; batch 4
    assert "| + RAG-PT (with RAG) |" in res["table"]
    preds = json.loads((out / "predictions.json").read_text())
    test = {it["id"]: it for it in mr.read_items(ROOT / "data" / "toy" / "test.json")}
    for key in ("before", "after"):
        assert res[key]["rag"]["vqa"]["n"] == 4 and "auroc" in res[key]["rag"]["vqa"]
        assert res[key]["rag"]["report"]["n"] == 4
        vqa = [p for p in preds[key] if "noise" in p]  # the rates are those of the written answers
        got = mr.rates([test[p["id"]] for p in vqa], [p["plain"] for p in vqa], [p["rag"] for p in vqa],
                       [p["noise"] for p in vqa])
        assert len(vqa) == 4 and all(res[key][k] == got[k] for k in got)
        cut = lambda text: len(TOK.encode(text, add_special_tokens=False)) >= 4  # noqa: E731  (the cap)
        assert sum(res[key]["truncated"].values()) == sum(cut(p[k]) for p in preds[key] for k in ("plain", "rag", "noise")
                                                          if k in p)
    r = res["retrieval"]
    assert r["routing"] == "router" and set(r["misrouted"]) == {"kb", "val", "pt", "test"}
    assert r["gamma"] in [row["gamma"] for row in r["gamma_sweep"]] and "score" in r["gamma_sweep"][0]
    pt_ids = mr.toy_splits(ROOT / "data" / "toy", 0.05, 0.05)[1]
    images = {test[p["id"]]["image"] for p in preds["before"]} | {r["image"] for r in json.loads(
        (ROOT / "data" / "toy" / "train.json").read_text()) if r["id"] in pt_ids}
    assert len(list((out / "noise").glob("*.png"))) == len(images)  # one noise image per RAG-PT and test image
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
