"""medrega.py: box text round trips and malformed answers, the region tokens (released row initialisation), the base
prompts (the Chinese report prompt against the released demo data), toy / SLAKE / MedRegInstruct readers,
box-preserving crops, boxes on the pixels the model receives, IoU on hand-computed cases, the Hungarian matcher against
brute force, Text-to-Region / Region-to-Text / VQA scoring (BLEU-1 against sacrebleu; --scoring medrega against the
released evaluators' outputs), the weighted loss, regional CoT hints, generation in chunks, the complete default
pipeline under torchrun (2 ranks == 1 rank x 2 micro-batches, augmentation on), --eval-only on the export, and the
fault suite (tests/faults.py)."""

import copy
import itertools
import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import faults
import llava_med as lm
import medrega as mr
from conftest import ROOT

REAL = ROOT.parent / "shared" / "realdata"
TOY = ROOT / "data" / "toy"
FIX = ROOT / "tests" / "fixtures"
TASKS = ["t2r", "r2t", "grounded", "vqa", "report"]
RELEASED = json.loads((ROOT / "tests" / "fixtures" / "medrega_released_scores.json").read_text())  # xmed-lab/MedRegA outputs


# ---- boxes as text ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("W,H", [(64, 64), (333, 517), (1024, 768)])
def test_box_encode_decode_round_trip(W, H):
    for v in range(1000):  # every grid value survives decode -> encode
        assert mr.encode_box(mr.decode_box([v, v, v, v], W, H), W, H) == [v, v, v, v]
    rng = random.Random(0)
    for _ in range(200):  # pixels -> grid -> pixels is off by at most half a grid step
        x1, x2 = sorted(rng.uniform(0, W) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, H) for _ in range(2))
        back = mr.decode_box(mr.encode_box([x1, y1, x2, y2], W, H), W, H)
        for a, b, s in zip([x1, y1, x2, y2], back, [W, H, W, H]):
            assert abs(a - b) <= s / 999 / 2 + 1e-9
    assert mr.encode_box([0, 0, W, H], W, H) == [0, 0, 999, 999]


@pytest.mark.parametrize("bad", [[5, 5, 3, 8], [0, 0, 65, 10], [-1, 0, 3, 3], [1, 2, 3], [0, float("nan"), 1, 1]])
def test_encode_rejects_bad_boxes(bad):
    with pytest.raises(ValueError):
        mr.encode_box(bad, 64, 64)


def test_format_and_parse_regions():
    text = mr.format_region("carotid vessel wall", [[365, 293, 416, 598], [596, 316, 635, 464]])
    assert text == "<ref>carotid vessel wall</ref><box>[[365, 293, 416, 598], [596, 316, 635, 464]]</box>"  # spec 5.3
    two = text + ", " + mr.format_region("left lung", [[535, 128, 923, 889]]) + ": No focal consolidation."
    assert mr.parse_regions(two) == [("carotid vessel wall", [[365, 293, 416, 598], [596, 316, 635, 464]]),
                                     ("left lung", [[535, 128, 923, 889]])]
    assert mr.strip_regions(two) == "carotid vessel wall, left lung: No focal consolidation."


@pytest.mark.parametrize("text,boxes,bad", [
    ("<ref>a</ref><box>[[1, 2, 3, 4]]</box>", [[1, 2, 3, 4]], 0),
    ("<ref>a</ref><box>[[1, 2, 3", [], 0),  # truncated generation
    ("<ref>a</ref><box>[[1, 2, 3, 4], [5, 6, 7", [[1, 2, 3, 4]], 0),  # the complete box still counts
    ("[[1000, 2, 3, 4], [5, 5, 3, 3], [10,20,30,40]]", [[10, 20, 30, 40]], 2),  # out of range, x2 < x1
    ("[[-5, 2, 3, 4]]", [], 1),
    ("no box at all", [], 0),
    ("[[1.5, 2, 3, 4]]", [], 0),  # not integers: not a box of this format
])
def test_parse_malformed_answers(text, boxes, bad):
    assert mr.parse_quads(text) == (boxes, bad)


def test_map_boxes_only_touches_box_spans():
    text = "What is <ref>this</ref><box>[[1, 2, 3, 4]]</box> at [[1, 2, 3, 4]]?"
    assert mr.map_boxes(text, lambda b: [v * 10 for v in b]) == \
        "What is <ref>this</ref><box>[[10, 20, 30, 40]]</box> at [[1, 2, 3, 4]]?"


def test_region_tokens_are_single_and_initialised_as_released():
    model, tok = lm.load("tiny")
    emb_in = model.language_model.get_input_embeddings().weight.detach().clone()
    emb_out = model.language_model.get_output_embeddings().weight.detach().clone()
    assert mr.add_region_tokens(model, tok) == 4
    ids = [tok.convert_tokens_to_ids(t) for t in mr.REGION_TOKENS]
    assert ids == list(range(emb_in.shape[0], emb_in.shape[0] + 4))
    text = "<ref>nodule</ref><box>[[38, 15, 51, 28]]</box>"
    enc = tok.encode(text, add_special_tokens=False)
    assert all(i in enc for i in ids) and tok.decode(enc, skip_special_tokens=True) == text  # kept by generate's decode
    new_in = model.language_model.get_input_embeddings().weight
    new_out = model.language_model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == len(tok) == model.config.text_config.vocab_size
    torch.testing.assert_close(new_in[:emb_in.shape[0]], emb_in)
    for i in ids:
        torch.testing.assert_close(new_out[i], emb_out.mean(0))  # lm_head rows: the mean (internvl_chat_finetune.py)
    rows = new_in[ids].detach()  # input rows: N(0, initializer_range = 0.02), transformers 4.37.2's resize default
    assert abs(rows.mean().item()) < 0.004 and abs(rows.std().item() - 0.02) < 0.002
    assert (rows - emb_in.mean(0)).norm(dim=1).min() > 0.1  # not the mean (its rows' norm would be ~0)
    again, tok2 = lm.load("tiny")
    mr.add_region_tokens(again, tok2)
    torch.testing.assert_close(again.language_model.get_input_embeddings().weight[ids], rows)  # seeded
    mean_model, tok3 = lm.load("tiny")
    mr.add_region_tokens(mean_model, tok3, input_init="mean")
    for i in ids:
        torch.testing.assert_close(mean_model.language_model.get_input_embeddings().weight[i], emb_in.mean(0))
    assert mr.add_region_tokens(model, tok) == 0  # idempotent
    out = model(torch.tensor([enc]))  # the grown model runs
    assert out.logits.shape == (1, len(enc), len(tok))
    spare, tok4 = lm.load("tiny")  # a matrix with spare rows past the tokenizer (llava-hf: 32064 rows, 32002 tokens)
    llm = spare.language_model
    llm.resize_token_embeddings(len(tok4) + 8, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[len(tok4):] = 5.0
        llm.get_output_embeddings().weight[len(tok4):] = 5.0
    assert mr.add_region_tokens(spare, tok4) == 4 and llm.get_input_embeddings().weight.shape[0] == len(tok4) + 4
    torch.testing.assert_close(llm.get_output_embeddings().weight[ids], emb_out.mean(0).expand(4, -1))  # not 5
    torch.testing.assert_close(llm.get_input_embeddings().weight[ids], rows)  # the same seeded draw


# ---- tasks, prompts, readers ----------------------------------------------------------------------------------

def test_base_prompts_and_training_format():
    # verbatim from the released meta_file.json ("text2region")
    assert mr.BASE_PROMPTS[("t2r", "en")] == (
        "You are a helpful medical assistant. Your task is object detection. You are required to find all the regions "
        "of the given objects. The region is represented in the form of bounding box, [x1, y1, x2, y2], with integers "
        "ranging from 0 to 999. These values correspond to the top left x, top left y, bottom right x, and bottom right "
        "y. For each object, please utilize this format to represent the region with its bounding box: "
        "\"<ref>object</ref><box>[[x1, y1, x2, y2]]</box>\". There might be multiple boxes for one object, in which "
        "case the format is like \"<ref>object</ref><box>[[x1, y1, x2, y2], [x3, y3, x4, y4]]</box>\".")
    assert mr.BASE_PROMPTS[("r2t", "en")].endswith("bottom right x, and bottom right y.")
    assert mr.BASE_PROMPTS[("grounded", "zh")].startswith("你是一个医疗助手，你的任务是定位并描述病种。")
    s = mr.sample("x", "img.png", 64, 64, "t2r", "en", "Please locate <ref>nodule</ref> in this chest x-ray.",
                  "<ref>nodule</ref><box>[[1, 2, 3, 4]]</box>", "mem")
    turns = mr.prompt_turns(s)
    assert turns[0][1] == "<image>\n" + mr.BASE_PROMPTS[("t2r", "en")] + " Please locate <ref>nodule</ref> in this chest x-ray."
    assert mr.prompt_turns(s, base_prompt=False)[0][1] == "<image>\nPlease locate <ref>nodule</ref> in this chest x-ray."
    zh = mr.sample("y", "img.png", 64, 64, "vqa", "zh", "结节位于哪里？", "右上肺", "mem")
    assert mr.prompt_turns(zh)[0][1] == "<image>\n" + mr.BASE_PROMPTS[("vqa", "zh")] + "结节位于哪里？请用词或短语回答问题。"
    # the Chinese report prompt = the released demo_data/data_file.jsonl id 5 (its <image> moved to the front)
    rep = mr.sample("z", "img.png", 64, 64, "report", "zh", mr.REPORT_QUESTION["zh"], "影像诊断：…", "mem")
    assert RELEASED["report_prompt_zh"].endswith("诊断结果。<image>\n")
    assert mr.prompt_turns(rep)[0][1] == "<image>\n" + RELEASED["report_prompt_zh"].replace("<image>\n", "")
    rendered = lm.render_chat("chatml", turns)  # MedRegA's Hermes-2 template (spec 5.2)
    assert rendered.startswith("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n")
    assert rendered.endswith("<|im_start|>assistant\n<ref>nodule</ref><box>[[1, 2, 3, 4]]</box><|im_end|>")


def test_toy_samples_carry_the_finding_boxes():
    samples = mr.toy_samples(TOY / "train.json", TASKS)
    recs = {r["id"]: r for _, r in lm.read_records(TOY / "train.json")}
    count = {}
    for s in samples:
        count[(s["task"], s["lang"])] = count.get((s["task"], s["lang"]), 0) + 1
    assert count == {("t2r", "en"): 180, ("r2t", "en"): 180, ("grounded", "en"): 180, ("grounded", "zh"): 180,
                     ("vqa", "en"): 360, ("vqa", "zh"): 360, ("report", "en"): 360, ("report", "zh"): 360}
    for s in samples:
        if s["task"] != "t2r":
            continue
        f = recs[s["id"].rsplit("_t2r", 1)[0]]["findings"][0]
        (name, boxes), = mr.parse_regions(s["turns"][1][1])
        assert name == f["name"] and len(boxes) == 1
        assert max(abs(a - b) for a, b in zip(mr.decode_box(boxes[0], 64, 64), f["box"])) <= 64 / 999 / 2 + 1e-9
    g = next(s for s in samples if s["task"] == "grounded" and s["lang"] == "zh")
    assert g["turns"][0][1].startswith("请定位并描述这张医学影像中的<ref>") and "</box>：" in g["turns"][1][1]


def test_a_record_with_findings_but_no_report_gives_no_grounded_sample(tmp_path):
    rec = next(r for r in json.loads((TOY / "train.json").read_text()) if r["findings"])
    rec.pop("report"), rec.pop("report_zh")
    (tmp_path / "train.json").write_text(json.dumps([rec]))
    (tmp_path / rec["image"]).parent.mkdir(parents=True)
    shutil.copy(TOY / rec["image"], tmp_path / rec["image"])
    tasks = {s["task"] for s in mr.toy_samples(tmp_path / "train.json", TASKS)}
    assert "t2r" in tasks and not tasks & {"grounded", "report"}


def test_toy_record_with_a_bad_box_names_the_record(tmp_path):
    rec = next(r for r in json.loads((TOY / "train.json").read_text()) if r["findings"])
    rec["findings"][0]["box"] = [50, 10, 40, 20]
    (tmp_path / "train.json").write_text(json.dumps([rec]))
    with pytest.raises(lm.DataError, match=rf"train\.json\[0\] id={rec['id']}: box"):
        mr.toy_samples(tmp_path / "train.json", TASKS, str(TOY))


def test_medreginstruct_reader(tmp_path):
    rows = [{"id": "a", "image": "images/train_radiology_0000.png", "width": 64, "height": 64, "conversations": [
        {"from": "human", "value": "<image>\nPlease locate <ref>nodule</ref> in this chest x-ray."},
        {"from": "gpt", "value": "<ref>nodule</ref><box>[[593, 234, 796, 437]]</box>"}]},
        {"id": "b", "image": "images/train_radiology_0000.png", "conversations": [
            {"from": "human", "value": "Please locate <ref>nodule</ref>."}, {"from": "gpt", "value": "x"}]}]
    f = tmp_path / "text2region.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(lm.DataError, match="text2region.jsonl:2: needs numeric 'width' and 'height'"):
        mr.medreginstruct_samples(f, str(TOY), "")
    f.write_text(f.read_text() + "{broken\n")
    skipped = {}
    out = mr.medreginstruct_samples(f, str(TOY), "", skipped)
    assert len(out) == 1 and out[0]["task"] == "t2r" and sum(skipped.values()) == 2
    assert out[0]["turns"][0][1] == "Please locate <ref>nodule</ref> in this chest x-ray."  # raw <image> stripped
    g = tmp_path / "mystery.jsonl"
    g.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(lm.DataError, match="pass --task"):
        mr.medreginstruct_samples(g, str(TOY), "")
    assert mr.medreginstruct_samples(g, str(TOY), "r2t")[0]["task"] == "r2t"


@pytest.mark.skipif(not (REAL / "slake").exists(), reason="../shared/realdata not present")
def test_slake_detection_boxes_and_bilingual_questions():
    samples = mr.slake_samples(REAL / "slake", "train", TASKS)
    liver = next(s for s in samples if s["id"] == "slake_xmlab0_t2r0")  # detection.json: {"Liver": [33, 67, 98, 108]} (xywh)
    (name, boxes), = mr.parse_regions(liver["turns"][1][1])
    assert name == "Liver" and (liver["width"], liver["height"]) == (256, 256)
    assert max(abs(a - b) for a, b in zip(mr.decode_box(boxes[0], 256, 256), [33, 67, 131, 175])) < 0.13
    assert {s["lang"] for s in samples if s["task"] == "vqa"} == {"en", "zh"}
    assert sum(s["task"] == "vqa" for s in samples) == 217  # every QA row of the subset
    assert all(s["task"] != "grounded" for s in samples)  # SLAKE has no per-region reports


# ---- augmentation -------------------------------------------------------------------------------------------

def test_crop_keeps_boxes_on_their_pixels():
    """A white rectangle on black: after every crop, the rewritten box is still the rectangle's pixel extent."""
    W, H = 120, 90
    img = Image.new("RGB", (W, H))
    ImageDraw.Draw(img).rectangle([40, 30, 69, 49], fill=(255, 255, 255))  # pixels 40..69 x 30..49 -> box [40, 30, 70, 50]
    turns = [("user", "Please locate <ref>spot</ref>."), ("assistant", mr.format_region("spot", [mr.encode_box([40, 30, 70, 50], W, H)]))]
    sizes = set()
    for seed in range(20):
        out, new_turns = mr.augment_sample(img, turns, random.Random(seed), 0.5)
        w, h = out.size
        sizes.add((w, h))
        (_, boxes), = mr.parse_regions(new_turns[1][1])
        x1, y1, x2, y2 = mr.decode_box(boxes[0], w, h)
        ys, xs = np.nonzero(np.asarray(out)[..., 0] > 128)
        truth = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert max(abs(a - b) for a, b in zip([x1, y1, x2, y2], truth)) <= max(w, h) / 999 + 1e-6, (seed, out.size)
    assert len(sizes) > 5  # it really crops
    # the whole-image box leaves no room for a smaller crop: no crop, nothing moves
    assert mr.crop_keeping_boxes(W, H, [[0, 0, W, H]], random.Random(0), (0.5, 0.6)) is None


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel [start, end) of a bright bar in a 1-D brightness profile (0 = background, 1 = bar): width = the
    profile's sum, centre = its centroid (both kept by an interpolating resize, blur and ringing included)."""
    width = profile.sum()
    centre = ((np.arange(len(profile)) + 0.5) * profile).sum() / width
    return centre - width / 2, centre + width / 2


@pytest.mark.parametrize("W,H", [(480, 320), (300, 420), (432, 384), (400, 400)])
def test_encoded_box_is_where_the_model_sees_the_region(tmp_path, W, H):
    """Bug (issue 15): boxes were encoded for the (cropped, non-square) image, which was then padded to a square,
    so the model saw the region elsewhere. A grey rectangle is drawn, each sample goes through RegionSFTData.batch
    (crops on; the exact pixels the model receives), and the box in its answer tokens is compared with the
    rectangle found in pixel_values, on the 0..999 grid of the model input (448 px, one pixel = 2.2 grid units)."""
    model, tok = lm.load("tiny", template="chatml")
    mr.add_region_tokens(model, tok)
    cfg = copy.copy(model.config)
    cfg.vision_config = copy.copy(cfg.vision_config)
    cfg.vision_config.image_size = 448  # InternVL's input size: fine enough to see a 1-unit error
    img = Image.new("RGB", (W, H), (64, 64, 64))
    rect = [W * 0.3, H * 0.25, W * 0.55, H * 0.6]
    ImageDraw.Draw(img).rectangle([round(rect[0]), round(rect[1]), round(rect[2]) - 1, round(rect[3]) - 1], fill=(192, 192, 192))
    img.save(tmp_path / "r.png")
    box = mr.encode_box([round(v) for v in rect], W, H)
    s = mr.sample("r", tmp_path / "r.png", W, H, "t2r", "en", "Please locate <ref>spot</ref>.", mr.format_region("spot", [box]), "m")
    whole, cropped = (mr.RegionSFTData([s], tok, cfg, 4096, False, aug, 0.5, 0, base_prompt=False) for aug in (False, True))
    mean, std = torch.tensor(cfg.image_mean).view(3, 1, 1), torch.tensor(cfg.image_std).view(3, 1, 1)
    crops = set()
    for data, epoch in [(whole, 0)] + [(cropped, e) for e in range(8)]:  # measured: <= 1.15 units; padded: 24-97
        b = data.batch([0], epoch)
        answer = tok.decode(b["labels"][0][b["labels"][0] != lm.IGNORE_INDEX])
        (_, (enc,)), = mr.parse_regions(answer)
        crops.add(tuple(enc))
        x = ((b["pixel_values"][0] * std + mean)[0] * 255 - 64).numpy() / 128  # 0 background, 1 rectangle
        cy, cx = int((enc[1] + enc[3]) / 2 / 999 * 448), int((enc[0] + enc[2]) / 2 / 999 * 448)
        x1, x2 = _extent(x[cy])
        y1, y2 = _extent(x[:, cx])
        seen = [v / 448 * 999 for v in (x1, y1, x2, y2)]
        assert max(abs(a - e) for a, e in zip(seen, enc)) <= 1.5, (epoch, enc, seen)
    assert len(crops) > 5  # the crops really moved the box


# ---- scoring ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,iou", [
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # overlap 1, union 4 + 4 - 1
    ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # contained
    ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),  # touching edges
    ([0, 0, 2, 2], [5, 5, 6, 6], 0.0),
    ([1, 1, 3, 5], [1, 1, 3, 5], 1.0),
    ([0, 0, 3, 1], [1, 0, 2, 3], 1 / 5),  # cross: overlap 1, union 3 + 3 - 1
    ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # empty boxes (the released code would divide 0 by 0)
])
def test_box_iou_hand_computed(a, b, iou):
    assert mr.box_iou(a, b) == pytest.approx(iou) and mr.box_iou(b, a) == pytest.approx(iou)


def test_hungarian_equals_brute_force():
    assert mr.hungarian([[0.1, 0.2], [0.15, 0.9]]) == [(0, 1), (1, 0)]  # greedy (0, 0) would cost 1.0 instead of 0.35
    rng = random.Random(0)
    for _ in range(150):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        cost = [[rng.choice([rng.random(), 0.5, 1.0]) for _ in range(m)] for _ in range(n)]  # ties included
        pairs = mr.hungarian(cost)
        assert len(pairs) == min(n, m) and len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(n, m)
        got = sum(cost[r][c] for r, c in pairs)
        if n <= m:
            best = min(sum(cost[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j]][j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert got == pytest.approx(best)
    assert mr.hungarian([]) == [] and mr.hungarian([[]]) == []


def test_text_to_region_scores_hand_computed():
    W = H = 999  # pixels = grid units
    gt = mr.format_region("nodule", [[0, 0, 100, 100]])
    row = mr.score_t2r_row("<ref>nodule</ref><box>[[0, 0, 100, 100]]</box>", gt, W, H)
    assert row["iou"] == pytest.approx(1.0) and row["precision"] == row["recall"] == 1.0
    half = mr.score_t2r_row("<ref>nodule</ref><box>[[0, 0, 100, 50]]</box>", gt, W, H)
    assert half["iou"] == pytest.approx(0.5)
    best_of_two = mr.score_t2r_row("<ref>nodule</ref><box>[[500, 500, 600, 600], [0, 0, 100, 50]]</box>", gt, W, H)
    assert best_of_two["iou"] == pytest.approx(0.5) and best_of_two["precision"] == 0.5  # 1 match of 2 predicted
    none = mr.score_t2r_row("I cannot find it.", gt, W, H)
    assert none["iou"] == 0 and none["n_pred"] == 0
    scores = mr.score_t2r([{"score": r} for r in (row, half, best_of_two, none)])
    # IoU > t, strict as released: the two IoU-0.5 rows pass 0.25 but not 0.5
    assert scores["acc@0.25"] == 0.75 and scores["acc@0.5"] == 0.25 and scores["acc@0.75"] == 0.25
    assert scores["mean_iou"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4) and scores["no_box_answers"] == 1
    # several GT boxes: Hungarian pairs; precision over predictions, recall over ground truth (released: swapped)
    gt2 = mr.format_region("vessel", [[0, 0, 100, 100], [200, 200, 300, 300]])
    pred3 = "<ref>vessel</ref><box>[[200, 200, 300, 300], [0, 0, 100, 100], [0, 0, 50, 50]]</box>"
    multi = mr.score_t2r_row(pred3, gt2, W, H)
    assert (multi["precision"], multi["recall"], multi["iou"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(1.0))
    pred1 = "<ref>vessel</ref><box>[[0, 0, 100, 100]]</box>"
    one = mr.score_t2r_row(pred1, gt2, W, H)
    assert (one["precision"], one["recall"], one["iou"]) == (1.0, 0.5, pytest.approx(0.5))
    s = mr.score_t2r([{"score": multi}, {"score": one}])
    assert s["n_multi"] == 2 and s["multi_precision"] == pytest.approx((2 / 3 + 1) / 2) and s["multi_recall"] == 0.75
    # pixels: the same grid box in a 64 x 32 image
    assert mr.score_t2r_row(pred1, gt, 64, 32)["iou"] == pytest.approx(1.0)


def test_random_box_baseline_is_low():
    gt = mr.format_region("nodule", [[593, 234, 796, 437]])
    rows = [{"answer": gt, "width": 64, "height": 64, "score": {"n_gt": 1}} for _ in range(10)]
    base = mr.random_box_baseline(rows, draws=50)
    assert 0 <= base["acc@0.5"] < 0.05 and 0 < base["mean_iou"] < 0.15
    train = [mr.sample(str(i), "x.png", 64, 64, "t2r", "en", "q", mr.format_region("nodule", [b]), "m")
             for i, b in enumerate([[0, 0, 100, 100], [100, 100, 200, 200]])]
    rows = [{"answer": mr.format_region("nodule", [[50, 50, 150, 150]]), "width": 999, "height": 999},
            {"answer": mr.format_region("nodule", [[50, 50, 150, 100]]), "width": 999, "height": 999}]
    base = mr.prior_box_baselines(train, rows)
    assert base["mean_box"] == {"acc@0.25": 1.0, "acc@0.5": 0.5, "acc@0.75": 0.5, "mean_iou": 0.75}
    # best constant: each training box has 1 training box (itself) at IoU > 0.5; the first wins -> [0, 0, 100, 100]
    assert base["best_constant_box"]["mean_iou"] == pytest.approx((25 / 175 + 0.2) / 2)


def test_region_to_text_scores_and_bleu1_against_sacrebleu():
    assert mr.token_prf("Right Mandible", "right mandible") == (1.0, 1.0, 1.0)
    assert mr.token_prf("the right lung", "right mandible")[1] == 0.5
    assert mr.text_tokens("右上肺结节。") == ["右", "上", "肺", "结", "节"]  # Chinese by characters
    assert mr.token_prf("右上肺", "右上肺结节")[1] == pytest.approx(3 / 5)
    rows = [{"prediction": "<ref>liver</ref> [[1, 2, 3, 4]]", "answer": "liver"},
            {"prediction": "left kidney", "answer": "right kidney"},
            {"prediction": "右肾", "answer": "右肾"},
            {"prediction": "", "answer": "spleen"}]
    s = mr.score_r2t(rows)
    assert s["accuracy"] == 0.5 and s["recall"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    sacrebleu = pytest.importorskip("sacrebleu")
    preds = ["the left kidney is here", "liver liver liver", "右肾 上极", "a spleen"]
    refs = ["left kidney", "liver", "右肾上极见结节", "the spleen and the liver are normal"]
    ours = mr.score_r2t([{"prediction": p, "answer": g} for p, g in zip(preds, refs)])["bleu1"]
    joined = lambda xs: [" ".join(mr.text_tokens(x)) for x in xs]  # noqa: E731
    ref = sacrebleu.metrics.BLEU(max_ngram_order=1, tokenize="none").corpus_score(joined(preds), [joined(refs)]).score
    assert ours * 100 == pytest.approx(ref, abs=1e-6)


def _close(ours, released, tol, tag):
    assert abs((0.0 if ours is None else ours) - released) <= tol, (tag, ours, released)  # released: 0 for an empty set


R2T_KEYS = (("bleu1", "bleu1"), ("f1", "F1"), ("recall", "recall"), ("accuracy", "accuracy"))
VQA_KEYS = (("closed_accuracy", "closedQuestionsAccuracy"), ("open_recall", "openQuestionsRecall"),
            ("open_accuracy", "openQuestionsAccuracy"))


def test_medrega_scoring_reproduces_the_released_text_scorers():
    """--scoring medrega against the outputs of the released R2TEvaluator, cleanStr, VQAEvaluator and
    VQAEvaluatorChinese (xmed-lab/MedRegA, commit in the fixture) on every fixture case, alone and as one list.
    F1 within 1e-7 (the release adds 1e-8 to its denominator), BLEU within 1e-6 (torchmetrics computes in float32)."""
    d = RELEASED
    assert d["source"]["commit"] == "dfdb0dbbcca0b80b8f1c121c3c45490dc8001529"
    r2t = d["r2t"]
    for i, (row, exp) in enumerate(list(zip(r2t["rows"], r2t["per_row"])) + [(None, r2t["all"])]):
        got = mr.score_r2t([row] if row else r2t["rows"], "medrega")
        for k, kk in R2T_KEYS:
            _close(got[k], exp[kk], 1e-6, f"r2t {i} {k}")
    assert [mr.clean_str(p) for p, _ in d["vqa_en"]["clean_str"]] == [c for _, c in d["vqa_en"]["clean_str"]]
    for key, lang, seg in (("vqa_en", "en", ""), ("vqa_zh", "zh", "_split")):
        rows = [dict(r, lang=lang) for r in d[key]["rows"]]
        pad = {"prediction": d[key]["pad"]["pred_answer"], "answer": d[key]["pad"]["gt_answer"], "lang": lang}
        for i, (case, exp) in enumerate(list(zip([[r, pad] for r in rows], d[key]["per_row" + seg])) + [(rows, d[key]["all" + seg])]):
            got = mr.score_region_vqa(case, "medrega")
            for k, kk in VQA_KEYS:
                _close(got[k], exp[kk], 1e-9, f"{key} {i} {k}")
    # the default rules really differ: punctuation stripped, tags removed, corpus BLEU, 是/否 closed, no cleanStr
    ours, rel = mr.score_r2t(r2t["rows"]), r2t["all"]
    assert ours["recall"] > rel["recall"] + 0.1 and abs(ours["bleu1"] - rel["bleu1"]) > 0.05
    assert mr.score_region_vqa([{"prediction": "Yes.", "answer": "yes", "lang": "en"}])["closed_accuracy"] == 1.0
    assert mr.score_region_vqa([{"prediction": "Yes.", "answer": "yes", "lang": "en"}], "medrega")["closed_accuracy"] == 0.0
    assert mr.score_region_vqa([{"prediction": "是", "answer": "是", "lang": "zh"}], "medrega")["closed_accuracy"] is None


def test_medrega_scoring_reproduces_the_released_box_scorers():
    """Text-to-Region: single box (SingleRegionSingleObjectEvaluator, 4-decimal strings upstream), one object with
    several boxes (SingleRegionMultiObjectEvaluator: match at IoU 0.75, IoU pooled over its pairs) and several objects
    (MultiRegionMultiObjectEvaluator: 0.5, pooled over GT boxes); its "precision" is matches / GT = our recall."""
    def score(rows, scoring="medrega"):
        return mr.score_t2r([{"score": mr.score_t2r_row(r["prediction"], r["answer"], r["width"], r["height"], 0.5, scoring)}
                             for r in rows], 0.5, scoring)
    names = {"t2r_sm": (("multi_precision", "recall"), ("multi_recall", "precision"), ("multi_f1", "f1"), ("multi_iou", "iou")),
             "t2r_mm": (("multi_precision", "box_recall"), ("multi_recall", "box_pre"), ("multi_f1", "box_f1"),
                        ("multi_iou", "box_iou"))}
    ss = RELEASED["t2r_ss"]
    for i, (rows, exp) in enumerate([([r], e) for r, e in zip(ss["rows"], ss["per_row"])] + [(ss["rows"], ss["all"])]):
        got = score(rows)
        for k, kk in (("acc@0.25", "acc25"), ("acc@0.5", "acc50"), ("acc@0.75", "acc75"), ("mean_iou", "iou")):
            _close(got[k], exp[kk], 5e-5, f"ss {i} {k}")
    for key, keys in names.items():
        d = RELEASED[key]
        cases = [([r], e) for r, e in zip(d["rows"], d["per_row"]) if e is not None] + [(d["rows"], d["all"])]
        for i, (rows, exp) in enumerate(cases):
            got, exp = score(rows), exp.get("box", exp)
            for k, kk in keys:
                _close(got[k], exp[kk], 1e-6, f"{key} {i} {k}")
    assert abs(score(RELEASED["t2r_mm"]["rows"], "default")["multi_iou"] - RELEASED["t2r_mm"]["all"]["box"]["box_iou"]) > 0.01


# ---- loss and CoT --------------------------------------------------------------------------------------------

def test_position_weights_and_weighted_loss():
    model, tok = lm.load("tiny", template="chatml")
    mr.add_region_tokens(model, tok)
    table = mr.position_token_weights(tok, 2.0)
    assert mr.position_token_weights(tok, 1.0) is None
    for word, w in [(" left", 2.0), ("left", 2.0), (" upper", 2.0), ("15", 2.0), (" 15", 2.0), ("nodule", 1.0), ("<box>", 1.0)]:
        ids = tok.encode(word, add_special_tokens=False)
        assert len(ids) == 1 and table[ids[0]] == w, word
    samples = [s for s in mr.toy_samples(TOY / "train.json", ["t2r", "grounded"]) if s["task"] in ("t2r", "grounded")][:4]
    data = mr.RegionSFTData(samples, tok, model.config, 512, False, True, 0.8, 0, base_prompt=False)
    batch = data.batch([0, 1, 2, 3], epoch=0)
    loss, n = mr.weighted_sft_loss_sum(model, batch, None)
    ref = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                labels=batch["labels"]).loss  # plain mean CE over answer tokens
    torch.testing.assert_close(loss / n, ref)
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != lm.IGNORE_INDEX]  # the supervised (answer) tokens
    assert n == len(targets)
    wl, wn = mr.weighted_sft_loss_sum(model, batch, table)
    assert wn == table[targets].sum() and n < wn < 2 * n  # digits weigh 2, tags and names 1
    assert not torch.allclose(wl / wn, loss / n)
    # the step hands the loop the weighted sum and the weight total (the loop divides by the global batch's total)
    step = mr.region_sft_step(model, data, [0, 1, 2, 3], 0, table, torch.device("cpu"))
    torch.testing.assert_close(step["loss"], wl)
    torch.testing.assert_close(step["n"], wn)


def test_regional_cot_hints(monkeypatch):
    rows = [mr.sample("a", "x.png", 64, 64, "vqa", "en", "Where is the nodule?", "right upper lung", "m", "chest x-ray"),
            mr.sample("b", "y.png", 64, 64, "vqa", "en", "Is this normal?", "yes", "m", "fundus photograph")]
    asked = []

    def scripted(model, tokenizer, asks, *a, **k):
        asked.extend(asks)
        return ["<ref>nodule</ref><box>[[1, 2, 3, 4]]</box>", "no box here"][:len(asks)]

    monkeypatch.setattr(mr, "region_answers", scripted)
    hints = mr.regional_cot_hints(None, None, rows, {"chest x-ray": ["nodule"], "histopathology": ["tumor cluster"]},
                                  mr.Args(), 0, 1)
    assert [a["turns"][0][1] for a in asked] == ["Please locate <ref>nodule</ref> in this chest x-ray."]
    assert hints == {0: "Regions: <ref>nodule</ref><box>[[1, 2, 3, 4]]</box>. "}
    assert mr.prompt_turns(rows[0], hints[0], base_prompt=False)[0][1] == (
        "<image>\nRegions: <ref>nodule</ref><box>[[1, 2, 3, 4]]</box>. Where is the nodule? "
        "Answer the question using a single word or phrase.")


def test_lora_trains_adapters_and_the_grown_embeddings():
    model, tok = lm.load("tiny")
    mr.add_region_tokens(model, tok)
    lm.add_lora(model, 8, 16, 0.0)
    mr.set_trainable(model, lora=True, train_projector=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and "language_model.lm_head.weight" in trained
    assert "language_model.model.embed_tokens.weight" in trained  # the new <ref>/<box> rows must be able to move
    assert not any(n.startswith(("vision_tower.", "projector.")) for n in trained)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trained)
    mr.set_trainable(model, lora=False, train_projector=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "projector.0.weight" in trained and not any(n.startswith("vision_tower.") for n in trained)


def test_region_answers_in_chunks_equal_one_call_on_the_training_pixels():
    """Evaluation builds its jobs a few batches at a time (region_answers): the same answers as one
    lm.generate_sharded call over all rows, whose images are exactly the pixels training gives the model."""
    model, tok = lm.load("tiny", template="chatml")
    mr.add_region_tokens(model, tok)
    rows = mr.eval_rows(mr.toy_samples(TOY / "test.json", ["t2r"]), 1000)["t2r"][::7]  # 7 rows from all 3 domains
    args = mr.Args(eval_batch_size=1, eval_max_new_tokens=6, base_prompt="none")  # chunks of 4 rows: 4 + 3
    data = mr.RegionSFTData(rows, tok, model.config, 512, False, False, 0.8, 0, base_prompt=False)
    jobs = [{"turns": mr.prompt_turns({**r, "turns": r["turns"][:1]}, base_prompt=False),
             "images": [data.batch([i], 0)["pixel_values"][0]]} for i, r in enumerate(rows)]
    whole = lm.generate_sharded(model, tok, jobs, 1, max_new_tokens=6)
    assert mr.region_answers(model, tok, rows, args, 0, 1, "eval") == whole and len(set(whole)) > 1


# ---- the complete pipeline, --eval-only, and the fault suite (tests/faults.py) ---------------------------------

def _run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=500, env=faults.ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


FAST = ["--epochs", "0.2", "--batch-size", "8", "--micro-batch-size", "4", "--no-eval"]  # 4 steps of Text-to-Region


def test_complete_pipeline_torchrun_two_ranks_equals_one_rank(tmp_path):
    """Every stage of the default pipeline (evaluation before, SFT, evaluation after, box baselines, llava-hf export)
    from an empty --out under torchrun with 2 ranks, and on one rank with 2 micro-batches of accumulation, with crops,
    position weights, VQA and regional CoT on: equal losses and exported weights (atol 1e-5), the same answers
    (lm.generate_sharded's batches do not depend on the number of ranks); the export carries the region tokens."""
    args = ["--tasks", "t2r,grounded,vqa", "--regional-cot", "--epochs", "0.015", "--batch-size", "8",
            "--micro-batch-size", "4", "--position-weight", "2", "--augment", "yes", "--eval-limit", "4",
            "--eval-batch-size", "2", "--eval-max-new-tokens", "24"]
    faults._in_process(mr, ["--out", str(tmp_path / "one")] + args)  # one rank in this process: no second python start
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "medrega.py",
          "--out", str(tmp_path / "two")] + args)
    res = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert res[0]["summary"]["steps"] == 2 and res[0]["summary"]["train_samples"] == 1260
    for key in ("before", "after"):
        assert set(res[0][key]) == {"t2r", "vqa", "vqa_regional_cot"} and res[0][key] == res[1][key]
    assert {"random_box_baseline", "mean_box_baseline", "best_constant_box_baseline"} <= set(res[0])
    preds = [json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("one", "two")]
    for task in ("t2r", "vqa", "vqa_regional_cot"):
        assert [p["prediction"] for p in preds[0][task]] == [p["prediction"] for p in preds[1][task]]
    curves = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if r["phase"] == "sft"]
              for d in ("one", "two")]
    assert len(curves[0]) == 2
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), atol=1e-5, rtol=0)
    a = load_file(str(tmp_path / "one" / "llava_hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "llava_hf" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "one" / "llava_hf")
    assert a["lm_head.weight"].shape[0] == len(tok) and all(t in tok.get_vocab() for t in mr.REGION_TOKENS)
    base, _ = lm.load("tiny")  # the full LLM trained (its FSDP root parameters included), the ViT stayed frozen
    assert (a["model.language_model.layers.0.mlp.up_proj.weight"] - base.language_model.model.layers[0].mlp.up_proj.weight).abs().max() > 1e-6
    assert torch.equal(a["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"],
                       base.vision_tower.encoder.layers[0].mlp.fc1.weight)


def test_eval_only_on_the_export_gives_the_runs_numbers(tmp_path):
    """--eval-only reads no training data (--data names a missing file), trains and writes no weights, and on the
    llava-hf export of a run (its tokenizer already holds the region tokens) gives that run's after-training answers."""
    eval_args = ["--tasks", "t2r", "--eval-data", str(TOY), "--eval-limit", "4", "--eval-batch-size", "2"]
    run = faults._in_process(mr, ["--epochs", "0.05", "--batch-size", "8", "--micro-batch-size", "8",
                                  "--no-eval-before", "--out", str(tmp_path / "run")] + eval_args)
    res = faults._in_process(mr, ["--eval-only", "--model", str(tmp_path / "run" / "llava_hf"), "--template", "chatml",
                                  "--base-prompt", "none", "--data", str(tmp_path / "none.jsonl"),
                                  "--out", str(tmp_path / "eval")] + eval_args)
    assert set(res) == {"eval", "random_box_baseline"} and res["eval"]["t2r"]["n"] == 4
    assert not (tmp_path / "eval" / "sft").exists() and not (tmp_path / "eval" / "llava_hf").exists()
    answers = [[p["prediction"] for p in json.loads((tmp_path / d / "predictions.json").read_text())["t2r"]]
               for d in ("run", "eval")]
    assert answers[0] == answers[1] and res["eval"] == run["after"]


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    """With crops and position weights: the resumed run re-draws the same crops (seeded by seed, epoch, sample)."""
    faults.check_kill_and_resume("medrega.py", FAST + ["--augment", "yes", "--position-weight", "2", "--save-every", "1"],
                                 "sft", tmp_path, kill_at=2)


def test_nonfinite_step_stops_or_is_skipped(monkeypatch, tmp_path):
    faults.check_nonfinite(mr, FAST, "sft", tmp_path, monkeypatch, call=3)  # 3rd micro-batch = step 2


# "stalled" (SIGSTOP, caught by --dist-timeout-s in the copied setup_distributed) runs once, in test_reliability.py
@pytest.mark.parametrize("fault", ["killed"])
def test_a_dead_or_stalled_rank_makes_the_other_exit(tmp_path, fault):
    faults.check_dead_rank("medrega.py", ["--epochs", "5", "--batch-size", "8", "--micro-batch-size", "4", "--no-eval"],
                           "sft", tmp_path, fault)


def test_bad_data_and_bad_model_exit_2_with_one_line(tmp_path):
    """A MedRegInstruct record whose image is missing, and a model folder without config.json."""
    bad = tmp_path / "bad" / "text2region.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"id": "a", "image": "nowhere.png", "width": 64, "height": 64, "conversations": [
        {"from": "human", "value": "<image>\nPlease locate <ref>nodule</ref>."},
        {"from": "gpt", "value": "<ref>nodule</ref><box>[[1, 2, 3, 4]]</box>"}]}) + "\n")
    faults.check_bad_inputs("medrega.py", FAST, ["--data", str(bad)], tmp_path)
