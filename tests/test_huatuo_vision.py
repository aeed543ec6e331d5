"""huatuo_vision.py: PubMedVision filters, dedup and reformatting (scripted generator), the multiple-choice matcher
and readers, multi-image SFT, and torchrun 2 ranks == 1 rank x 2 accumulation for both stages."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import huatuo_vision as hv
import llava_med as lm
from conftest import ROOT

REAL = ROOT.parent / "shared" / "realdata"
TOY = ROOT / "data" / "toy"


def test_medical_term_count_and_filters():
    lex = hv.load_lexicon(str(ROOT / "data" / "medical_terms.txt"))
    assert hv.count_medical_terms("Chest x-ray: a nodule in the left upper lobe of the lung.", lex) == 7
    # chest, x-ray, chest x-ray, nodule, lobe, upper lobe, lung (whole words and phrases; "left" is no term)
    assert hv.count_medical_terms("A nice chart of sales figures.", lex) == 0
    records = lm.read_records(TOY / "train.json")[:30]
    stats = {}
    kept = hv.filter_sources(records, lex, 3, 32, TOY, 0.95, stats)
    assert len(kept) + sum(stats.values()) == 30 and stats["near-duplicate caption"] > 0
    stats = {}
    assert hv.filter_sources(records, lex, 3, 100, TOY, 0.95, stats) == []  # 64 px images are below 100 px
    assert stats["image too small"] + stats.get("too few medical terms", 0) == 30


def test_dedup_keeps_the_first_of_near_duplicates():
    texts = ["Chest x-ray shows a round nodule in the left upper lung.",
             "Chest x-ray shows a round nodule in the left upper lung",  # same but the period
             "Fundus photograph with a yellow exudate near the optic disc.",
             "chest X-ray shows a round nodule in the left upper lung."]  # case only
    assert hv.dedup(texts, 0.95) == [0, 2]
    assert hv.dedup(texts, 1.01) == [0, 1, 2, 3]


def test_reformat_parsing_and_building_with_a_scripted_generator():
    good = '{"Image_description": "A chest x-ray with a nodule.", "QA-query": "Where is the nodule?", "QA-answer": "Left upper lung."}'
    assert hv.parse_reformat("Sure! " + good + " Hope this helps.")["QA-answer"] == "Left upper lung."
    for bad in ["no json here", '{"Image_description": "x", "QA-query": "q"}', '{"Image_description": "", "QA-query": "q", "QA-answer": "a"}',
                '{"Image_description": "x", "QA-query": "q", "QA-answer": "a"']:
        assert hv.parse_reformat(bad) is None
    records = lm.read_records(TOY / "train.json")[:4]
    multi = ("multi", dict(records[0][1], image=[records[0][1]["image"], records[1][1]["image"]], body_part="chest"), "caption")
    sources = [(w, r, r["report"]) for w, r in records] + [multi]
    seen = []

    def scripted(jobs):  # every other reply is malformed
        seen.extend(jobs)
        return [good if i % 2 == 0 else "I cannot answer in JSON." for i in range(len(jobs))]

    stats = {}
    align, instruct = hv.build_pubmedvision(sources, TOY, scripted, seed=0, stats=stats)
    assert stats == {"malformed generation": 2} and len(align) == len(instruct) == 3
    assert all("<reference>" in p and "</reference>" in p for _, p in seen)
    assert len(seen[-1][0]) == 2 and len(align[-1]["image"]) == 2  # the multi-image record keeps both images
    assert align[-1]["conversations"][0]["value"] in hv.MULTI_IMAGE_QUESTIONS
    assert align[0]["conversations"][1]["value"] == "A chest x-ray with a nodule."
    assert instruct[0]["conversations"][0]["value"] == "Where is the nodule?"
    assert {"id", "image", "conversations", "modality", "body_part"} <= set(align[0])
    assert align[-1]["body_part"] == "chest" and isinstance(align[0]["image"], list)


@pytest.mark.parametrize("reply,expected", [
    ("B", "B"), ("b", "B"), ("The answer is B", "B"), ("答案是C", "C"), ("(D) fracture", "D"), ("A.", "A"),
    ("I think it is an effusion", "C"),  # 'I' names no option; the option text decides
    ("a nodule is seen", "A"),  # the article 'a' is not the letter A
    ("fracture of the rib", "D"), ("nodul", "A"),  # closest option by difflib
    ("The answer is no abnormality", "B"),
])
def test_match_choice(reply, expected):
    options = {"A": "nodule", "B": "no abnormality", "C": "effusion", "D": "fracture"}
    assert hv.match_choice(reply, options) == expected


def test_mc_prompt_and_readers():
    assert hv.mc_prompt("Which finding?", ["nodule", "none"]) == (
        "Which finding?\nA. nodule\nB. none\nAnswer with the option's letter from the given choices directly.")
    rows = hv.read_mc(str(TOY / "test_mc.json"))
    assert len(rows) == 180 and {r["dataset_name"] for r in rows} == {"toy_radiology", "toy_pathology", "toy_ophthalmology"}
    assert all(r["options"][hv.LETTERS.index(r["answer_label"])] for r in rows)


@pytest.mark.skipif(not REAL.exists(), reason="../shared/realdata not present")
def test_vqa_rad_and_slake_closed_questions_as_choices():
    rad = hv.read_mc(str(REAL / "vqa_rad" / "testset.json"))
    assert rad and all(r["options"] == ["yes", "no"] for r in rad) and len(rad) <= 272
    slake = hv.read_mc(str(REAL / "slake" / "test.json"))
    assert slake and all(r["dataset_name"] == "SLAKE" for r in slake)


def test_multi_image_record_trains():
    model, tok = lm.load("tiny")
    rec = {"id": "two", "image": ["images/train_radiology_0000.png", "images/train_pathology_0001.png"],
           "conversations": [{"from": "human", "value": "Compare the two images."},
                             {"from": "gpt", "value": "The first is a chest x-ray, the second a histopathology slide."}]}
    data = hv.SFTData([("mem[0]", rec, TOY)], tok, model.config, 512, skip_bad=False)
    batch = data.batch([0], tok.pad_token_id)
    assert batch["pixel_values"].shape[0] == 2
    hv.set_trainable(model, 1, lora=False)
    loss, n = hv.sft_loss_sum(model, batch)
    (loss / n).backward()
    assert torch.isfinite(loss) and model.projector[0].weight.grad.abs().sum() > 0
    assert model.language_model.model.layers[0].mlp.up_proj.weight.grad is None  # stage 1: LLM frozen


def _run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_torchrun_two_ranks_equal_one_rank_both_stages(tmp_path):
    """Global-token-mean SFT loss: 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches, stage 1 then stage 2
    (losses atol 1e-5, final weights atol 1e-5)."""
    args = ["--stages", "1,2", "--epochs1", "0.05", "--epochs2", "0.015", "--batch-size", "8", "--micro-batch-size", "4"]
    _run([sys.executable, "huatuo_vision.py", "--out", str(tmp_path / "one")] + args)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "huatuo_vision.py",
          "--out", str(tmp_path / "two")] + args)
    curves = [[(r["phase"], r["loss"]) for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))] for d in ("one", "two")]
    assert [p for p, _ in curves[0]] == ["stage1"] * 2 + ["stage2"] * 2
    torch.testing.assert_close(torch.tensor([l for _, l in curves[0]]), torch.tensor([l for _, l in curves[1]]),
                               atol=1e-5, rtol=0)
    a = load_file(str(tmp_path / "one" / "llava_hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "llava_hf" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    base, _ = lm.load("tiny")  # stage 2 really trained the LLM (FSDP2 must know before sharding what needs grads)
    up = a["model.language_model.layers.0.mlp.up_proj.weight"]
    assert (up - base.language_model.model.layers[0].mlp.up_proj.weight).abs().max() > 1e-6
    for name, ours in [("lm_head.weight", base.language_model.lm_head.weight),  # the FSDP root's own parameters
                       ("model.language_model.embed_tokens.weight", base.language_model.model.embed_tokens.weight)]:
        assert (a[name][: ours.shape[0]] - ours).abs().max() > 1e-6, name
    vit = a["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert torch.equal(vit, base.vision_tower.encoder.layers[0].mlp.fc1.weight)  # the ViT stayed frozen


def test_stage2_lora_exports_a_merged_model(tmp_path):
    _run([sys.executable, "huatuo_vision.py", "--stages", "2", "--lora", "--epochs2", "0.015", "--lr2", "1e-2",
          "--batch-size", "8", "--micro-batch-size", "8", "--out", str(tmp_path)])
    import transformers
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava_hf", dtype=torch.float32)
    base, _ = lm.load("tiny")
    w = merged.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(w, base.language_model.model.layers[0].self_attn.q_proj.weight)  # LoRA merged in
