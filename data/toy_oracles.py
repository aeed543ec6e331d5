"""data/toy_oracles.py -- offline stand-ins, for the toy only, of the external models that recipes call: the
paper's GPT-4V that rewrites captions (huatuo_vision.py --reformat-model tiny). Each one "sees" a toy image by
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
