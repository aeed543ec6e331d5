"""data/toy_readers.py -- what recipes derive from the toy's files at run time, on a toy folder only (data/toy;
data/toy/README.md describes every file): dpo.py's preference pairs derived from the toy records (the pairs of a
split without a prefs file, and the warm start's SFT data, which mmed_rag.py's warm start shares), and mmed_rag.py's
split of the toy's files into knowledge base, warm start, RAG-PT and validation images, with its prior-balanced
warm-start set; stllava_med.py's stage-1 conversations and huatuo_vision.py's stand-ins for its SFT sets. A real run
reads its own preference file or passes --pt-data / --val-data / --sft-data / --train-data; the recipes keep only
their papers' data prep.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import llava_med as lm


# ----------------------------------------------------------------------------------------------------------
# dpo.py: pairs derived from toy records
# ----------------------------------------------------------------------------------------------------------

WRONG_ANSWERS = {  # toy data: a wrong answer of the same kind for each gold answer (rejected side of a pair)
    "yes": "no", "no": "yes",
}
TOY_REPORT_QUESTION = "Describe the image."  # the toy records' report turn (data/make_toy.py REPORT_QUESTION)


def toy_preference_pairs(records: list[tuple[str, dict]], seed: int) -> list[dict]:
    """Derive DPO pairs from toy records: for every question, chosen = the gold answer, rejected = a wrong answer of
    the same kind (yes<->no, another location / modality / finding of the same split), and for the report turn,
    chosen = the record's report, rejected = the report of another image with other findings. Their chosen sides are
    the warm start's SFT data (the toy train split: its language prior and noisy reports included, as written)."""
    rng = random.Random(seed)
    pool = {}  # question kind -> all gold answers seen for it
    for _, rec in records:
        for qa in rec["qa"]:
            pool.setdefault(_question_kind(qa), set()).add(qa["answer"])
    reports = [(json.dumps(rec.get("findings"), sort_keys=True), rec["report"]) for _, rec in records if rec.get("report")]
    pairs = []
    for where, rec in records:
        turns = [(qa["question"], qa["answer"], qa["answer_type"], qa) for qa in rec["qa"]]
        if rec.get("report"):
            turns.append((TOY_REPORT_QUESTION, rec["report"], "REPORT", None))
        for k, (question, gold, answer_type, qa) in enumerate(turns):
            if qa is None:  # a report of an image whose findings differ
                mine = json.dumps(rec.get("findings"), sort_keys=True)
                wrong = rng.choice([r for f, r in reports if f != mine] or ["No abnormality is seen."])
            else:
                wrong = WRONG_ANSWERS.get(gold) or rng.choice(sorted(pool[_question_kind(qa)] - {gold} or {"none"}))
            human = {"from": "human", "value": "<image>\n" + question}
            pairs.append({"id": f"{rec['id']}_q{k}", "image": rec["image"], "answer_type": answer_type,
                          "conversations": [human, {"from": "gpt", "value": gold}],
                          "rejected_conversations": [human, {"from": "gpt", "value": wrong}]})
    return pairs


def toy_pair_records(source: Path) -> list[tuple[str, dict]]:
    """[(where, pair)] of toy_preference_pairs on the records of `source` (a toy split's json), as read_records
    gives records: dpo.py's pairs of a split without a prefs file, and the warm start's SFT data (train.json)."""
    return [(f"{source} pair {p['id']}", p) for p in toy_preference_pairs(lm.read_records(source), seed=0)]


def _question_kind(qa: dict) -> str:
    """The toy's own question kind (data/make_toy.py writes it), else the question's words without articles."""
    q = qa["question"]
    return qa.get("kind") or " ".join(w for w in q.lower().split() if w.isalpha() and w not in ("a", "an", "the"))[:24]


# ----------------------------------------------------------------------------------------------------------
# mmed_rag.py: the toy's files as knowledge base, warm start, RAG-PT and validation images
# ----------------------------------------------------------------------------------------------------------


def toy_splits(folder: Path, val_fraction: float, pt_fraction: float):
    """The toy's files (data/toy/README.md): kb.json is the retrievers' training set and knowledge base, train.json
    the warm start, ragpt.json the RAG-PT source, val.json the gamma sweep. kb.json holds near-miss twins of every
    ragpt / val / test image (its lesion on the other side, no lesion, a lesion added, or the same finding), so the
    retrieved reports are wrong for 2 of 3 twins of an abnormal query: the interference RAG-PT is meant to undo. The
    twins' own images are not the queries', so the sets stay disjoint as RULE requires. Returns {name: ids}, the
    first val_fraction / pt_fraction of each domain's val / ragpt images in file order."""
    first = lambda recs, f: {r["id"] for d in dict.fromkeys(x["domain"] for x in recs)  # noqa: E731
                             for r in [x for x in recs if x["domain"] == d][:max(1, round(f * sum(x["domain"] == d for x in recs)))]}
    read = lambda name: [rec for _, rec in lm.read_records(folder / name)]  # noqa: E731
    return {"kb": {r["id"] for r in read("kb.json")}, "warm": {r["id"] for r in read("train.json")},
            "pt": first(read("ragpt.json"), pt_fraction), "val": first(read("val.json"), val_fraction)}


def prior_balanced(items: list[dict]) -> list[dict]:
    """Toy only: train.json's closed questions carry a language prior (data/toy/README.md (a): the wording gives the
    answer for 90 % of them), so a warm start on all of them answers by the wording (measured: 600 + 200 steps gave
    50.0 % on val with and without retrieval, the same answer on the noise image: nothing for RAG-PT to compare).
    Keep every counter-prior question (answer != `prior_answer`) and, per (domain, kind, answer), as many pro-prior
    ones (first in file order), so the wording predicts nothing; reports and items without `prior_answer` stay."""
    keep, quota = [], Counter()
    for it in items:
        if it.get("prior_answer") and it["answer"] != it["prior_answer"]:
            quota[(it["domain"], it["kind"], it["answer"])] += 1
    for it in items:
        if not it.get("prior_answer") or it["answer"] != it["prior_answer"]:
            keep.append(it)
        elif quota[(it["domain"], it["kind"], it["answer"])] > 0:
            quota[(it["domain"], it["kind"], it["answer"])] -= 1
            keep.append(it)
    return keep


# ----------------------------------------------------------------------------------------------------------
# stllava_med.py and huatuo_vision.py: the toy records as stage-1 / SFT conversations
# ----------------------------------------------------------------------------------------------------------


def toy_sq_records(path: Path, seed: int, rounds_per_conversation: int = 2) -> list[tuple[str, dict]]:
    """The toy stand-in for LLaVA-Med's 60k conversations: per image, its QA rounds and a describe round in a seeded
    random order, cut into conversations of `rounds_per_conversation` rounds. (The toy conversations hold every round
    in one fixed order: the tiny model then learns that the first question is a yes/no one, and answers later ones
    from the earlier answers and the report instead of from the image.)"""
    out = []
    for k, (where, rec) in enumerate(lm.read_records(path)):
        rounds = [(qa["question"], qa["answer"]) for qa in rec["qa"]] + [("Describe the image.", rec["report"])]
        random.Random(f"{seed}-{k}").shuffle(rounds)
        for c in range(0, len(rounds), rounds_per_conversation):
            conv = [t for q, a in rounds[c:c + rounds_per_conversation]
                    for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
            conv[0] = {"from": "human", "value": lm.IMAGE_MARKER + "\n" + conv[0]["value"]}
            out.append((f"{where} rounds {c}-{c + len(conv) // 2 - 1}", {**rec, "conversations": conv}))
    return out


def toy_sft_records(path: Path, questions: list[str], mc_prompt) -> tuple[list[dict], list[dict]]:
    """The toy stand-ins for LLaVA-558K (captions) and LLaVA-mix (conversations + multiple choice, whose letter
    format LLaVA-1.5's mix also teaches via A-OKVQA), in the LLaVA conversation format: captions asked by the
    method's describe-questions in turn, multiple choice in its mc_prompt format."""
    records = [r for _, r in lm.read_records(path)]
    align, instruct = [], []
    for r in records:
        align.append({"id": r["id"] + "_cap", "image": r["image"], "conversations": [
            {"from": "human", "value": "<image>\n" + questions[len(align) % len(questions)]},
            {"from": "gpt", "value": r["report"]}]})
        instruct.append({"id": r["id"], "image": r["image"], "conversations": r["conversations"]})
        for k, mc in enumerate(r.get("mc", [])):
            instruct.append({"id": f"{r['id']}_mc{k}", "image": r["image"], "conversations": [
                {"from": "human", "value": "<image>\n" + mc_prompt(mc["question"], mc["options"])},
                {"from": "gpt", "value": mc["answer_label"]}]})
    return align, instruct
