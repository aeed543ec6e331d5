"""huatuo_vision.py: the PubMedVision filters (medical terms of the caption, image size, a CLIP non-medical-image
classifier with weights set by hand, dedup; the toy captions' reported shares) and reformatting (scripted generator,
the toy reformatter and its malformed replies, a VLM folder), the native-caption baseline, the built-records cache, the
multiple-choice matcher and readers, RGB images, multi-image SFT, the complete pipeline under torchrun (2 ranks ==
1 rank x 2 accumulation), --eval-only, LoRA export, and the fault suite (tests/faults.py)."""

import json
import string
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import faults
import huatuo_vision as hv
import llava_med as lm
from data.toy_oracles import ToyReformatter
from conftest import ROOT

REAL = ROOT.parent / "shared" / "realdata"
TOY = ROOT / "data" / "toy"
FIX = ROOT / "tests" / "fixtures"
LEX = str(ROOT / "data" / "medical_terms.txt")
FAST = ["--stages", "1,2", "--train-data", "toy", "--epochs1", "0.05", "--epochs2", "0.03", "--batch-size", "8", "--micro-batch-size", "4"]


def test_medical_term_count_and_filters():
    lex = hv.load_lexicon(LEX)
    assert hv.count_medical_terms("Chest x-ray: a nodule in the left upper lobe of the lung.", lex) == 7
    # chest, x-ray, chest x-ray, nodule, lobe, upper lobe, lung (whole words and phrases; "left" is no term)
    assert hv.count_medical_terms("A nice chart of sales figures.", lex) == 0
    records = lm.read_records(TOY / "captions.json")[:30]
    stats = {}
    kept = hv.filter_sources(records, lex, 3, 32, TOY, 0.95, stats)
    assert len(kept) + sum(stats.values()) == 30 and stats["near-duplicate caption"] > 0
    stats = {}
    assert hv.filter_sources(records, lex, 3, 100, TOY, 0.95, stats) == []  # 64 px images are below 100 px
    assert stats["image too small"] + stats["too few medical terms"] == 30
    # the paper counts the caption's terms: a term-rich inline context does not rescue a term-poor caption
    rec = {"id": "c", "image": records[0][1]["image"], "caption": "Figure 2.",
           "context": "Chest x-ray with a nodule in the upper lobe of the lung."}
    stats = {}
    assert hv.filter_sources([("mem[0]", rec)], lex, 3, 32, TOY, 0.95, stats) == []
    assert stats["too few medical terms"] == 1 and "non-medical image" not in stats  # no classifier given: no count
    kept = hv.filter_sources([("mem[0]", dict(rec, caption=rec["context"], context="Figure 2."))], lex, 3, 32, TOY, 0.95, {})
    assert len(kept) == 1


def test_toy_captions_lose_a_realistic_share_to_the_filters():
    """data/toy/captions.json (README (e)): about 65 % kept; every off-topic and too-short caption goes, and one
    caption of each (near-)duplicate group survives."""
    stats = {}
    kept = hv.filter_sources(lm.read_records(TOY / "captions.json"), hv.load_lexicon(LEX), 3, 32, TOY, 0.95, stats)
    assert len(kept) == 229 and stats["too few medical terms"] == 67 and stats["near-duplicate caption"] == 64
    kinds = [rec["toy_caption_kind"] for _, rec, _ in kept]
    assert "off_topic" not in kinds and "too_short" not in kinds
    assert len({c for _, _, c in kept}) == len(kept)  # no exact duplicate left


def test_dedup_keeps_the_first_of_near_duplicates():
    texts = ["Chest x-ray shows a round nodule in the left upper lung.",
             "Chest x-ray shows a round nodule in the left upper lung",  # same but the period
             "Fundus photograph with a yellow exudate near the optic disc.",
             "chest X-ray shows a round nodule in the left upper lung."]  # case only
    assert hv.dedup(texts, 0.95) == [0, 2]
    assert hv.dedup(texts, 1.01) == [0, 1, 2, 3]


def tiny_clip(folder, medical=("a medical image",), non_medical=("a non-medical image",)):
    """A CLIPModel + CLIPProcessor folder whose zero-shot verdict is set by hand: the ViT's one layer attends uniformly
    (q, k = 0), passes values through (v, out = identity, MLP = 0); the patch embedding reads the mean red (dim 0) and
    blue (dim 1) level, so the pooled feature points along +(1, -1, 0, 0) for a red image and -(1, -1, 0, 0) for a
    blue one; the visual projection maps that axis onto t_medical - t_non_medical (the two prompts' text embeddings).
    Red images are medical for this classifier, blue ones are not."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + "-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
                         tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")))
    cfg = CLIPConfig(projection_dim=4, logit_scale_init_value=4.6052,  # exp = 100, CLIP's trained scale
                     text_config=dict(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     vision_config=dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                        image_size=8, patch_size=4))
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        emb, layer = model.vision_model.embeddings, model.vision_model.encoder.layers[0]
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.weight[0, 0], emb.patch_embedding.weight[1, 2] = 1 / 16, 1 / 16  # mean R, mean B
        emb.class_embedding.zero_()
        emb.position_embedding.weight.zero_()
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.fc2):
            lin.weight.zero_(), lin.bias.zero_()
        for lin in (layer.self_attn.v_proj, layer.self_attn.out_proj):
            lin.weight.copy_(torch.eye(4)), lin.bias.zero_()
        dummy = Image.new("RGB", (8, 8))
        t = model(**proc(text=[medical[0], non_medical[0]], images=[dummy], return_tensors="pt", padding=True)).text_embeds
        model.visual_projection.weight.copy_(torch.outer(t[0] - t[1], torch.tensor([1.0, -1.0, 0.0, 0.0])))
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def colour_records(tmp_path, colours):
    """Records with distinct term-rich captions and one solid-colour 64 px image each ('r' red, 'b' blue; 'rb': two)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    fill = {"r": (220, 30, 30), "b": (30, 30, 220)}
    records = []
    for i, spec in enumerate(colours):
        names = []
        for j, c in enumerate(spec):
            Image.new("RGB", (64, 64), fill[c]).save(tmp_path / "img" / f"{i}_{j}.png")
            names.append(f"img/{i}_{j}.png")
        organ = ["lung", "liver", "kidney", "heart", "brain", "bone"][i % 6]
        records.append({"id": f"s{i}", "image": names, "modality": "x-ray",
                        "caption": f"Case {i}: chest x-ray with a nodule and an effusion near the {organ}, series {i * 37}."})
    return records


def test_non_medical_image_filter_drops_what_clip_calls_non_medical(tmp_path):
    clip = hv.MedicalImageFilter(str(tiny_clip(tmp_path / "clip")), "cpu", medical=["a medical image"],
                                 non_medical=["a non-medical image"])
    records = colour_records(tmp_path, ["r", "b", "r", "rb", "b"])
    paths = [tmp_path / "img" / f"{i}_0.png" for i in (0, 1)]
    p = clip.p_medical(paths)
    assert p[0] > 0.99 and p[1] < 0.01, p  # the weights make red medical, blue non-medical
    stats = {}
    kept = hv.filter_sources([(f"src[{i}]", r) for i, r in enumerate(records)], hv.load_lexicon(LEX), 3, 32, tmp_path,
                             0.95, stats, clip)
    assert [rec["id"] for _, rec, _ in kept] == ["s0", "s2"]  # s3 has a blue second image: the record goes
    assert stats["non-medical image"] == 3 and stats["near-duplicate caption"] == 0
    flipped = hv.MedicalImageFilter(str(tmp_path / "clip"), "cpu", medical=["a non-medical image"],
                                    non_medical=["a medical image"], threshold=0.5)
    assert flipped(paths) == [False, True]
    (tmp_path / "empty").mkdir()
    with pytest.raises(lm.ModelError, match="no config.json"):
        hv.MedicalImageFilter(str(tmp_path / "empty"), "cpu")


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


def test_toy_reformatter_writes_release_records_and_malformed_ones_are_counted():
    """--reformat-model tiny: replies built from the toy image's own findings and the prompt's reference, in
    PubMedVision's release format; a seeded share is malformed and counted; a corrupted reply is counted too, never
    silently dropped (records + malformed = sources); each reply depends on (seed, images, prompt) only."""
    lex = hv.load_lexicon(LEX)
    sources = hv.filter_sources(lm.read_records(TOY / "captions.json")[:60], lex, 3, 32, TOY, 0.95, {})
    truth = {str((TOY / r["image"]).resolve()): r for _, r in lm.read_records(TOY / "train.json")}
    toy = ToyReformatter(seed=0, malformed_rate=0.3)
    replies = []
    stats = {}
    align, instruct = hv.build_pubmedvision(sources, TOY, lambda jobs: replies.extend(toy(jobs)) or replies[-len(jobs):],
                                            seed=0, stats=stats)
    bad = sum(hv.parse_reformat(t) is None for t in replies)
    assert 0 < bad < len(sources) // 2 and stats == {"malformed generation": bad}
    assert len(align) == len(instruct) == len(sources) - bad
    for a, i in zip(align, instruct):
        assert a["id"].startswith("Alignment_VQA_") and i["id"].startswith("Instruction_VQA_")
        assert isinstance(a["image"], list) and a["image"] == i["image"] and a["modality"] and a["body_part"]
        assert [t["from"] for t in a["conversations"]] == ["human", "gpt"] == [t["from"] for t in i["conversations"]]
        assert a["conversations"][0]["value"] in hv.ALIGNMENT_QUESTIONS and "<reference>" not in a["conversations"][1]["value"]
        rec = truth[a["image"][0]]  # the description names the image's own findings, not a (copied) caption's
        desc = a["conversations"][1]["value"]
        assert all(f["name"] in desc and f["location"] in desc for f in rec["findings"])
        assert ("No abnormality" in desc) == (not rec["findings"])
    jobs = [([str((TOY / r["image"]).resolve())], f"Scenario: x\n<reference>{c}</reference>") for _, r, c in sources[:8]]
    assert toy(jobs) == ToyReformatter(seed=0, malformed_rate=0.3)(jobs) == toy(jobs[::-1])[::-1]
    assert toy(jobs) != ToyReformatter(seed=1, malformed_rate=0.3)(jobs)
    assert all(hv.parse_reformat(t) for t in ToyReformatter(malformed_rate=0.0)(jobs))
    # a corrupted reformatter output (cut off, or not JSON) is counted as malformed, not lost
    corrupt = lambda jobs: [t[:-2] if k % 3 == 0 else t for k, t in enumerate(ToyReformatter(malformed_rate=0.0)(jobs))]
    stats = {}
    align, _ = hv.build_pubmedvision(sources, TOY, corrupt, seed=0, stats=stats)
    assert stats["malformed generation"] == -(-len(sources) // 3) and len(align) + stats["malformed generation"] == len(sources)
    raw = hv.raw_caption_records(sources, TOY, seed=0)  # the native-caption baseline: the caption itself
    assert [r["conversations"][1]["value"] for r in raw] == [c for _, _, c in sources]
    outside = [(["/tmp/not_a_toy_image.png"], "Scenario: x\n<reference>c</reference>")]
    with pytest.raises(lm.DataError, match="sees only the images of data/toy"):
        toy(outside)


def test_built_records_are_cached_under_a_key_of_the_args(tmp_path):
    """The build in main() with a VLM folder as --reformat-model (the real-model path; here the random tiny model
    saved as llava-hf, whose replies are all malformed and counted): the CLIP filter's counts are reported; a second
    run with the same arguments reuses the records; a changed --template or --min-medical-terms rebuilds them."""
    src = tmp_path / "src.json"
    src.write_text(json.dumps(colour_records(tmp_path, ["r", "b", "r", "r"])))
    clip = tiny_clip(tmp_path / "clip")
    lm.save_llava_hf(*lm.load("tiny"), tmp_path / "vlm")
    base = ["--stages", "build", "--source", str(src), "--min-image-side", "32", "--image-filter-model", str(clip),
            "--reformat-model", str(tmp_path / "vlm"), "--reformat-max-new-tokens", "4", "--out", str(tmp_path / "out")]
    first = faults._in_process(hv, base)["build"]
    n = first["after_filters"]
    assert first["sources"] == 4 and sum(first["removed"].values()) - first["removed"]["malformed generation"] \
        == 4 - n and "non-medical image" in first["removed"]
    assert first["removed"]["malformed generation"] == n and first["alignment_vqa"] == 0 and first["raw_captions"] == n
    assert first["reformatter"] == str(tmp_path / "vlm") and "cached" not in first
    assert faults._in_process(hv, base)["build"] == dict(first, cached=True)
    assert "cached" not in faults._in_process(hv, base + ["--template", "vicuna_v1"])["build"]
    assert faults._in_process(hv, base + ["--template", "vicuna_v1"])["build"]["cached"]
    assert "cached" not in faults._in_process(hv, base + ["--template", "vicuna_v1", "--min-medical-terms", "2"])["build"]
    assert (tmp_path / "out" / "pubmedvision_alignment.json").exists()


@pytest.mark.parametrize("reply,expected", [
    ("B", "B"), ("b", "B"), ("The answer is B", "B"), ("答案是C", "C"), ("(D) fracture", "D"), ("A.", "A"),
    ("I think it is an effusion", "C"),  # 'I' names no option; the option text decides
    ("a nodule is seen", "A"),  # the article 'a' is not the letter A
    ("fracture of the rib", "D"), ("nodul", "A"),  # closest option by difflib
    ("The answer is no abnormality", "B"),
    ("E B", "B"), ("I B", "B"), ("E,B", "B"),  # a letter naming no option leaves the next one its cue
])
def test_match_choice(reply, expected):
    options = {"A": "nodule", "B": "no abnormality", "C": "effusion", "D": "fracture"}
    assert hv.match_choice(reply, options) == expected


def test_mc_prompt_and_readers():
    assert hv.mc_prompt("Which finding?", ["nodule", "none"]) == (
        "Which finding?\nA. nodule\nB. none\nAnswer with the option's letter from the given choices directly.")
    rows = hv.read_mc(str(TOY / "test_mc.json"))
    assert len(rows) == 192 and {r["dataset_name"] for r in rows} == {"toy_radiology", "toy_pathology", "toy_ophthalmology"}
    assert all(r["options"][hv.LETTERS.index(r["answer_label"])] for r in rows)
    assert all(r["images"][0].startswith(str(TOY)) for r in rows)
    vqa = hv.read_mc(str(TOY / "test_vqa.json"))  # LLaVA-Med format: its closed yes/no questions
    assert vqa and all(r["options"] == ["yes", "no"] and r["answer_label"] in "AB" for r in vqa)


@pytest.mark.skipif(not REAL.exists(), reason="../shared/realdata not present")
def test_vqa_rad_and_slake_closed_questions_as_choices():
    rad = hv.read_mc(str(REAL / "vqa_rad" / "testset.json"))
    assert rad and all(r["options"] == ["yes", "no"] for r in rad) and len(rad) <= 272
    assert {r["dataset_name"] for r in rad} == {"VQA-RAD"}
    slake = hv.read_mc(str(REAL / "slake" / "test.json"))
    assert slake and all(r["dataset_name"] == "SLAKE" for r in slake)


def test_grey_images_are_converted_to_rgb_before_padding(monkeypatch):
    """cli.py pads Image.open(p).convert('RGB') with the mean colour; llava_med.load_image keeps a grey image "L"
    (padded with grey 114, LLaVA-Med's way). Training batches and the evaluation prompts get the RGB version."""
    model, tok = lm.load("tiny")
    grey = FIX / "llava_med_gray_wide.png"
    assert lm.load_image(grey).mode == "L"
    rgb = lm.preprocess_image(Image.open(grey).convert("RGB"), model.config.image_size, model.config.image_mean,
                              model.config.image_std)
    assert not torch.allclose(rgb, lm.image_tensor(model.config, grey))  # the padded band differs
    rec = {"id": "g", "image": grey.name, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                             {"from": "gpt", "value": "A grey image."}]}
    data = hv.SFTData([("mem[0]", rec, FIX)], tok, model.config, 512, skip_bad=False)
    torch.testing.assert_close(data.batch([0], tok.pad_token_id)["pixel_values"][0], rgb, atol=0, rtol=0)
    seen = []
    monkeypatch.setattr(lm, "generate_sharded", lambda m, t, jobs, *a, **k: seen.extend(jobs) or ["A"] * len(jobs))
    rows = [{"question": "Grey?", "options": ["yes", "no"], "answer_label": "A", "dataset_name": "g", "images": [str(grey)]}]
    scores, _ = hv.evaluate_mc(model, tok, rows, 4, 0, 1)
    assert scores["overall"] == 1.0 and seen[0]["images"][0].mode == "RGB"
    torch.testing.assert_close(lm.image_tensor(model.config, seen[0]["images"][0]), rgb, atol=0, rtol=0)


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
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400, env=faults.ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_complete_pipeline_torchrun_two_ranks_equals_one_rank(tmp_path):
    """Every default stage (build, 1, 2, eval) from an empty --out under torchrun with 2 ranks, and the same on one
    rank with 2 micro-batches of accumulation: equal built records, losses and final weights (atol 1e-5), and the
    same multiple-choice answers (lm.generate_sharded's batches do not depend on the number of ranks)."""
    args = ["--epochs1", "0.08", "--epochs2", "0.08", "--batch-size", "8", "--micro-batch-size", "4",
            "--eval-limit", "12", "--eval-batch-size", "4", "--reformat-max-new-tokens", "8"]
    faults._in_process(hv, ["--out", str(tmp_path / "one")] + args)  # one rank in this process: no second python start
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "huatuo_vision.py",
          "--out", str(tmp_path / "two")] + args)
    res = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert res[0]["build"] == res[1]["build"] and res[0]["build"]["after_filters"] == 229
    assert res[0]["build"]["alignment_vqa"] == 229 - res[0]["build"]["removed"]["malformed generation"] > 0
    built = [(tmp_path / d / "pubmedvision_instruction.json").read_text() for d in ("one", "two")]
    assert built[0] == built[1]
    for name in ("before", "after_stage1", "after_stage2"):
        preds = [json.loads((tmp_path / d / f"predictions_{name}.json").read_text()) for d in ("one", "two")]
        assert [p["prediction"] for p in preds[0]] == [p["prediction"] for p in preds[1]] and len(preds[0]) == 12
    curves = [[(r["phase"], r["loss"]) for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if "loss" in r]
              for d in ("one", "two")]
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


def test_eval_only_evaluates_the_model_without_training_data(tmp_path):
    """--eval-only reads neither --source nor --train-data (both missing here), trains nothing, and gives the
    numbers of the same model evaluated inside a training run ("before")."""
    res = faults._in_process(hv, ["--eval-only", "--source", str(tmp_path / "none.json"), "--train-data",
                                  str(tmp_path / "none.jsonl"), "--eval-limit", "6", "--eval-batch-size", "3",
                                  "--out", str(tmp_path / "a")])
    assert set(res) == {"before"} and res["before"]["n"] == 6
    assert not (tmp_path / "a" / "stage1").exists() and not (tmp_path / "a" / "llava_hf").exists()
    ref = faults._in_process(hv, ["--stages", "eval", "--eval-limit", "6", "--eval-batch-size", "3", "--out",
                                  str(tmp_path / "b")])
    assert ref["before"] == res["before"]


def test_stage2_lora_exports_a_merged_model(tmp_path):
    _run([sys.executable, "huatuo_vision.py", "--stages", "2", "--train-data", "toy", "--lora", "--epochs2", "0.015", "--lr2", "1e-2",
          "--batch-size", "8", "--micro-batch-size", "8", "--out", str(tmp_path)])
    import transformers
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava_hf", dtype=torch.float32)
    base, _ = lm.load("tiny")
    w = merged.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(w, base.language_model.model.layers[0].self_attn.q_proj.weight)  # LoRA merged in


# ---------------------------------------------------------------- the fault suite (tests/faults.py)


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    """Killed in stage 2 after stage 1 finished: the resumed run rebuilds stage 2's start from stage 1's checkpoint."""
    faults.check_kill_and_resume("huatuo_vision.py", FAST + ["--save-every", "1"], "stage2", tmp_path, kill_at=2)


def test_nonfinite_step_stops_or_is_skipped(monkeypatch, tmp_path):
    faults.check_nonfinite(hv, ["--stages", "1", "--train-data", "toy", "--epochs1", "0.05", "--batch-size", "8", "--micro-batch-size", "4"],
                           "stage1", tmp_path, monkeypatch, call=3)  # 3rd micro-batch = step 2


# "stalled" (SIGSTOP, caught by --dist-timeout-s in the copied setup_distributed) runs once, in test_reliability.py
@pytest.mark.parametrize("fault", ["killed"])
def test_a_dead_or_stalled_rank_makes_the_other_exit(tmp_path, fault):
    faults.check_dead_rank("huatuo_vision.py", ["--stages", "2", "--train-data", "toy", "--epochs2", "5", "--batch-size", "8",
                                                "--micro-batch-size", "4"], "stage2", tmp_path, fault)


def test_bad_data_and_bad_model_exit_2_with_one_line(tmp_path):
    faults.check_bad_inputs("huatuo_vision.py", FAST, ["--train-data", str(FIX / "missing_image.jsonl")], tmp_path)
