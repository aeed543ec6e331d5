#!/usr/bin/env python
"""Deterministic generator of the MedVLM-Recipes *toy* medical VQA dataset.

    python data/make_toy.py            # writes data/toy/ and data/tokenizer/

Everything is synthetic (numpy + pillow, fixed seed, no network) and released
under CC0.  Re-running the script reproduces byte-identical files on the same
software stack (numpy / pillow / zlib / tokenizers versions).

Images: 64x64 RGB PNGs in three domains, about half of each domain abnormal:

* radiology      ("chest x-ray"):      grey chest, two dark lung ellipses, bright
  spine; abnormal images contain a bright round *nodule* (radius 6-9 px) in one
  lung zone.  LOCATION CONVENTION: image convention, i.e. the lung drawn on the
  image-left side is called "left" (NOT the radiological convention).  Upper /
  lower = upper / lower half of that lung.
* pathology      ("histopathology"):   pink stroma with small purple nuclei;
  abnormal images contain a large dark-purple irregular *tumor cluster* in one
  image quadrant ("upper left", "upper right", "lower left", "lower right").
* ophthalmology  ("fundus photograph"): dark background, orange-red fundus disc,
  bright optic disc, red vessels; abnormal images contain a bright yellow
  *exudate* or a dark red *hemorrhage* blob in one image quadrant.

Boxes are [x1, y1, x2, y2] integer pixel-edge coordinates of the lesion mask
(x1 = first column, x2 = last column + 1), so 0 <= x1 < x2 <= 64.

Tokenizer (data/tokenizer/): byte-level BPE, vocab 2048, trained on the toy text
plus chat-template strings and the numbers 0-999.  Special tokens (ids 0-7):
<unk> <s> </s> <pad> <image> <|im_start|> <|im_end|> <|endoftext|>; no BOS/EOS
post-processing.  Pre-tokenizer = Split(each Han character) + ByteLevel(
add_prefix_space=False, trim_offsets=False, use_regex=True), ByteLevel decoder,
so decode(encode(s)) == s for any string.

Only arithmetic + sqrt and integer/uniform random draws are used for the
images (no exp/sin/normal sampling) so results do not depend on SIMD libm
variants.
"""
import json
import os

import numpy as np
from PIL import Image

SEED = 20240611
SIZE = 64
SPLITS = {"train": 120, "test": 30}  # images per domain
HERE = os.path.dirname(os.path.abspath(__file__))
TOY = os.path.join(HERE, "toy")
TOK_DIR = os.path.join(HERE, "tokenizer")

QUADS = [("upper left", "左上"), ("upper right", "右上"), ("lower left", "左下"), ("lower right", "右下")]

DOMAINS = [
    dict(domain="radiology", abbr="rad", modality="chest x-ray", modality_zh="胸部X光片", modality_noun="a chest x-ray",
         lesions=[("nodule", "结节")],
         locations=[("left upper lung", "左上肺"), ("left lower lung", "左下肺"),
                    ("right upper lung", "右上肺"), ("right lower lung", "右下肺")],
         loc_fmt="in the {loc}", loc_fmt_zh="{loc}",
         distractors=["effusion", "fracture", "pneumothorax", "cardiomegaly"]),
    dict(domain="pathology", abbr="path", modality="histopathology", modality_zh="组织病理切片",
         modality_noun="a histopathology slide",
         lesions=[("tumor cluster", "肿瘤细胞团")],
         locations=QUADS, loc_fmt="in the {loc} region", loc_fmt_zh="{loc}区域",
         distractors=["necrosis", "granuloma", "calcification", "fibrosis"]),
    dict(domain="ophthalmology", abbr="oph", modality="fundus photograph", modality_zh="眼底照片",
         modality_noun="a fundus photograph",
         lesions=[("exudate", "渗出"), ("hemorrhage", "出血")],
         locations=QUADS, loc_fmt="in the {loc} quadrant", loc_fmt_zh="{loc}象限",
         distractors=["drusen", "neovascularization", "cotton wool spot", "macular hole"]),
]
EXTRA_MODALITIES = ["MRI", "CT scan", "ultrasound"]

# ----------------------------------------------------------------------------- reports
REPORTS = {
    ("radiology", True): [
        ("Chest x-ray. A round nodule is seen in the {loc}. The remaining lung fields are clear.",
         "胸部X光片。{loc_zh}可见一圆形结节。其余肺野清晰。"),
        ("Chest x-ray. There is a well-defined nodule in the {loc}, about {size} pixels across. No other abnormality is seen.",
         "胸部X光片。{loc_zh}见一边界清楚的结节，直径约{size}像素。未见其他异常。"),
        ("Chest x-ray showing a solitary nodule in the {loc}. Follow-up is suggested.",
         "胸部X光片示{loc_zh}单发结节。建议随访。"),
    ],
    ("radiology", False): [
        ("Chest x-ray. Both lungs are clear. No abnormality is seen.",
         "胸部X光片。双肺清晰。未见异常。"),
        ("Chest x-ray. The lung fields are clear and the spine is midline. Normal study.",
         "胸部X光片。双肺野清晰，脊柱居中。检查未见异常。"),
        ("Normal chest x-ray. No nodule is identified.",
         "胸部X光片正常。未见结节。"),
    ],
    ("pathology", True): [
        ("Histopathology. A dense cluster of dark tumor cells is present in the {loc} region. The surrounding tissue shows scattered normal nuclei.",
         "组织病理切片。{loc_zh}区域可见密集的深染肿瘤细胞团。周围组织可见散在正常细胞核。"),
        ("Histopathology slide with a tumor cluster in the {loc} region, about {size} pixels across.",
         "组织病理切片，{loc_zh}区域见肿瘤细胞团，大小约{size}像素。"),
        ("Histopathology. An irregular tumor cluster occupies the {loc} region. Findings are suspicious for malignancy.",
         "组织病理切片。{loc_zh}区域见不规则肿瘤细胞团。考虑恶性可能。"),
    ],
    ("pathology", False): [
        ("Histopathology. Pink stroma with evenly scattered small nuclei. No tumor cluster is seen.",
         "组织病理切片。粉染间质中散在均匀的小细胞核。未见肿瘤细胞团。"),
        ("Histopathology slide showing normal tissue. No abnormality is seen.",
         "组织病理切片示正常组织。未见异常。"),
        ("Normal histopathology. No atypical cell cluster is identified.",
         "组织病理切片正常。未见异型细胞团。"),
    ],
    ("ophthalmology", True): [
        ("Fundus photograph. {desc} is seen in the {loc} quadrant. The optic disc and vessels appear normal.",
         "眼底照片。{loc_zh}象限可见{desc_zh}。视盘及血管未见异常。"),
        ("Fundus photograph showing {a_lesion} in the {loc} quadrant, about {size} pixels across.",
         "眼底照片示{loc_zh}象限{lesion_zh}，大小约{size}像素。"),
        ("Fundus photograph. There is {a_lesion} in the {loc} quadrant of the retina. Further examination is advised.",
         "眼底照片。视网膜{loc_zh}象限见{lesion_zh}。建议进一步检查。"),
    ],
    ("ophthalmology", False): [
        ("Fundus photograph. The optic disc, vessels and retina appear normal. No abnormality is seen.",
         "眼底照片。视盘、血管及视网膜未见异常。"),
        ("Normal fundus photograph. No exudate or hemorrhage is identified.",
         "眼底照片正常。未见渗出或出血。"),
        ("Fundus photograph showing a healthy retina with a bright optic disc.",
         "眼底照片示视网膜健康，视盘明亮。"),
    ],
}
OPH_DESC = {"exudate": ("A bright yellow exudate", "亮黄色渗出"),
            "hemorrhage": ("A dark red hemorrhage", "暗红色出血")}

# Tokenizer: extra strings so chat templates tokenize compactly.
TEMPLATE_STRINGS = [
    "[INST]", "[/INST]", "USER:", "ASSISTANT:", "VUSER:", "<|user|>", "<|assistant|>",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "Also, the artificial intelligence assistant is a curious virtual user. The virtual user asks complex questions that are relevant to the content in the image, for example, asking about background knowledge of the objects in the image, asking to discuss about events happening in the image, etc. Again, do not ask about uncertain details.",
    "Answer the questions.", "Answer with the option's letter from the given choices directly.",
    "A. B. C. D.", "<ref>", "</ref>", "<box>", "</box>",
    "Please describe this picture.", "You are a helpful medical assistant.", "：，。？",
    "Describe the image.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
VOCAB_SIZE = 2048


def a_an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


# ----------------------------------------------------------------------------- drawing helpers
YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5  # pixel centres


def disc(cx, cy, r, soft=1.0):
    """Anti-aliased disc coverage in [0, 1] (arithmetic + sqrt only)."""
    d = np.sqrt((XX - cx) ** 2 + (YY - cy) ** 2)
    return np.clip((r - d) / soft + 0.5, 0.0, 1.0)


def ellipse(cx, cy, rx, ry, soft=0.08):
    q = np.sqrt(((XX - cx) / rx) ** 2 + ((YY - cy) / ry) ** 2)
    return np.clip((1.0 - q) / soft + 0.5, 0.0, 1.0)


def segment(x0, y0, x1, y1, width):
    """Coverage of a thick line segment."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((XX - x0) * dx + (YY - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d = np.sqrt((XX - (x0 + t * dx)) ** 2 + (YY - (y0 + t * dy)) ** 2)
    return np.clip(width / 2.0 - d + 0.5, 0.0, 1.0)


def paint(img, mask, color):
    m = mask[..., None]
    return img * (1.0 - m) + np.asarray(color, dtype=np.float64) * m


def noise(rng, amp, channels=1):
    """Mild film grain: integer grey levels in [-L, L] (L = round(amp * 60)) on 2x2 blocks, same for
    all channels.  Integer draws only; kept coarse/low so the PNGs stay small (~4-5 KB)."""
    lv = max(1, int(round(amp * 60)))
    g = rng.integers(-lv, lv + 1, (SIZE // 2, SIZE // 2, 1)).astype(np.float64) / 255.0
    return np.repeat(np.repeat(np.repeat(g, 2, axis=0), 2, axis=1), channels, axis=2)


def mask_box(mask):
    ys, xs = np.nonzero(mask > 0.5)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def u(rng, lo, hi):
    return lo + (hi - lo) * float(rng.random())


def quad_center(rng, qi, margin=18, jitter=3.0):
    """Centre of image quadrant qi (0 UL, 1 UR, 2 LL, 3 LR) with jitter."""
    cx = margin if qi in (0, 2) else SIZE - margin
    cy = margin if qi in (0, 1) else SIZE - margin
    return cx + u(rng, -jitter, jitter), cy + u(rng, -jitter, jitter)


def blob(rng, cx, cy, r, n):
    """Irregular blob: union of n discs around (cx, cy); overall radius ~r."""
    m = disc(cx, cy, r * 0.75)
    for _ in range(n):
        ox, oy = u(rng, -r * 0.45, r * 0.45), u(rng, -r * 0.45, r * 0.45)
        m = np.maximum(m, disc(cx + ox, cy + oy, u(rng, r * 0.45, r * 0.7)))
    return m


# ----------------------------------------------------------------------------- domain renderers
def draw_radiology(rng, lesion, loc_idx):
    g = np.full((SIZE, SIZE), 0.0) + u(rng, 0.12, 0.18)
    body = ellipse(32 + u(rng, -1, 1), 36, u(rng, 30, 33), u(rng, 34, 38), soft=0.1)
    g = g * (1 - body) + u(rng, 0.62, 0.70) * body
    lungs = []
    for side in (-1, 1):
        cx = 32 + side * u(rng, 12.5, 14.0)
        cy = 31 + u(rng, -1.5, 1.5)
        rx, ry = u(rng, 9.0, 10.5), u(rng, 19.0, 21.0)
        lungs.append((cx, cy, rx, ry))
        lm = ellipse(cx, cy, rx, ry, soft=0.15)
        g = g * (1 - lm) + u(rng, 0.26, 0.32) * lm
    # ribs: faint horizontal bands inside the lungs
    for k in range(5):
        y = 15 + 7 * k + u(rng, -1, 1)
        g = g + 0.05 * segment(6, y, 58, y + 2, 1.5) * body
    spine = segment(32 + u(rng, -0.7, 0.7), 2, 32 + u(rng, -0.7, 0.7), 62, u(rng, 3.0, 4.0))
    g = g * (1 - spine) + 0.85 * spine
    heart = ellipse(33 + u(rng, -1, 1), 44, u(rng, 8, 10), u(rng, 6, 8), soft=0.3)
    g = g * (1 - 0.5 * heart) + 0.7 * 0.5 * heart
    box = None
    if lesion is not None:
        side = 0 if loc_idx in (0, 1) else 1            # image-left lung = "left"
        upper = loc_idx in (0, 2)
        cx, cy, rx, ry = lungs[side]
        r = u(rng, 6.0, 9.0)
        px = cx + u(rng, -2.0, 2.0)
        py = cy - ry * 0.45 + u(rng, -2, 2) if upper else cy + ry * 0.45 + u(rng, -2, 2)
        m = disc(px, py, r)
        g = g * (1 - m) + u(rng, 0.88, 0.95) * m
        box = mask_box(m)
    g = g[..., None] + noise(rng, 0.05)
    return np.repeat(g, 3, axis=2), box


def draw_pathology(rng, lesion, loc_idx):
    base = np.array([0.95, 0.74, 0.84]) + np.array([u(rng, -0.03, 0.03)] * 3)
    img = np.zeros((SIZE, SIZE, 3)) + base
    # stroma texture: a few paler / darker fibres
    for _ in range(6):
        x0, y0 = u(rng, 0, 64), u(rng, 0, 64)
        img = paint(img, 0.35 * segment(x0, y0, x0 + u(rng, -20, 20), y0 + u(rng, -20, 20), u(rng, 1.5, 3.0)),
                    [0.88, 0.58, 0.74])
    for _ in range(int(rng.integers(45, 65))):
        img = paint(img, disc(u(rng, 0, 64), u(rng, 0, 64), u(rng, 1.2, 2.2)),
                    [0.50 + u(rng, -0.05, 0.05), 0.30, 0.66])
    box = None
    if lesion is not None:
        cx, cy = quad_center(rng, loc_idx, margin=17)
        m = blob(rng, cx, cy, u(rng, 9.0, 11.0), int(rng.integers(5, 8)))
        img = paint(img, m, [0.28, 0.07, 0.38])
        for _ in range(25):  # crowded dark nuclei inside the cluster
            img = paint(img, disc(cx + u(rng, -9, 9), cy + u(rng, -9, 9), u(rng, 1.3, 2.2)) * m,
                        [0.14, 0.02, 0.22])
        box = mask_box(m)
    img = img + noise(rng, 0.04, 3)
    return img, box


def draw_ophthalmology(rng, lesion, loc_idx):
    img = np.zeros((SIZE, SIZE, 3)) + 0.03
    R = u(rng, 28.5, 30.5)
    cx, cy = 32 + u(rng, -1, 1), 32 + u(rng, -1, 1)
    fund = disc(cx, cy, R)
    d2 = ((XX - cx) ** 2 + (YY - cy) ** 2) / (R * R)
    shade = (1.0 - 0.45 * d2)[..., None]
    color = np.array([0.86 + u(rng, -0.04, 0.04), 0.36 + u(rng, -0.04, 0.04), 0.14])
    img = img * (1 - fund[..., None]) + (color * shade) * fund[..., None]
    eye_right = bool(rng.integers(0, 2))
    odx = cx + (14.0 if eye_right else -14.0) + u(rng, -1, 1)
    ody = cy + u(rng, -1.5, 1.5)
    for k in range(int(rng.integers(4, 7))):  # vessels radiate from the optic disc
        ex = odx + (-1 if eye_right else 1) * u(rng, 12, 36)
        ey = ody + (u(rng, -26, -8) if k % 2 == 0 else u(rng, 8, 26))
        img = paint(img, segment(odx, ody, ex, ey, u(rng, 1.0, 1.8)) * fund, [0.55, 0.07, 0.05])
    img = paint(img, disc(odx, ody, u(rng, 4.5, 5.5), soft=1.5), [1.0, 0.92, 0.62])
    box = None
    if lesion is not None:
        lx, ly = quad_center(rng, loc_idx, margin=19, jitter=2.5)
        ly = ly - 3 if loc_idx in (0, 1) else ly + 3  # keep clear of the optic disc row
        m = blob(rng, lx, ly, u(rng, 7.0, 9.0), int(rng.integers(3, 6))) * fund
        col = [1.0, 0.95, 0.30] if lesion == "exudate" else [0.30, 0.02, 0.02]
        img = paint(img, m, col)
        box = mask_box(m)
    img = img + noise(rng, 0.035, 3) * fund[..., None]
    return img, box


DRAW = {"radiology": draw_radiology, "pathology": draw_pathology, "ophthalmology": draw_ophthalmology}


def to_png(img, path):
    arr = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="RGB").save(path, format="PNG", optimize=False, compress_level=9)


# ----------------------------------------------------------------------------- balanced choices
def balanced(rng, n, k, offset=0):
    """n values in range(k), as balanced as possible (odd remainder starts at `offset`), shuffled."""
    vals = np.array([(i + offset) % k for i in range(n)])
    return [int(v) for v in rng.permutation(vals)]


def make_mc(question, correct, others, pos):
    opts = list(others)
    opts.insert(pos, correct)
    return {"question": question, "options": opts, "answer": correct, "answer_label": "ABCD"[pos]}


# ----------------------------------------------------------------------------- records
def build_split(split, n_per_domain):
    records = []
    split_id = list(SPLITS).index(split)
    for di, D in enumerate(DOMAINS):
        dom = D["domain"]
        rng = np.random.default_rng([SEED, split_id, di])
        abnormal = [bool(v) for v in rng.permutation([i < (n_per_domain + 1) // 2 for i in range(n_per_domain)])]
        n_ab = sum(abnormal)
        n_no = n_per_domain - n_ab
        locs = balanced(rng, n_ab, 4)
        lesion_ids = balanced(rng, n_ab, len(D["lesions"]))
        loc_yes = balanced(rng, n_ab, 2, 1)    # closed "Is the X in the <loc>?"  1 -> yes
        mod_yes = balanced(rng, n_no, 2, 0)    # closed "Is this a <modality>?"  1 -> yes
        mc_pos = balanced(rng, 2 * n_per_domain, 4)
        ai = ni = 0
        for idx in range(n_per_domain):
            irng = np.random.default_rng([SEED, split_id, di, idx, 1])
            trng = np.random.default_rng([SEED, split_id, di, idx, 2])  # text choices
            ab = abnormal[idx]
            if ab:
                li, lesion_i = locs[ai], lesion_ids[ai]
                lesion, lesion_zh = D["lesions"][lesion_i]
                loc, loc_zh = D["locations"][li]
            else:
                li = lesion_i = None
                lesion, lesion_zh = D["lesions"][int(trng.integers(len(D["lesions"])))]
                loc = loc_zh = None
            img, box = DRAW[dom](irng, lesion if ab else None, li)
            fname = f"images/{split}_{dom}_{idx:04d}.png"
            to_png(img, os.path.join(TOY, fname))

            findings = []
            if ab:
                findings.append({"name": lesion, "name_zh": lesion_zh, "location": loc,
                                 "location_zh": loc_zh, "box": box})
            # report
            tmpl, tmpl_zh = REPORTS[(dom, ab)][int(trng.integers(3))]
            size = max(box[2] - box[0], box[3] - box[1]) if ab else 0
            fmt = dict(loc=loc, loc_zh=loc_zh, size=size, lesion_zh=lesion_zh,
                       a_lesion=a_an(lesion) if ab else "",
                       desc=OPH_DESC.get(lesion, ("", ""))[0], desc_zh=OPH_DESC.get(lesion, ("", ""))[1])
            report, report_zh = tmpl.format(**fmt), tmpl_zh.format(**fmt)

            yes, no = ("yes", "是"), ("no", "否")
            qa = []

            def add(q, a, t, qz, az):
                qa.append({"question": q, "answer": a, "answer_type": t, "question_zh": qz, "answer_zh": az})

            yn = yes if ab else no
            add(f"Is there {a_an(lesion)} in this image?", yn[0], "CLOSED", f"图像中有{lesion_zh}吗？", yn[1])
            yn = no if ab else yes
            add("Is this image normal?", yn[0], "CLOSED", "这张图像正常吗？", yn[1])
            if ab:
                add(f"Where is the {lesion} located?", loc, "OPEN", f"{lesion_zh}位于哪里？", loc_zh)
            add("What imaging modality is this?", D["modality"], "OPEN", "这是什么成像方式？", D["modality_zh"])
            add("What abnormality is seen?", lesion if ab else "none", "OPEN", "可见什么异常？",
                lesion_zh if ab else "无")
            if ab:
                if loc_yes[ai]:
                    ql, ql_zh, yn = loc, loc_zh, yes
                else:
                    others = [L for j, L in enumerate(D["locations"]) if j != li]
                    ql, ql_zh = others[int(trng.integers(len(others)))]
                    yn = no
                add(f"Is the {lesion} {D['loc_fmt'].format(loc=ql)}?", yn[0], "CLOSED",
                    f"{lesion_zh}位于{D['loc_fmt_zh'].format(loc=ql_zh)}吗？", yn[1])
            else:
                if mod_yes[ni]:
                    m, mz, yn = D["modality_noun"], D["modality_zh"], yes
                else:
                    oth = [(E["modality_noun"], E["modality_zh"]) for E in DOMAINS if E is not D]
                    m, mz = oth[int(trng.integers(len(oth)))]
                    yn = no
                add(f"Is this {m}?", yn[0], "CLOSED", f"这是{mz}吗？", yn[1])

            # multiple choice
            mc = []
            if len(D["lesions"]) > 1:
                pool = [L for L, _ in D["lesions"]] + ["no abnormality"]
                pool.append(D["distractors"][int(trng.integers(len(D["distractors"])))])
            else:
                pool = [lesion, "no abnormality"] + [D["distractors"][j] for j in
                                                     sorted(trng.choice(len(D["distractors"]), 2, replace=False))]
            correct = lesion if ab else "no abnormality"
            others = [o for o in pool if o != correct]
            others = [others[j] for j in trng.permutation(len(others))]
            mc.append(make_mc("Which finding is present?", correct, others, mc_pos[2 * idx]))
            if ab:
                others = [L for j, (L, _) in enumerate(D["locations"]) if j != li]
                others = [others[j] for j in trng.permutation(len(others))]
                mc.append(make_mc(f"Where is the {lesion} located?", loc, others, mc_pos[2 * idx + 1]))
            else:
                others = [E["modality"] for E in DOMAINS if E is not D]
                others.append(EXTRA_MODALITIES[int(trng.integers(len(EXTRA_MODALITIES)))])
                others = [others[j] for j in trng.permutation(len(others))]
                mc.append(make_mc("What imaging modality is this?", D["modality"], others, mc_pos[2 * idx + 1]))

            conv = []
            for k, item in enumerate(qa):
                q = ("<image>\n" if k == 0 else "") + item["question"]
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": item["answer"]}]
            conv += [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": report}]

            records.append({
                "id": f"toy_{split}_{D['abbr']}_{idx:04d}", "image": fname, "domain": dom,
                "modality": D["modality"], "width": SIZE, "height": SIZE, "abnormal": ab,
                "findings": findings, "report": report, "report_zh": report_zh,
                "qa": qa, "mc": mc, "conversations": conv,
            })
            if ab:
                ai += 1
            else:
                ni += 1
    return records


def vqa_records(records):
    out = []
    for r in records:
        for k, item in enumerate(r["qa"]):
            out.append({"id": f"{r['id']}_q{k}", "image": r["image"], "domain": r["domain"],
                        "answer_type": item["answer_type"],
                        "conversations": [{"from": "human", "value": "<image>\n" + item["question"]},
                                          {"from": "gpt", "value": item["answer"]}]})
    return out


def mc_records(records):
    out = []
    for r in records:
        for item in r["mc"]:
            out.append({"question": item["question"], "options": item["options"], "answer": item["answer"],
                        "answer_label": item["answer_label"], "dataset_name": f"toy_{r['domain']}",
                        "image": [r["image"]], "question_type": "closed"})
    return out


def dump(obj, path):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_corpus(all_records):
    texts = []
    for r in all_records:
        texts += [r["report"], r["report_zh"], r["modality"]]
        for f in r["findings"]:
            texts += [f["name"], f["name_zh"], f["location"], f["location_zh"]]
        for q in r["qa"]:
            texts += [q["question"], q["answer"], q["question_zh"], q["answer_zh"]]
        for m in r["mc"]:
            texts += [m["question"]] + m["options"]
    texts += TEMPLATE_STRINGS * 5  # weighted so chat-template words become single tokens
    texts += [str(i) for i in range(1000)]
    return texts


def build_tokenizer(all_records):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Chinese (Han) characters are isolated first, so Chinese is tokenized per character instead of
    # the ByteLevel regex turning whole Han runs (entire clauses) into single tokens; then the standard
    # GPT-2 ByteLevel split (newline / spaces / punctuation never merge with letters).  Lossless.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(all_records), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>", extra_special_tokens=SPECIAL_TOKENS[4:],
                                 clean_up_tokenization_spaces=False, model_max_length=2048)
    os.makedirs(TOK_DIR, exist_ok=True)
    hf.save_pretrained(TOK_DIR)
    return hf


# ----------------------------------------------------------------------------- main
def main():
    os.makedirs(os.path.join(TOY, "images"), exist_ok=True)
    splits = {s: build_split(s, n) for s, n in SPLITS.items()}
    for s, recs in splits.items():
        dump(recs, os.path.join(TOY, f"{s}.json"))
        dump(vqa_records(recs), os.path.join(TOY, f"{s}_vqa.json"))
    dump(mc_records(splits["test"]), os.path.join(TOY, "test_mc.json"))
    hf = build_tokenizer(splits["train"] + splits["test"])

    # summary
    for s, recs in splits.items():
        closed = [q["answer"] for r in recs for q in r["qa"] if q["answer_type"] == "CLOSED"]
        n_qa = sum(len(r["qa"]) for r in recs)
        n_mc = sum(len(r["mc"]) for r in recs)
        labels = [m["answer_label"] for r in recs for m in r["mc"]]
        print(f"[{s}] images={len(recs)} qa(vqa records)={n_qa} mc={n_mc} "
              f"closed={len(closed)} yes={closed.count('yes')} no={closed.count('no')} "
              f"open={n_qa - len(closed)} mc_labels=" + ",".join(f"{c}:{labels.count(c)}" for c in "ABCD"))
        for D in DOMAINS:
            rs = [r for r in recs if r["domain"] == D["domain"]]
            print(f"    {D['domain']:14s} n={len(rs)} abnormal={sum(r['abnormal'] for r in rs)}"
                  f" ({sum(r['abnormal'] for r in rs) / len(rs):.2f})")
    print(f"tokenizer: vocab={len(hf)} -> {os.path.relpath(TOK_DIR, os.getcwd())}")


if __name__ == "__main__":
    main()
