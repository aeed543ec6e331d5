"""data/toy_oracles.py -- offline stand-ins, for the toy only, of the external models that recipes call: the
paper's GPT-4V that rewrites captions (huatuo_vision.py --reformat-model tiny), MMedPO's hallucination judge and
clinical-relevance scorers (mmedpo.py --judge toy --scorers toy), STLLaVA-Med's GPT-4o judge (stllava_med.py
--judge toy), and the toy's hallucination rule that scores generated reports (data/toy/README.md (b), (c);
tests/test_toy.py checks it on the toy files). Each one "sees" a toy image by looking up the toy record of that
image (data/toy/*.json: its true findings and modality, what such a model reads off the picture) and gets the
inputs the real model gets. They live with the toy data, not in the recipes: a real run passes a model path
instead, and the recipe reads like its paper.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import llava_med as lm


# The toy's own judge (data/toy/README.md "(c) Toy judge" and "(b)"; tests/test_toy.py toy_judge): the words its
# generator uses for lesions (the domains' lesions and the MC distractors) and locations, and the negation words.
TOY_LESIONS = ("nodule", "tumor cluster", "exudate", "hemorrhage", "effusion", "pneumothorax", "necrosis", "fibrosis",
               "drusen")
TOY_LOCATIONS = ("left upper lung", "left lower lung", "right upper lung", "right lower lung", "upper left",
                 "upper right", "lower left", "lower right")
TOY_NEGATIONS = ("no", "not", "without", "none", "neither", "nor")
TOY_MODALITIES = ("chest x-ray", "histopathology", "fundus photograph", "mri")
# clinical relevance (0-1, the released scores' scale) of each kind of rejected answer: a re-wording says what the
# ground truth says (harmless, 0); a wrong yes/no, side, missed or invented lesion is a clinically wrong statement
# (1). "unknown" (a sampled answer that differs but names nothing the rule reads) sits in between.
TOY_RELEVANCE = {"wording": 0.0, "wrong_yes_no": 1.0, "wrong_location": 1.0, "missed_lesion": 1.0,
                 "hallucinated_finding": 1.0, "unknown": 0.5}


def _named(text: str, words, negations: bool = True) -> set:
    """The words of `words` that the text names in its positive sentences (split at . ; ?; with `negations`, a
    sentence holding a negation word names nothing), whole words, case-insensitive: the README's rule (b)."""
    found = set()
    for sentence in re.split(r"[.;?]", text):
        s = " " + re.sub(r"[^a-z0-9 ]+", " ", sentence.lower().replace("x-ray", "xray")) + " "
        if not (negations and any(f" {w} " in s for w in TOY_NEGATIONS)):
            found |= {w for w in words if f" {w.replace('x-ray', 'xray')} " in s}
    return found


def toy_mentions(text: str, negations: bool = True) -> tuple[set, set]:
    """(lesion names, location phrases) named in the text: the README's hallucination-rule parser."""
    return _named(text, TOY_LESIONS, negations), _named(text, TOY_LOCATIONS, negations)


def toy_modalities(text: str, negations: bool = True) -> set:
    """The toy modalities the text names (same rule)."""
    return _named(text, TOY_MODALITIES, negations)


def toy_hallucinated(text: str, findings: list[dict]) -> bool:
    """The toy hallucination of a report: it names a lesion the image's findings lack, or a location that is not
    a finding's (README (b)); the toy hallucination rate is its mean over generated reports."""
    lesions, locations = toy_mentions(text)
    return bool(lesions - {f["name"] for f in findings}) or bool(locations - {f["location"] for f in findings})


def toy_missed(text: str, findings: list[dict]) -> bool:
    """An abnormal image whose report names none of its lesions (the README's miss rate)."""
    return bool(findings) and not (toy_mentions(text)[0] & {f["name"] for f in findings})


def _yes_no(text: str):
    m = re.search(r"\b(yes|no)\b", text.lower())
    return m.group(1) if m else None


def toy_kind(gt: str, rejected: str, findings: list[dict]) -> str:
    """The clinical kind of a rejected answer next to its ground truth, from the texts and the image's findings
    alone (README (c)): wording (both say the same: the same yes/no for a closed question, whose ground truth is
    yes or no; the same named lesions and locations otherwise), wrong_yes_no, hallucinated_finding (a lesion that
    is not there, or any location on a normal image), wrong_location, missed_lesion; else unknown."""
    if lm.normalize_answer(gt) in ("yes", "no"):
        return "wording" if _yes_no(rejected) == lm.normalize_answer(gt) else "wrong_yes_no"
    if toy_mentions(gt) == toy_mentions(rejected):
        return "wording"
    lesions, locations = toy_mentions(rejected)
    if lesions - {f["name"] for f in findings}:
        return "hallucinated_finding"
    if locations - {f["location"] for f in findings}:
        return "wrong_location" if findings else "hallucinated_finding"
    return "missed_lesion" if toy_missed(rejected, findings) and not locations else "unknown"


class ToyJudge:
    """The toy's judge (--judge toy / --scorers toy, the default on a toy folder only): it stands in for the paper's
    GPT-4o and Med-LLMs by reading what they would know from medicine, the image's ground-truth findings
    (record "findings", or a toy pair's "toy_findings"), and the ground truth next to the text; the paper's scorers
    see the rejected text alone. Hallucination: 1 when a candidate's clinical content differs from the ground truth
    (toy_kind is not wording), else 0. Clinical relevance: TOY_RELEVANCE of the pair's toy_kind, one round (every
    toy scorer would give the same score: the debate is trivially agreed)."""
    name = "toy"

    def hallucination(self, gts, cands):
        return [float(toy_kind(g, c, []) != "wording") for g, c in zip(gts, cands)]  # wording needs no findings

    def write_wrong(self, gts, seed):
        return ["" for _ in gts]  # the caller falls back to corrupt_ground_truth (left/right, yes/no, ... swaps)

    @staticmethod
    def relevance(gt: str, rejected: str, findings: list[dict]) -> dict:
        kind = toy_kind(gt, rejected, findings)
        return {"score": TOY_RELEVANCE[kind], "rounds": 1, "agreed": True, "history": [TOY_RELEVANCE[kind]],
                "toy_kind": kind}


def toy_truth(question: str, findings: list[dict], modality: str) -> str | None:
    """The image's answer to a self-asked yes/no question about the toy's facts, or None (not a yes/no question, or
    one the facts do not settle). A location question ("Is the nodule in the left upper lung?") is yes iff a finding
    lies there; then "normal"; a lesion name (presence); a modality."""
    q = question.strip().lower()
    if not re.match(r"(is|are|does|do|was|were|has|have|can)\b", q):
        return None
    (lesions, locations), modalities = toy_mentions(q, negations=False), toy_modalities(q, negations=False)
    if locations:
        named = lesions or {f["name"] for f in findings}  # "the lesion" (ophthalmology) names any finding
        return "yes" if any(f["location"] in locations and f["name"] in named for f in findings) else "no"
    if re.search(r"\bnormal\b", q):
        return "no" if findings else "yes"
    if lesions:
        return "yes" if lesions & {f["name"] for f in findings} else "no"
    if modalities:
        return "yes" if modality.lower() in modalities else "no"
    return None


def toy_answer_score(question: str, answer: str, findings: list[dict], modality: str) -> int | None:
    """10 when one answer states what the question asks about, as the image's facts have it; 0 when it contradicts the
    image (the wrong yes/no; or it names a lesion, location or modality the image does not have, or names no lesion
    of an abnormal image when asked for the abnormality or a description) or does not answer (no yes/no, a garbled
    sample). A non-answer scores as low as a wrong answer: at 3 of 10 (our first version) the tiny model's stage 2
    learnt to evade -- "What abnormality is seen?" -> "chest x-ray", which never contradicts the image (test seeds 1
    and 2: abnormality accuracy 60 -> 0). None: the facts do not settle the question."""
    truth = toy_truth(question, findings, modality)
    if truth is not None:
        said = lm.yes_no(answer)
        return 10 if said == truth else 0
    q = question.lower()
    asks = ("modality" if "modality" in q else "abnormality" if "abnormal" in q or "finding" in q else
            "where" if q.startswith("where") else "describe" if "describe" in q else None)
    if asks is None:
        return None
    (lesions, locations), modalities = toy_mentions(answer), toy_modalities(answer)
    names, places = {f["name"] for f in findings}, {f["location"] for f in findings}
    if lesions - names or locations - places or modalities - {modality.lower()}:
        return 0  # a hallucinated finding, a wrong side / quadrant, a wrong modality
    if findings and asks in ("abnormality", "describe") and not lesions & names:
        return 0  # a missed lesion ("none", or a normal report, for an abnormal image)
    says_normal = re.search(r"\b(no|none|not|normal|clear|healthy|preserved)\b", answer.lower()) is not None
    stated = {"modality": bool(modalities), "where": bool(locations),
              "abnormality": bool(lesions) if findings else says_normal,
              # a description of a normal image that names no finding is faithful (toy rule (b)) if it is one
              "describe": bool(lesions and locations) if findings else len(answer.split()) >= 6}[asks]
    return 10 if stated else 0


def toy_judge_reply(question: str, answer1: str, answer2: str, facts: dict) -> str:
    """STLLaVA-Med's judge (stllava_med.py --judge toy; the paper's GPT-4o sees the image) as a judge reply: "s1 s2"
    on the first line, as the released parser reads it, each answer scored by toy_answer_score against the record's
    findings and modality; an empty reply (counted as "no reference answer") when the facts do not settle it."""
    s = [toy_answer_score(question, a, facts["findings"], facts["modality"]) for a in (answer1, answer2)]
    if None in s:
        return ""
    return f"{s[0]} {s[1]}\ntoy judge: scored against the image's findings {[f['name'] + ' ' + f['location'] for f in facts['findings']]}"


def article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


class ToyReformatter:
    """--reformat-model tiny: an offline stand-in for the unblinded VLM (GPT-4V in the paper), for the toy images
    only, named as the toy judges of the preference methods are. It gets exactly what a VLM gets, the image paths
    and the prompt, and "sees" an image by looking up the toy record of that image (data/toy/*.json: its true
    findings and modality, what a VLM reads off the picture). From the prompt it takes the scenario and the
    caption + context inside <reference>...</reference> (a clinical-presentation sentence of the context is
    reworded into the description; the reference itself is never quoted). It replies with the JSON the prompt
    asks for. A seeded share (`malformed_rate`) of replies is malformed the ways VLM replies are: prose without
    JSON, JSON cut off at the token budget, a missing or an empty field; parse_reformat rejects all of them and
    build_pubmedvision counts them. Each reply depends only on (seed, images, prompt), not on the order or the
    number of ranks. __call__(jobs [(image paths, prompt)]) -> [reply]: a generate_fn of build_pubmedvision."""

    MODALITY = {"radiology": "a frontal chest x-ray", "pathology": "an H&E-stained histopathology section",
                "ophthalmology": "a colour fundus photograph of the retina"}
    NORMAL = {"radiology": "the lung fields are clear and well aerated", "pathology": "the tissue architecture is "
              "preserved with regular nuclei", "ophthalmology": "the optic disc, vessels and macula look normal"}
    WHERE = {"radiology": "in the {loc}", "pathology": "in the {loc} part of the field",
             "ophthalmology": "in the {loc} quadrant"}
    STYLE = {  # scenario (a SCENARIOS prefix) -> how the question is put
        "Standard Q&A": "{q}", "A doctor asks": "Colleague, a quick look: {q}", "A senior doctor": "Intern, tell me: {q}",
        "An evaluator": "Test item: {q}", "A patient's family": "Doctor, is something wrong on this scan? {q}",
        "An intern asks": "Could you explain this to me? {q}", "A medical teacher": "Student, look closely: {q}"}

    def __init__(self, seed: int = 0, malformed_rate: float = 0.1, toy_folder: Path = lm.REPO / "data" / "toy"):
        self.seed, self.malformed_rate, self.seen = seed, malformed_rate, {}
        for f in sorted(toy_folder.glob("*.json")):  # every toy split that has image records with findings
            for where, rec in lm.read_records(f):
                if "findings" in rec and isinstance(rec.get("image"), str):
                    self.seen[str((toy_folder / rec["image"]).resolve())] = rec

    def describe(self, rec: dict, context: str, rng: random.Random) -> tuple[str, dict]:
        dom = rec["domain"]
        desc = [rng.choice(["This is {m}.", "The image is {m}.", "{M} is shown."]).format(
            m=self.MODALITY[dom], M=self.MODALITY[dom][0].upper() + self.MODALITY[dom][1:])]
        for f in rec["findings"]:
            x1, y1, x2, y2 = f["box"]
            where = self.WHERE[dom].format(loc=f["location"])
            desc.append(rng.choice(["There is {n} {w}, about {s} pixels across.", "{N} is seen {w} ({s} pixels).",
                                    "It shows {n} {w}, roughly {s} pixels wide."]).format(
                n=article(f["name"]), N=article(f["name"]).capitalize(), w=where, s=max(x2 - x1, y2 - y1)))
        if not rec["findings"]:
            desc.append(f"No abnormality is seen: {self.NORMAL[dom]}.")
        else:
            desc.append(f"Apart from this, {self.NORMAL[dom]}.")
        m = re.search(r"(\d+)-year-old (man|woman) presented with ([^.]+?)(?: for [^.]*)?\.", context)
        if m:  # the context's clinical presentation, in the description's own words
            desc.append(f"The patient, a {m.group(1)}-year-old {m.group(2)}, presented with {m.group(3)}.")
        return " ".join(desc), {"domain": dom, "modality": rec["modality"], "findings": rec["findings"]}

    def qa(self, seen: dict, rng: random.Random) -> tuple[str, str]:
        dom, fs = seen["domain"], seen["findings"]
        kinds = ["finding", "modality", "normal"] + (["location"] if fs else [])
        kind = rng.choice(kinds)
        if kind == "modality":
            return "What imaging modality is this?", f"This is {self.MODALITY[dom]} ({seen['modality']})."
        if kind == "location":
            f = fs[0]
            return f"Where is the {f['name']} located?", f"The {f['name']} is {self.WHERE[dom].format(loc=f['location'])}."
        said = "; ".join(f"{article(f['name'])} {self.WHERE[dom].format(loc=f['location'])}" for f in fs)
        if kind == "normal":
            return "Is this image normal?", (f"No, it shows {said}." if fs else f"Yes, no abnormality is seen; {self.NORMAL[dom]}.")
        return "Which finding is present in this image?", (f"It shows {said}." if fs else "No abnormality is present.")

    def reply(self, images: list, prompt: str) -> str:
        missing = [p for p in images if str(Path(p).resolve()) not in self.seen]
        if missing:
            raise lm.DataError(f"{missing[0]}: the toy reformatter (--reformat-model tiny) sees only the images of "
                               f"data/toy; pass --reformat-model PATH (a VLM) for other images")
        names = [self.seen[str(Path(p).resolve())]["image"] for p in images]  # the toy's names, not where it lies
        key = json.dumps([self.seed, names, prompt]).encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        m = re.search(r"<reference>(.*)</reference>", prompt, flags=re.S)
        context = m.group(1) if m else ""
        m = re.search(r"Scenario: (.*?)\n<reference>", prompt, flags=re.S)
        scenario = next((k for k in self.STYLE if m and m.group(1).startswith(k)), "Standard Q&A")
        parts = [self.describe(self.seen[str(Path(p).resolve())], context, rng) for p in images]
        description = " ".join(f"Image {i + 1}: {d}" for i, (d, _) in enumerate(parts)) if len(parts) > 1 else parts[0][0]
        q, a = self.qa(parts[0][1], rng)
        obj = {"Image_description": description, "QA-query": self.STYLE[scenario].format(q=q), "QA-answer": a}
        if rng.random() < self.malformed_rate:  # the malformed replies a VLM gives
            kind = rng.choice(["prose", "truncated", "missing", "empty"])
            if kind == "prose":
                return f"Sure. {description} A good question would be: {q} Answer: {a}"
            if kind == "truncated":
                text = json.dumps(obj)
                return text[:len(text) // 2]
            obj.pop("QA-answer") if kind == "missing" else obj.update({"QA-query": ""})
        return "Here is the JSON: " + json.dumps(obj) if rng.random() < 0.2 else json.dumps(obj)

    def __call__(self, jobs: list) -> list[str]:
        return [self.reply(images, prompt) for images, prompt in jobs]
