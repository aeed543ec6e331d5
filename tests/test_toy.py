"""data/make_toy.py's toy v2: byte-identical regeneration, and each property data/toy/README.md documents, measured
on the files: blind (question-text-only) baselines at chance on val/test, the train language prior, the toy
hallucination rule on reports, the preference-pair kinds (told apart by a toy judge from findings alone), the
knowledge base's near-miss twins, the caption kinds.

The toy hallucination rule and the toy judge are data/toy_oracles.py's (toy_mentions / toy_hallucinated /
toy_missed, toy_kind), checked here on the files; blind_baselines (chance vs the best answer from the question text
alone) lives here.
`python tests/test_toy.py` prints the README's tables."""

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "data"))
import make_toy as mt  # noqa: E402

TOY = ROOT / "data" / "toy"


def load(name):
    return json.loads((TOY / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the toy hallucination rule (README, "b") and
# the toy judge (README, "c"): said once, in data/toy_oracles.py, which the recipes' toy judges and toy metrics use

from data.toy_oracles import toy_hallucinated as hallucinated  # noqa: E402
from data.toy_oracles import toy_kind  # noqa: E402
from data.toy_oracles import toy_mentions as report_mentions  # noqa: E402,F401
from data.toy_oracles import toy_missed as missed_lesion  # noqa: E402
from data import toy_oracles  # noqa: E402


def toy_judge(pair: dict) -> str:
    """The clinical kind of a preference pair from its texts and its image's findings (toy_findings) alone."""
    return toy_kind(pair["conversations"][-1]["value"], pair["rejected_conversations"][-1]["value"], pair["toy_findings"])


def test_rule_words_are_the_generators():
    """The rule's lesion names, locations and negation words are the ones data/make_toy.py writes."""
    assert sorted(toy_oracles.TOY_LESIONS) == sorted(mt.LESION_WORDS)
    assert sorted(toy_oracles.TOY_LOCATIONS) == sorted(mt.LOCATION_WORDS)
    assert tuple(toy_oracles.TOY_NEGATIONS) == tuple(mt.NEGATIONS)


# ---------------------------------------------------------------- blind baselines (README, "Splits")

def _chance_and_blind(items):
    """items: (kind, text key, domain, answer). Per kind: blind = answering each exact text key with its most frequent
    answer in these items (the best any text-only predictor can do, fitted on the split itself: an upper bound);
    chance = answering with the most frequent answer of the domains the text can name: keys are grouped by the set
    of domains they occur in (a question naming "nodule" occurs in radiology only; "Is this image normal?" in all
    three), and each group gets its pooled majority answer. blind == chance: the wording tells nothing beyond
    the domain, which is not the answer."""
    out = {}
    for kind in sorted({i[0] for i in items}):
        mine = [i for i in items if i[0] == kind]
        per_key, domains = defaultdict(Counter), defaultdict(set)
        for _, key, dom, ans in mine:
            per_key[key][ans] += 1
            domains[key].add(dom)
        groups = defaultdict(Counter)
        for key, c in per_key.items():
            groups[frozenset(domains[key])] += c
        n = len(mine)
        out[kind] = {"n": n, "strings": len(per_key),
                     "chance": sum(c.most_common(1)[0][1] for c in groups.values()) / n,
                     "blind": sum(c.most_common(1)[0][1] for c in per_key.values()) / n}
    return out


def blind_baselines(records: list[dict]) -> dict:
    """Per question kind of the records' qa: n, strings (distinct question texts), chance, blind (see
    _chance_and_blind) and prior = the accuracy of the train language prior (the qa item's prior_answer: the answer
    its phrasing predicts in train; closed kinds only)."""
    items = [(qa["kind"], qa["question"], r["domain"], qa["answer"]) for r in records for qa in r["qa"]]
    out = _chance_and_blind(items)
    for kind, row in out.items():
        prior = [qa["prior_answer"] == qa["answer"] for r in records for qa in r["qa"]
                 if qa["kind"] == kind and "prior_answer" in qa]
        row["prior"] = float(np.mean(prior)) if prior else None
    return out


def mc_blind(records: list[dict]) -> dict:
    """Multiple choice per kind: chance and blind_content as above with the text key (question, sorted options);
    blind_letter = the best fixed answer letter."""
    items = [(m["kind"], (m["question"], tuple(sorted(m["options"]))), r["domain"], m["answer"])
             for r in records for m in r["mc"]]
    out = _chance_and_blind(items)
    for kind, row in out.items():
        letters = Counter(m["answer_label"] for r in records for m in r["mc"] if m["kind"] == kind)
        row["blind_content"] = row.pop("blind")
        row["blind_letter"] = letters.most_common(1)[0][1] / row["n"]
    return out


def ngram_overlap(texts: list[str], reference: list[str], n: int = 4) -> float:
    """Share of the word n-grams of `texts` that occur in some `reference` text."""
    grams = lambda t: {tuple(t.lower().split()[i:i + n]) for i in range(len(t.split()) - n + 1)}
    ref = set().union(*(grams(t) for t in reference))
    mine = [g for t in texts for g in grams(t)]
    return sum(g in ref for g in mine) / max(1, len(mine))


# ---------------------------------------------------------------- tests

def test_regeneration_is_byte_identical(tmp_path):
    """make_toy.py writes the committed data/toy and data/tokenizer again, byte for byte (sha256 of every file)."""
    subprocess.run([sys.executable, str(ROOT / "data" / "make_toy.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=ROOT)
    for sub in ("toy", "tokenizer"):
        ours = {p.relative_to(ROOT / "data" / sub).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in (ROOT / "data" / sub).rglob("*") if p.is_file() and p.name != "README.md"}
        new = {p.relative_to(tmp_path / sub).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (tmp_path / sub).rglob("*") if p.is_file()}
        assert ours == new, sorted(set(ours.items()) ^ set(new.items()))[:5]
    size = sum(p.stat().st_size for p in (ROOT / "data").rglob("*") if p.is_file())
    assert size < 10.5e6, f"data/ is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("split", ["val", "test"])
def test_blind_baselines_are_at_chance(split):
    """Every exact question string of the clean splits is answered like its kind: the best text-only answer is the
    kind's chance level (closed kinds: 50 %), and the train prior scores exactly 50 % there."""
    recs = load(f"{split}.json")
    table = blind_baselines(recs)
    assert set(table) == {"presence", "normal", "location", "modality", "where", "modality_open", "abnormality"}
    for kind, row in table.items():
        assert row["blind"] == pytest.approx(row["chance"]), (kind, row)
        if row["prior"] is not None:
            assert row["chance"] == 0.5 and row["prior"] == 0.5, (kind, row)
    assert table["where"]["chance"] == 0.25 and table["modality_open"]["chance"] == pytest.approx(1 / 3)
    assert table["abnormality"]["chance"] == 0.5  # "none" for every normal image, whatever the wording
    for kind, row in mc_blind(recs).items():
        assert row["blind_content"] == pytest.approx(row["chance"]) and row["blind_letter"] == 0.25, (kind, row)
    vqa = load(f"{split}_vqa.json")  # the flat VQA file carries the same questions and kinds
    assert len(vqa) == sum(len(r["qa"]) for r in recs) and Counter(v["kind"] for v in vqa) == \
        Counter(q["kind"] for r in recs for q in r["qa"])


def test_train_has_the_language_prior_and_noisy_reports():
    recs = load("train.json")
    table = blind_baselines(recs)
    for kind in ("presence", "normal", "location", "modality"):
        assert table[kind]["prior"] == pytest.approx(mt.PRIOR, abs=0.02), table[kind]
        assert table[kind]["blind"] >= mt.PRIOR - 0.02
    normal = [r for r in recs if not r["abnormal"]]
    abnormal = [r for r in recs if r["abnormal"]]
    hall = [hallucinated(r["report"], r["findings"]) for r in normal]
    wrong = [hallucinated(r["report"], r["findings"]) for r in abnormal]
    assert np.mean(hall) == pytest.approx(mt.HALLUCINATED_SHARE, abs=0.01)
    assert np.mean(wrong) == pytest.approx(mt.WRONG_SIDE_SHARE, abs=0.01)
    assert [r["report_error"] is not None for r in recs] == [hallucinated(r["report"], r["findings"]) for r in recs]
    assert not any(hallucinated(r["report_clean"], r["findings"]) for r in recs if "report_clean" in r)
    assert not any(missed_lesion(r["report"], r["findings"]) for r in abnormal)


def test_clean_splits_reports_are_faithful_and_unseen():
    train = {r["report"] for r in load("train.json")} | {r.get("report_clean") for r in load("train.json")}
    for split in ("pref", "val", "test", "ragpt"):
        recs = load(f"{split}.json")
        assert not any(hallucinated(r["report"], r["findings"]) or missed_lesion(r["report"], r["findings"])
                       for r in recs), split
        if split in ("val", "test"):
            assert not any(r["report"] in train for r in recs), split
    kb = load("kb.json")
    assert not any(hallucinated(r["report"], r["findings"]) or missed_lesion(r["report"], r["findings"]) for r in kb)
    # the rule itself, on hand-written cases
    nod = [{"name": "nodule", "location": "left upper lung"}]
    assert not hallucinated("Chest x-ray. No nodule is identified.", [])
    assert hallucinated("Chest x-ray. A nodule is seen in the right upper lung.", [])
    assert hallucinated("A faint nodule projects over the right upper lung.", nod)
    assert not hallucinated("A faint nodule projects over the left upper lung. No other abnormality.", nod)
    assert missed_lesion("Both lungs are clear.", nod) and not missed_lesion("nodule", nod)


def test_preference_pairs_kinds_shares_and_judge():
    train_images = {r["image"] for r in load("train.json")}
    for name, split in (("prefs_train.json", "pref"), ("prefs_val.json", "val")):
        pairs = load(name)
        images = {r["image"] for r in load(f"{split}.json")}
        assert {p["image"] for p in pairs} <= images and not ({p["image"] for p in pairs} & train_images)
        kinds = Counter(p["toy_kind"] for p in pairs)
        assert set(kinds) == {"wrong_yes_no", "wrong_location", "missed_lesion", "hallucinated_finding", "wording"}
        assert 0.2 <= kinds["wording"] / len(pairs) <= 0.3 and 0.35 <= kinds["wrong_yes_no"] / len(pairs) <= 0.45
        assert [toy_judge(p) for p in pairs] == [p["toy_kind"] for p in pairs]
        for p in pairs:
            assert p["toy_serious"] == (p["toy_kind"] != "wording")
            assert p["conversations"][0] == p["rejected_conversations"][0]
            chosen = p["conversations"][1]["value"]
            assert chosen != p["rejected_conversations"][1]["value"]
            if p["answer_type"] != "CLOSED":
                assert not hallucinated(chosen, p["toy_findings"])
        closed = [p for p in pairs if p["toy_kind"] == "wrong_yes_no"]
        assert 0.4 <= np.mean([p["toy_rejected_is_prior"] for p in closed]) <= 0.6
        assert len({p["toy_domain"] for p in pairs[:30]}) == 3  # shuffled: any prefix mixes domains and kinds


def _pixels(rel):
    return np.asarray(Image.open(TOY / rel).convert("RGB"), dtype=np.float64)


def test_knowledge_base_twins_are_near_misses():
    """Each val/test/ragpt image has KB twins of its domain; the serious ones' reports are wrong for the query's
    findings (a blind copy hallucinates or misses), the `same` one is right and is withheld for exactly half of each
    (split, domain, normal / abnormal) group; twins look like their query (test split, mean absolute pixel
    difference)."""
    kb = {r["id"]: r for r in load("kb.json")}
    assert {r["twin_of"] for r in kb.values()} == {q["id"] for s in mt.KB_QUERIES for q in load(f"{s}.json")}
    for split in mt.KB_QUERIES:
        recs = load(f"{split}.json")
        no_match = defaultdict(list)
        for q in recs:
            twins = [kb[t] for t in q["kb_twins"]]
            assert {t["twin_of"] for t in twins} == {q["id"]} and {t["domain"] for t in twins} == {q["domain"]}
            kinds = sorted(t["near_miss"] for t in twins)
            serious = ["normal", "other_side"] if q["abnormal"] else ["lesion_added"]
            assert kinds in (serious, sorted(serious + ["same"])), (q["id"], kinds)
            no_match[q["domain"], q["abnormal"]].append("same" not in kinds)
            for t in twins:
                wrong = hallucinated(t["report"], q["findings"]) or missed_lesion(t["report"], q["findings"])
                assert wrong == t["serious"], (q["id"], t["id"])
                if t["near_miss"] in ("other_side", "same") and q["abnormal"]:
                    assert t["findings"][0]["name"] == q["findings"][0]["name"]
        for group, flags in no_match.items():
            assert sum(flags) == round(mt.KB_NO_MATCH * len(flags)), (split, group)
    recs = load("test.json")
    same_domain = defaultdict(list)
    for r in kb.values():
        same_domain[r["domain"]].append(r["id"])
    for q in recs:  # every twin is nearer its query than the median other KB image of the domain;
        # where `same` is kept, a twin is the nearest
        x = _pixels(q["image"])
        twins = [np.abs(_pixels(kb[t]["image"]) - x).mean() for t in q["kb_twins"]]
        others = [np.abs(_pixels(kb[o]["image"]) - x).mean() for o in same_domain[q["domain"]][::5]
                  if kb[o]["twin_of"] != q["id"]]
        assert max(twins) < np.median(others), q["id"]
        if any(kb[t]["near_miss"] == "same" for t in q["kb_twins"]):
            assert min(twins) < min(others), q["id"]


def test_captions_kinds_and_shares():
    caps = load("captions.json")
    train = load("train.json")
    assert [c["image"] for c in caps] == [r["image"] for r in train]
    kinds = Counter(c["toy_caption_kind"] for c in caps)
    for k, share in mt.CAPTION_SHARES.items():
        assert kinds[k] == pytest.approx(share * len(caps), abs=3), (k, kinds)
    by_id = {c["id"]: c for c in caps}
    for c in caps:
        if c["toy_caption_kind"] == "duplicate":
            assert c["caption"] == by_id[c["toy_duplicate_of"]]["caption"]
        if c["toy_caption_kind"] == "near_duplicate":
            assert c["caption"] != by_id[c["toy_duplicate_of"]]["caption"]
    lexicon = [t.strip() for t in (ROOT / "data" / "medical_terms.txt").read_text().splitlines()
               if t.strip() and not t.startswith("#")]
    terms = lambda t: sum(f" {w} " in " " + re.sub(r"[^\w-]+", " ", t.lower()) + " " for w in lexicon)
    # a usable caption has >= 3 distinct terms, except when its subject and its finding both say "tissue" (a term
    # counts once): 4 pathology captions, which the term filter drops as PubMedVision's drops thin real captions
    thin = []
    for c in caps:
        n = terms(c["caption"])
        if c["toy_caption_kind"] in ("usable", "duplicate", "near_duplicate") and n < 3:
            assert n == 2 and c["caption"].count("tissue") == 2, c["caption"]
            thin.append(c["id"])
        else:
            assert (n >= 3) == (c["toy_caption_kind"] in ("usable", "duplicate", "near_duplicate")), (c["caption"], n)
    assert len(thin) == 4


def summary():
    """The numbers data/toy/README.md quotes."""
    for split in ("train", "val", "test"):
        print(f"\n{split}: blind baselines per kind")
        for kind, row in blind_baselines(load(f"{split}.json")).items():
            print(f"  {kind:14s} n={row['n']:4d} strings={row['strings']:3d} chance={row['chance']:.3f} "
                  f"blind={row['blind']:.3f} prior={row['prior']}")
        for kind, row in mc_blind(load(f"{split}.json")).items():
            print(f"  {kind:14s} n={row['n']:4d} chance={row['chance']:.3f} content={row['blind_content']:.3f} "
                  f"letter={row['blind_letter']:.3f}")
    train = load("train.json")
    tr = [r["report"] for r in train]
    for split in ("val", "test"):
        reps = [r["report"] for r in load(f"{split}.json")]
        print(f"{split} reports: exact in train {sum(r in set(tr) for r in reps)}/{len(reps)}; word 4-gram overlap "
              f"{ngram_overlap(reps, tr):.3f}; 8-gram {ngram_overlap(reps, tr, 8):.3f}; distinct {len(set(reps))}")
    for name in ("prefs_train.json", "prefs_val.json"):
        pairs = load(name)
        print(name, len(pairs), {k: f"{v} ({v / len(pairs):.3f})" for k, v in Counter(p["toy_kind"] for p in pairs).items()})
    print("captions", Counter(c["toy_caption_kind"] for c in load("captions.json")))


if __name__ == "__main__":
    summary()
