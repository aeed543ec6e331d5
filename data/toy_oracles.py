"""data/toy_oracles.py -- offline stand-ins, for the toy only, of the external models that recipes call: the
paper's GPT-4V that rewrites captions (huatuo_vision.py --reformat-model tiny), MMedPO's hallucination judge and
clinical-relevance scorers (mmedpo.py --judge toy --scorers toy), and the toy's hallucination rule that scores
generated reports (data/toy/README.md (b), (c); tests/test_toy.py checks it on the toy). Each one "sees" a toy image by
looking up the toy record of that image (data/toy/*.json: its true findings and modality, what such a model reads
off the picture) and gets exactly the inputs the real model gets. They live with the toy data, not in the recipes:
a real run passes a model path instead, and the recipe reads like its paper.
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
# clinical relevance (0-1, the released scores' scale) of each kind of rejected answer: a re-wording says what the
# ground truth says (harmless, 0); a wrong yes/no, side, missed or invented lesion is a clinically wrong statement
# (1). "unknown" (a sampled answer that differs but names nothing the rule reads) sits in between.
TOY_RELEVANCE = {"wording": 0.0, "wrong_yes_no": 1.0, "wrong_location": 1.0, "missed_lesion": 1.0,
                 "hallucinated_finding": 1.0, "unknown": 0.5}


def toy_mentions(text: str) -> tuple[set, set]:
    """(lesion names, location phrases) named in the text's positive sentences (split at . ; ?; a sentence with a
    negation word names nothing), whole words: the README's hallucination-rule parser."""
    lesions, locations = set(), set()
    for sentence in re.split(r"[.;?]", text):
        s = " " + re.sub(r"[^a-z0-9 ]+", " ", sentence.lower()) + " "
        if not any(f" {w} " in s for w in TOY_NEGATIONS):
            lesions |= {w for w in TOY_LESIONS if f" {w} " in s}
            locations |= {w for w in TOY_LOCATIONS if f" {w} " in s}
    return lesions, locations


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
        key = json.dumps([self.seed, images, prompt]).encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        missing = [p for p in images if str(Path(p).resolve()) not in self.seen]
        if missing:
            raise lm.DataError(f"{missing[0]}: the toy reformatter (--reformat-model tiny) sees only the images of "
                               f"data/toy; pass --reformat-model PATH (a VLM) for other images")
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
