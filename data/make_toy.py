#!/usr/bin/env python
"""Deterministic generator of the MedVLM-Recipes *toy* medical VQA dataset (v2: the failure modes the methods fix).

    python data/make_toy.py                  # writes data/toy/ and data/tokenizer/
    python data/make_toy.py --out /tmp/x     # the same files under /tmp/x/toy and /tmp/x/tokenizer (tests)

Everything is synthetic (numpy + pillow, fixed seed, no network) and released under CC0.  Re-running the script
reproduces byte-identical files on the same software stack (numpy / pillow / zlib / tokenizers versions).
data/toy/README.md describes the files, the splits and every failure mode with how it is measured; the rules
that README states as functions (the toy hallucination rule, the toy judge) are data/toy_oracles.py's, the toy blind
baselines tests/test_toy.py's, all checked there against the files written here.

Images: 64x64 RGB PNGs in three domains, half of each domain abnormal:

* radiology      ("chest x-ray"):      grey chest, two dark lung ellipses, bright spine; abnormal images contain a
  bright round *nodule* (radius 6-9 px) in one lung zone.  LOCATION CONVENTION: image convention, i.e. the lung
  drawn on the image-left side is called "left" (NOT the radiological convention).  Upper / lower = upper / lower
  half of that lung.
* pathology      ("histopathology"):   pink stroma with small purple nuclei; abnormal images contain a large
  dark-purple irregular *tumor cluster* in one image quadrant ("upper left", "upper right", "lower left",
  "lower right").
* ophthalmology  ("fundus photograph"): dark background, orange-red fundus disc, bright optic disc, red vessels;
  abnormal images contain a bright yellow *exudate* or a dark red *hemorrhage* blob in one image quadrant.

Each image is drawn from three independent random streams: the anatomy (background), the lesion, the film grain.
A knowledge-base "twin" reuses a query image's anatomy stream with another lesion (or none) and another grain, so
it looks like the query and differs in the clinically relevant detail only.

Boxes are [x1, y1, x2, y2] integer pixel-edge coordinates of the lesion mask (x1 = first column, x2 = last
column + 1), so 0 <= x1 < x2 <= 64.

Tokenizer (data/tokenizer/): byte-level BPE, vocab 2048, trained on the toy text plus chat-template strings and
the numbers 0-999.  Special tokens (ids 0-7): <unk> <s> </s> <pad> <image> <|im_start|> <|im_end|> <|endoftext|>;
no BOS/EOS post-processing.  Pre-tokenizer = Split(each Han character) + ByteLevel(add_prefix_space=False,
trim_offsets=False, use_regex=True), ByteLevel decoder, so decode(encode(s)) == s for any string.

Only arithmetic + sqrt and integer/uniform random draws are used for the images (no exp/sin/normal sampling) so
results do not depend on SIMD libm variants.
"""
import argparse
import json
import os
import shutil

import numpy as np
from PIL import Image

SEED = 20240611
SIZE = 64
# images per domain and split. train: the warm-start / SFT split, the only one with the failure modes (a)-(b);
# pref: the images of prefs_train.json (train-like, clean; never in the warm start); val: clean, for choosing
# defaults (and prefs_val.json); test: clean, never tuned on; ragpt: clean RAG-PT training images with KB twins.
SPLITS = {"train": 120, "pref": 40, "val": 32, "test": 32, "ragpt": 16}
CLEAN = ("pref", "val", "test", "ragpt")  # phrasing independent of the answer, reports faithful to the image
KB_QUERIES = ("val", "test", "ragpt")  # splits whose images get knowledge-base twins
KB_NO_MATCH = 0.5  # share of query images (per split, domain, normal / abnormal) whose `same` twin is withheld
PRIOR = 0.9  # train: share of closed questions whose phrasing is the one correlated with their answer
HALLUCINATED_SHARE = 0.25  # train: share of normal images whose report names a lesion and a location
WRONG_SIDE_SHARE = 0.25  # train: share of abnormal images whose report names the mirrored location
HERE = os.path.dirname(os.path.abspath(__file__))

QUADS = [("upper left", "左上"), ("upper right", "右上"), ("lower left", "左下"), ("lower right", "右下")]

DOMAINS = [
    dict(domain="radiology", abbr="rad", modality="chest x-ray", modality_zh="胸部X光片", modality_noun="a chest x-ray",
         lesions=[("nodule", "结节")],
         locations=[("left upper lung", "左上肺"), ("left lower lung", "左下肺"),
                    ("right upper lung", "右上肺"), ("right lower lung", "右下肺")],
         mirror=[2, 3, 0, 1],  # other lung, same zone
         loc_fmt="in the {loc}", loc_fmt_zh="{loc}",
         distractors=["effusion", "pneumothorax"], body_part="chest"),
    dict(domain="pathology", abbr="path", modality="histopathology", modality_zh="组织病理切片",
         modality_noun="a histopathology slide",
         lesions=[("tumor cluster", "肿瘤细胞团")],
         locations=QUADS, mirror=[1, 0, 3, 2], loc_fmt="in the {loc} region", loc_fmt_zh="{loc}区域",
         distractors=["necrosis", "fibrosis"], body_part="tissue"),
    dict(domain="ophthalmology", abbr="oph", modality="fundus photograph", modality_zh="眼底照片",
         modality_noun="a fundus photograph",
         lesions=[("exudate", "渗出"), ("hemorrhage", "出血")],
         locations=QUADS, mirror=[1, 0, 3, 2], loc_fmt="in the {loc} quadrant", loc_fmt_zh="{loc}象限",
         distractors=["drusen"], body_part="eye"),
]
EXTRA_MODALITY = "MRI"  # the fourth option of the modality multiple choice (fixed: the option set carries no hint)
LESION_WORDS = sorted({L for D in DOMAINS for L, _ in D["lesions"]} | {x for D in DOMAINS for x in D["distractors"]})
LOCATION_WORDS = sorted({L for D in DOMAINS for L, _ in D["locations"]})
NEGATIONS = ("no", "not", "without", "none", "neither", "nor")  # a sentence with one of these words names nothing

# ----------------------------------------------------------------------------- questions
# Closed kinds have two phrasings each. In train the phrasing predicts the answer (PRIOR of the questions whose
# answer is yes use phrasing YES_PHRASING[kind], PRIOR of the no-questions the other one); in the clean splits the
# phrasing is independent of the answer and every exact question string is answered yes and no equally often.
PHRASINGS = {
    "presence": [("Is there {a_lesion} in this image?", "图像中有{lesion_zh}吗？"),
                 ("Does this image show {a_lesion}?", "这张图像显示{lesion_zh}吗？")],
    "normal": [("Is this image normal?", "这张图像正常吗？"), ("Is this a normal study?", "这是一次正常的检查吗？")],
    "location": [("Is the {name} {where}?", "{name_zh}位于{where_zh}吗？"),
                 ("Is the {name} located {where}?", "{name_zh}是否位于{where_zh}？")],
    "modality": [("Is this {noun}?", "这是{noun_zh}吗？"), ("Was this image acquired as {noun}?", "这张图像是{noun_zh}吗？")],
}
YES_PHRASING = {"presence": 0, "normal": 1, "location": 0, "modality": 1}
CLOSED_WORDING = {"yes": ["yes, it is", "Yes.", "yes, that is correct"],
                  "no": ["no, it is not", "No.", "no, that is not the case"]}
REPORT_QUESTION = "Describe the image."

# ----------------------------------------------------------------------------- reports
# A report = intro + (lesion sentence) + extra sentences + (closing), drawn per image, with image-grounded details
# (size from the box, nodule density, cellularity, optic-disc side). Lesion sentences always contain the lesion
# name and the exact location phrase and never a negation word; other sentences never name a location phrase, and
# name a lesion only under a negation -- the grammar the toy hallucination rule (README) relies on.
S = {
    "radiology": dict(
        intro=[("Chest x-ray.", "胸部X光片。"), ("Frontal chest x-ray.", "正位胸部X光片。"),
               ("Chest radiograph, frontal view.", "胸部X线片，正位。")],
        lesion=[("A {dens} round nodule of about {size} pixels is seen in the {loc}.",
                 "{loc_zh}可见一{dens_zh}圆形结节，直径约{size}像素。"),
                ("There is a {dens} well-defined nodule in the {loc}, about {size} pixels across.",
                 "{loc_zh}见一{dens_zh}边界清楚的结节，直径约{size}像素。"),
                ("A solitary {dens} nodule measuring {size} pixels projects over the {loc}.",
                 "{loc_zh}见单发{dens_zh}结节，大小{size}像素。")],
        extra_ab=[("The remaining lung fields are clear.", "其余肺野清晰。"), ("The heart size is normal.", "心影大小正常。"),
                  ("The spine is midline.", "脊柱居中。"), ("No other abnormality is seen.", "未见其他异常。")],
        close_ab=[("Follow-up is suggested.", "建议随访。"), ("CT correlation is recommended.", "建议CT进一步检查。"),
                  ("Comparison with prior films is advised.", "建议与既往片对比。")],
        extra_no=[("Both lungs are clear.", "双肺清晰。"), ("The spine is midline.", "脊柱居中。"),
                  ("The heart size is normal.", "心影大小正常。"), ("No nodule is identified.", "未见结节。"),
                  ("No focal lesion is seen.", "未见局灶性病变。"), ("The costophrenic angles are sharp.", "肋膈角锐利。"),
                  ("The lung fields are {dens_no}.", "肺野{dens_no_zh}。")],
        close_no=[("Normal study.", "检查未见异常。"), ("No abnormality is seen.", "未见异常。")]),
    "pathology": dict(
        intro=[("Histopathology.", "组织病理切片。"), ("Histopathology slide, H&E stain.", "组织病理切片，HE染色。"),
               ("Microscopy of a tissue section.", "组织切片镜检。")],
        lesion=[("A dense tumor cluster of dark cells about {size} pixels across is present in the {loc} region.",
                 "{loc_zh}区域可见直径约{size}像素的密集深染肿瘤细胞团。"),
                ("An irregular tumor cluster of {size} pixels occupies the {loc} region.",
                 "{loc_zh}区域见{size}像素大小的不规则肿瘤细胞团。"),
                ("There is a tumor cluster in the {loc} region, about {size} pixels across.",
                 "{loc_zh}区域见肿瘤细胞团，大小约{size}像素。")],
        extra_ab=[("The surrounding stroma is {cell}.", "周围间质{cell_zh}。"),
                  ("The nuclei outside the cluster are small and regular.", "团块外细胞核小而规则。"),
                  ("Findings are suspicious for malignancy.", "考虑恶性可能。")],
        close_ab=[("Immunohistochemistry is suggested.", "建议免疫组化检查。"),
                  ("Correlation with the clinical history is advised.", "建议结合临床病史。")],
        extra_no=[("Pink stroma with evenly scattered small nuclei.", "粉染间质中散在均匀的小细胞核。"),
                  ("The tissue is {cell}.", "组织{cell_zh}。"), ("The nuclei are small and regular.", "细胞核小而规则。"),
                  ("No tumor cluster is seen.", "未见肿瘤细胞团。"),
                  ("No atypical cell cluster is identified.", "未见异型细胞团。"),
                  ("The architecture is preserved.", "组织结构保存完好。")],
        close_no=[("Normal tissue.", "正常组织。"), ("No abnormality is seen.", "未见异常。")]),
    "ophthalmology": dict(
        intro=[("Fundus photograph.", "眼底照片。"), ("Colour fundus photograph.", "彩色眼底照片。"),
               ("Retinal fundus image.", "视网膜眼底图像。")],
        lesion=[("A {desc} of about {size} pixels is seen in the {loc} quadrant.",
                 "{loc_zh}象限可见约{size}像素的{desc_zh}。"),
                ("There is a {desc} in the {loc} quadrant of the retina, about {size} pixels across.",
                 "视网膜{loc_zh}象限见{desc_zh}，大小约{size}像素。"),
                ("The {loc} quadrant shows a {size}-pixel {desc}.", "{loc_zh}象限示{size}像素大小的{desc_zh}。")],
        extra_ab=[("The optic disc lies on the {side} of the image.", "视盘位于图像{side_zh}侧。"),
                  ("The vessels appear normal.", "血管未见异常。"), ("The optic disc appears normal.", "视盘未见异常。")],
        close_ab=[("Further examination is advised.", "建议进一步检查。"), ("Follow-up imaging is suggested.", "建议随访复查。")],
        extra_no=[("The optic disc, vessels and retina appear normal.", "视盘、血管及视网膜未见异常。"),
                  ("The optic disc lies on the {side} of the image.", "视盘位于图像{side_zh}侧。"),
                  ("The retina is healthy.", "视网膜健康。"), ("No exudate or hemorrhage is identified.", "未见渗出或出血。"),
                  ("The vessels are of normal calibre.", "血管管径正常。"), ("The macula appears normal.", "黄斑未见异常。")],
        close_no=[("Normal fundus.", "眼底未见异常。"), ("No abnormality is seen.", "未见异常。")]),
}
DESC = {"exudate": ("bright yellow exudate", "亮黄色渗出"), "hemorrhage": ("dark red hemorrhage", "暗红色出血")}
DETAIL_WORDS = {"dense": "致密", "faint": "淡薄", "sparsely cellular": "细胞稀疏", "moderately cellular": "细胞中等密度",
                "left": "左", "right": "右", "clear": "清晰", "well aerated": "充气良好"}

# ----------------------------------------------------------------------------- PubMed-style captions (issue 19)
CAPTION_SHARES = {"usable": 0.65, "near_duplicate": 0.10, "duplicate": 0.075, "off_topic": 0.10, "too_short": 0.075}
FIGURE_LEADS = ["Figure {n}.", "Fig. {n}.", "Figure {n}{p}.", "({p})", "Fig. {n}{p}:"]
# a usable caption = lead + subject + (patient) + verb + finding + (tail): every subject names >= 1 lexicon term
# (data/medical_terms.txt) and every finding >= 2, so a usable caption alone has >= 3 terms (a term counts once:
# a pathology subject and finding that both say "tissue" give 2, which happens for 4 captions; tests/test_toy.py)
CAPTION_PARTS = {
    "radiology": dict(
        subject=["{view} chest x-ray", "Chest radiograph, {view} view,", "{view} radiograph of the chest",
                 "Plain chest film, {view} projection,"],
        abnormal=["a {size}-pixel nodule in the {loc}", "a solitary pulmonary nodule in the {loc} ({size} pixels)",
                  "a well-circumscribed nodule of the {loc}", "a round opacity in the {loc}, consistent with a nodule"],
        normal=["clear lungs, a normal heart size and a midline spine", "no nodule, effusion or consolidation",
                "normal lung fields and a sharp pleural outline", "unremarkable lungs and spine"],
        symptoms=["cough", "chest pain", "shortness of breath", "fever", "weight loss", "haemoptysis"]),
    "pathology": dict(
        subject=["Histopathology (H&E)", "H&E-stained section of {organ} tissue", "Biopsy specimen of the {organ}",
                 "Microscopy of a {organ} biopsy"],
        abnormal=["a tumor cluster of crowded dark nuclei in the {loc} region",
                  "an irregular cluster of malignant cells in the {loc} of the field",
                  "a {size}-pixel tumor nest in the {loc} region with atypical nuclei",
                  "carcinoma cells forming a cluster in the {loc} region"],
        normal=["evenly scattered small nuclei and preserved tissue architecture", "normal cells without tumor",
                "regular nuclei and no malignant cells", "benign tissue with small uniform nuclei"],
        symptoms=["a palpable lump", "an abnormal scan", "weight loss", "bleeding"]),
    "ophthalmology": dict(
        subject=["Fundus photograph", "Colour fundus image", "Retinal photograph", "Fundus image of the {eye} eye"],
        abnormal=["a {desc} in the {loc} quadrant of the retina",
                  "a {lesion} ({size} pixels) in the {loc} quadrant near the retinal vessels",
                  "a {desc} in the {loc} quadrant; the optic disc is normal", "a {size}-pixel {lesion} of the {loc} retina"],
        normal=["a normal optic disc, vessels and retina", "a healthy retina and a sharp optic disc",
                "no exudate or hemorrhage", "normal vessels and macula"],
        symptoms=["diabetes", "hypertension", "blurred vision", "floaters", "sudden vision loss"]),
}
CAPTION_PATIENT = ["of a {age}-year-old {sex}", "in a {age}-year-old {sex} with {symptom}",
                   "from a patient with {symptom}", "obtained at {time}"]
CAPTION_VERBS = ["showing", "demonstrating", "revealing", "with"]
CAPTION_TAILS = ["(arrow)", "(arrowhead)", "; compare with Figure {m}", ", before treatment", ", at {weeks}-week follow-up"]
TIMES = ["admission", "follow-up", "screening", "the first visit"]
CAPTION_SHORT = {"radiology": ["Chest film.", "Radiograph.", "Frontal view."],
                 "pathology": ["H&E, x40.", "Biopsy.", "Histology."],
                 "ophthalmology": ["Fundus.", "Right eye.", "Left eye."]}
CAPTION_OFF_TOPIC = ["Flow chart of patient inclusion and exclusion in the study.",
                     "Photograph of the research team in front of the hospital building.",
                     "Timeline of the study visits from enrolment to the final follow-up.",
                     "Bar chart of the number of publications per year since 2010.",
                     "Map showing the locations of the participating centres.",
                     "Screenshot of the online questionnaire used for data collection.",
                     "Schematic of the funding and reporting structure of the consortium.",
                     "Photograph of the waiting room after the renovation."]
CONTEXTS = {
    "radiology": ["A {age}-year-old {sex} presented with {symptom} for {weeks} weeks. {finding} Laboratory tests were "
                  "unremarkable and the patient was referred for further imaging.",
                  "Patients with {symptom} underwent chest radiography at admission. {finding} The images were read "
                  "by two radiologists blinded to the clinical data.",
                  "In this retrospective series, chest x-ray was the first examination. {finding} Follow-up was "
                  "scheduled after {weeks} weeks."],
    "pathology": ["A {age}-year-old {sex} underwent biopsy of the {organ} after an abnormal scan. {finding} The "
                  "specimen was fixed in formalin and stained with H&E.",
                  "Tissue samples were obtained during surgery. {finding} Immunohistochemistry was performed on "
                  "serial sections.",
                  "The slides were reviewed by a pathologist. {finding} The final diagnosis was discussed at the "
                  "tumour board."],
    "ophthalmology": ["A {age}-year-old {sex} with {symptom2} attended the eye clinic. {finding} Visual acuity was "
                      "recorded at each visit.",
                      "Fundus photographs were taken after pupil dilation. {finding} Grading followed the study "
                      "protocol.",
                      "Diabetic patients were screened with retinal photography. {finding} Referable cases were "
                      "sent to an ophthalmologist."],
}
ORGANS = ["breast", "colon", "liver", "lymph node", "prostate", "skin"]

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
    all channels.  Integer draws only; kept coarse/low so the PNGs stay small (~4 KB)."""
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
# draw_X(bg, les, grain, lesion, loc_idx) -> (float image, box or None, details for the report). bg draws the
# anatomy only (the same whatever the lesion), les the lesion, grain the film grain.
def draw_radiology(bg, les, grain, lesion, loc_idx):
    g = np.full((SIZE, SIZE), 0.0) + u(bg, 0.12, 0.18)
    body = ellipse(32 + u(bg, -1, 1), 36, u(bg, 30, 33), u(bg, 34, 38), soft=0.1)
    g = g * (1 - body) + u(bg, 0.62, 0.70) * body
    lungs = []
    lung_grey = []
    for side in (-1, 1):
        cx = 32 + side * u(bg, 12.5, 14.0)
        cy = 31 + u(bg, -1.5, 1.5)
        rx, ry = u(bg, 9.0, 10.5), u(bg, 19.0, 21.0)
        lungs.append((cx, cy, rx, ry))
        lm = ellipse(cx, cy, rx, ry, soft=0.15)
        lung_grey.append(u(bg, 0.26, 0.32))
        g = g * (1 - lm) + lung_grey[-1] * lm
    for k in range(5):  # ribs: faint horizontal bands inside the lungs
        y = 15 + 7 * k + u(bg, -1, 1)
        g = g + 0.05 * segment(6, y, 58, y + 2, 1.5) * body
    spine = segment(32 + u(bg, -0.7, 0.7), 2, 32 + u(bg, -0.7, 0.7), 62, u(bg, 3.0, 4.0))
    g = g * (1 - spine) + 0.85 * spine
    heart = ellipse(33 + u(bg, -1, 1), 44, u(bg, 8, 10), u(bg, 6, 8), soft=0.3)
    g = g * (1 - 0.5 * heart) + 0.7 * 0.5 * heart
    box, details = None, {"dens_no": "clear" if max(lung_grey) < 0.29 else "well aerated"}
    if lesion is not None:
        side = 0 if loc_idx in (0, 1) else 1            # image-left lung = "left"
        upper = loc_idx in (0, 2)
        cx, cy, rx, ry = lungs[side]
        r = u(les, 6.0, 9.0)
        px = cx + u(les, -2.0, 2.0)
        py = cy - ry * 0.45 + u(les, -2, 2) if upper else cy + ry * 0.45 + u(les, -2, 2)
        m = disc(px, py, r)
        level = u(les, 0.86, 0.95)
        g = g * (1 - m) + level * m
        box = mask_box(m)
        details["dens"] = "dense" if level >= 0.905 else "faint"
    g = g[..., None] + noise(grain, 0.05)
    return np.repeat(g, 3, axis=2), box, details


def draw_pathology(bg, les, grain, lesion, loc_idx):
    base = np.array([0.95, 0.74, 0.84]) + np.array([u(bg, -0.03, 0.03)] * 3)
    img = np.zeros((SIZE, SIZE, 3)) + base
    for _ in range(6):  # stroma texture: a few paler / darker fibres
        x0, y0 = u(bg, 0, 64), u(bg, 0, 64)
        img = paint(img, 0.35 * segment(x0, y0, x0 + u(bg, -20, 20), y0 + u(bg, -20, 20), u(bg, 1.5, 3.0)),
                    [0.88, 0.58, 0.74])
    n_nuclei = int(bg.integers(45, 65))
    for _ in range(n_nuclei):
        img = paint(img, disc(u(bg, 0, 64), u(bg, 0, 64), u(bg, 1.2, 2.2)), [0.50 + u(bg, -0.05, 0.05), 0.30, 0.66])
    box, details = None, {"cell": "sparsely cellular" if n_nuclei < 55 else "moderately cellular"}
    if lesion is not None:
        cx, cy = quad_center(les, loc_idx, margin=17)
        m = blob(les, cx, cy, u(les, 9.0, 11.0), int(les.integers(5, 8)))
        img = paint(img, m, [0.28, 0.07, 0.38])
        for _ in range(25):  # crowded dark nuclei inside the cluster
            img = paint(img, disc(cx + u(les, -9, 9), cy + u(les, -9, 9), u(les, 1.3, 2.2)) * m, [0.14, 0.02, 0.22])
        box = mask_box(m)
    img = img + noise(grain, 0.04, 3)
    return img, box, details


def draw_ophthalmology(bg, les, grain, lesion, loc_idx):
    img = np.zeros((SIZE, SIZE, 3)) + 0.03
    R = u(bg, 28.5, 30.5)
    cx, cy = 32 + u(bg, -1, 1), 32 + u(bg, -1, 1)
    fund = disc(cx, cy, R)
    d2 = ((XX - cx) ** 2 + (YY - cy) ** 2) / (R * R)
    shade = (1.0 - 0.45 * d2)[..., None]
    color = np.array([0.86 + u(bg, -0.04, 0.04), 0.36 + u(bg, -0.04, 0.04), 0.14])
    img = img * (1 - fund[..., None]) + (color * shade) * fund[..., None]
    eye_right = bool(bg.integers(0, 2))
    odx = cx + (14.0 if eye_right else -14.0) + u(bg, -1, 1)
    ody = cy + u(bg, -1.5, 1.5)
    for k in range(int(bg.integers(4, 7))):  # vessels radiate from the optic disc
        ex = odx + (-1 if eye_right else 1) * u(bg, 12, 36)
        ey = ody + (u(bg, -26, -8) if k % 2 == 0 else u(bg, 8, 26))
        img = paint(img, segment(odx, ody, ex, ey, u(bg, 1.0, 1.8)) * fund, [0.55, 0.07, 0.05])
    img = paint(img, disc(odx, ody, u(bg, 4.5, 5.5), soft=1.5), [1.0, 0.92, 0.62])
    box, details = None, {"side": "right" if eye_right else "left"}
    if lesion is not None:
        lx, ly = quad_center(les, loc_idx, margin=19, jitter=2.5)
        ly = ly - 3 if loc_idx in (0, 1) else ly + 3  # keep clear of the optic disc row
        m = blob(les, lx, ly, u(les, 7.0, 9.0), int(les.integers(3, 6))) * fund
        col = [1.0, 0.95, 0.30] if lesion == "exudate" else [0.30, 0.02, 0.02]
        img = paint(img, m, col)
        box = mask_box(m)
    img = img + noise(grain, 0.035, 3) * fund[..., None]
    return img, box, details


DRAW = {"radiology": draw_radiology, "pathology": draw_pathology, "ophthalmology": draw_ophthalmology}


def to_png(img, path):
    arr = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="RGB").save(path, format="PNG", optimize=False, compress_level=9)


# ----------------------------------------------------------------------------- text builders
def lesion_sentence(D, trng, lesion, loc_i, size, dens):
    loc, loc_zh = D["locations"][loc_i]
    desc, desc_zh = DESC.get(lesion, ("", ""))
    en, zh = S[D["domain"]]["lesion"][int(trng.integers(3))]
    f = dict(loc=loc, loc_zh=loc_zh, size=size, dens=dens, dens_zh=DETAIL_WORDS.get(dens, ""), desc=desc,
             desc_zh=desc_zh)
    return en.format(**f), zh.format(**f)


def make_report(D, trng, lesion, loc_i, size, details):
    """(report, report_zh) for an image with lesion index `lesion` at location index `loc_i` (None: a normal report)."""
    bank = S[D["domain"]]
    fmt = {k: v for k, v in details.items()}
    fmt.update({k + "_zh": DETAIL_WORDS.get(v, v) for k, v in details.items()})
    parts = [bank["intro"][int(trng.integers(len(bank["intro"])))]]
    if lesion is not None:
        parts.append(lesion_sentence(D, trng, D["lesions"][lesion][0], loc_i, size, details.get("dens", "dense")))
        extra, close = bank["extra_ab"], bank["close_ab"]
        n_extra = int(trng.integers(1, 3))
    else:
        extra, close = bank["extra_no"], bank["close_no"]
        n_extra = int(trng.integers(2, 4))
    parts += [extra[j] for j in trng.choice(len(extra), n_extra, replace=False)]
    if trng.random() < 0.6:
        parts.append(close[int(trng.integers(len(close)))])
    en = " ".join(p[0] for p in parts).format(**fmt)
    zh = "".join(p[1] for p in parts).format(**fmt)
    return en, zh


def closed_question(kind, phr, **f):
    en, zh = PHRASINGS[kind][phr]
    return en.format(**f), zh.format(**f)


def cycle_assign(rng, n, values):
    """n values cycling through `values` (exactly balanced when len(values) divides n), in a seeded random order."""
    vals = [values[i % len(values)] for i in range(n)]
    return [vals[j] for j in rng.permutation(n)]


def prior_phrasing(rng, answers, kind):
    """Train: the phrasing of each closed question of one kind. Of the questions with answer a, exactly
    round(PRIOR * n_a) get a's prior phrasing (YES_PHRASING for yes, the other for no), the rest the other one."""
    out = [0] * len(answers)
    for a in ("yes", "no"):
        idx = [i for i, x in enumerate(answers) if x == a]
        k = int(round(PRIOR * len(idx)))
        prior = YES_PHRASING[kind] if a == "yes" else 1 - YES_PHRASING[kind]
        for r, j in enumerate(rng.permutation(len(idx))):
            out[idx[j]] = prior if r < k else 1 - prior
    return out


def prior_answer(kind, phr):
    return "yes" if phr == YES_PHRASING[kind] else "no"


# ----------------------------------------------------------------------------- image plans
def plan_domain(split, di, n):
    """Per-image plans of one domain and split: lesion, location and the closed-question design.
    Clean splits are exactly balanced per exact question string (when n/2 is a multiple of 8: val, test, ragpt);
    train follows the language prior."""
    D = DOMAINS[di]
    rng = np.random.default_rng([SEED, list(SPLITS).index(split), di, 7])
    nL, n_ab = len(D["lesions"]), n // 2
    specs = [(i % nL, (i // nL) % 4) for i in range(n_ab)]  # (lesion index, location index), balanced
    specs = [specs[j] for j in rng.permutation(n_ab)]
    plans = [{"ab": True, "lesion": L, "loc": loc} for L, loc in specs] + \
            [{"ab": False, "lesion": None, "loc": None} for _ in range(n - n_ab)]
    ab = [p for p in plans if p["ab"]]
    no = [p for p in plans if not p["ab"]]
    if split in CLEAN:
        for L in range(nL):  # presence: own lesion named, phrasing balanced per lesion
            grp = [p for p in ab if p["lesion"] == L]
            for p, phr in zip(grp, cycle_assign(rng, len(grp), [0, 1])):
                p["presence"] = (L, phr)
        for p, v in zip(no, cycle_assign(rng, len(no), [(L, phr) for L in range(nL) for phr in (0, 1)])):
            p["presence"] = v
        for grp in (ab, no):
            for p, phr in zip(grp, cycle_assign(rng, len(grp), [0, 1])):
                p["normal"] = phr
        shift = [int(rng.integers(1, 4)), int(rng.integers(1, 4))]  # queried location of a "no": loc + shift[phr]
        for loc in range(4):
            grp = [p for p in ab if p["loc"] == loc]
            for p, (yes, phr) in zip(grp, cycle_assign(rng, len(grp), [(1, 0), (0, 1), (1, 1), (0, 0)])):
                p["location"] = (loc if yes else (loc + shift[phr]) % 4, phr)
        others = [j for j in range(3) if j != di]
        pattern = [(di, 0), (di, 1), (others[0], 0), (others[0], 1), (di, 0), (di, 1), (others[1], 0), (others[1], 1)]
        for p, v in zip(no, cycle_assign(rng, len(no), pattern)):
            p["modality"] = v
    else:
        for p in no:
            p["presence"] = (int(rng.integers(nL)), None)
        for p in ab:
            p["presence"] = (p["lesion"], None)
        ans = ["yes" if p["ab"] else "no" for p in plans]
        for p, phr in zip(plans, prior_phrasing(rng, ans, "presence")):
            p["presence"] = (p["presence"][0], phr)
        for p, phr in zip(plans, prior_phrasing(rng, ["no" if p["ab"] else "yes" for p in plans], "normal")):
            p["normal"] = phr
        yes_loc = cycle_assign(rng, len(ab), [1, 0])
        q_loc = [p["loc"] if y else int((p["loc"] + rng.integers(1, 4)) % 4) for p, y in zip(ab, yes_loc)]
        for p, q, phr in zip(ab, q_loc, prior_phrasing(rng, ["yes" if y else "no" for y in yes_loc], "location")):
            p["location"] = (q, phr)
        yes_mod = cycle_assign(rng, len(no), [1, 0])
        q_mod = [di if y else [j for j in range(3) if j != di][int(rng.integers(2))] for y in yes_mod]
        for p, q, phr in zip(no, q_mod, prior_phrasing(rng, ["yes" if y else "no" for y in yes_mod], "modality")):
            p["modality"] = (q, phr)
    # multiple choice: correct letter balanced per kind (finding: all images; location: abnormal; modality: normal)
    for p, pos in zip(plans, cycle_assign(rng, len(plans), [0, 1, 2, 3])):
        p["mc_finding"] = pos
    for grp in (ab, no):
        for p, pos in zip(grp, cycle_assign(rng, len(grp), [0, 1, 2, 3])):
            p["mc_second"] = pos
    order = rng.permutation(n)
    return [plans[j] for j in order]


# ----------------------------------------------------------------------------- records
def image_streams(split, di, idx):
    base = [SEED, list(SPLITS).index(split), di, idx]
    return (np.random.default_rng(base + [1]), np.random.default_rng(base + [3]), np.random.default_rng(base + [4]))


def render(D, bg, les, grain, lesion_i, loc_i, fname, toy_dir):
    lesion = D["lesions"][lesion_i][0] if lesion_i is not None else None
    img, box, details = DRAW[D["domain"]](bg, les, grain, lesion, loc_i)
    to_png(img, os.path.join(toy_dir, fname))
    findings = []
    if lesion is not None:
        (name, name_zh), (loc, loc_zh) = D["lesions"][lesion_i], D["locations"][loc_i]
        findings.append({"name": name, "name_zh": name_zh, "location": loc, "location_zh": loc_zh, "box": box})
    size = max(box[2] - box[0], box[3] - box[1]) if box else 0
    return findings, size, details


def build_split(split, n_per_domain, toy_dir, seen_reports):
    records = []
    sid = list(SPLITS).index(split)
    for di, D in enumerate(DOMAINS):
        dom = D["domain"]
        plans = plan_domain(split, di, n_per_domain)
        n_hall = int(round(HALLUCINATED_SHARE * sum(not p["ab"] for p in plans)))
        n_wrong = int(round(WRONG_SIDE_SHARE * sum(p["ab"] for p in plans)))
        erng = np.random.default_rng([SEED, sid, di, 8])
        noisy = set()
        if split == "train":
            no_idx = [i for i, p in enumerate(plans) if not p["ab"]]
            ab_idx = [i for i, p in enumerate(plans) if p["ab"]]
            noisy = {no_idx[j] for j in erng.permutation(len(no_idx))[:n_hall]} | \
                    {ab_idx[j] for j in erng.permutation(len(ab_idx))[:n_wrong]}
        for idx, p in enumerate(plans):
            trng = np.random.default_rng([SEED, sid, di, idx, 2])  # text choices
            fname = f"images/{split}_{dom}_{idx:04d}.png"
            findings, size, details = render(D, *image_streams(split, di, idx), p["lesion"], p["loc"], fname, toy_dir)
            ab = p["ab"]
            lesion, lesion_zh = D["lesions"][p["lesion"]] if ab else (None, None)
            loc, loc_zh = D["locations"][p["loc"]] if ab else (None, None)
            # report (train: maybe a hallucinated lesion or the mirrored side; clean splits: never seen in train)
            error, clean = None, None
            for attempt in range(100):
                report, report_zh = make_report(D, trng, p["lesion"] if ab else None, p["loc"], size, details)
                if split == "train" or report not in seen_reports:
                    break
            else:
                raise RuntimeError(f"no unseen report for {split} {dom} {idx}")
            if idx in noisy:
                clean = report
                if ab:
                    error = "wrong_side"
                    report, report_zh = make_report(D, trng, p["lesion"], D["mirror"][p["loc"]], size, details)
                else:
                    error = "hallucinated_lesion"
                    fake = dict(details, dens="dense" if trng.random() < 0.5 else "faint")
                    report, report_zh = make_report(D, trng, int(trng.integers(len(D["lesions"]))),
                                                    int(trng.integers(4)), int(trng.integers(12, 19)), fake)
            yes, no = ("yes", "是"), ("no", "否")
            qa = []

            def add(q, a, t, qz, az, kind, phr=None):
                item = {"question": q, "answer": a, "answer_type": t, "question_zh": qz, "answer_zh": az, "kind": kind}
                if phr is not None:
                    item.update(phrasing=phr, prior_answer=prior_answer(kind, phr))
                qa.append(item)

            Lq, phr = p["presence"]
            qname, qname_zh = D["lesions"][Lq]
            yn = yes if (ab and Lq == p["lesion"]) else no
            q_en, q_zh = closed_question("presence", phr, a_lesion=a_an(qname), lesion_zh=qname_zh)
            add(q_en, yn[0], "CLOSED", q_zh, yn[1], "presence", phr)
            yn = no if ab else yes
            q_en, q_zh = closed_question("normal", p["normal"])
            add(q_en, yn[0], "CLOSED", q_zh, yn[1], "normal", p["normal"])
            if ab:
                add(f"Where is the {lesion} located?", loc, "OPEN", f"{lesion_zh}位于哪里？", loc_zh, "where")
            add("What imaging modality is this?", D["modality"], "OPEN", "这是什么成像方式？", D["modality_zh"], "modality_open")
            add("What abnormality is seen?", lesion if ab else "none", "OPEN", "可见什么异常？",
                lesion_zh if ab else "无", "abnormality")
            if ab:
                ql, phr = p["location"]
                name, name_zh = (lesion, lesion_zh) if len(D["lesions"]) == 1 else ("lesion", "病灶")
                wl, wl_zh = D["locations"][ql]
                yn = yes if ql == p["loc"] else no
                q_en, q_zh = closed_question("location", phr, name=name, name_zh=name_zh,
                                             where=D["loc_fmt"].format(loc=wl), where_zh=D["loc_fmt_zh"].format(loc=wl_zh))
                add(q_en, yn[0], "CLOSED", q_zh, yn[1], "location", phr)
            else:
                qm, phr = p["modality"]
                E = DOMAINS[qm]
                yn = yes if qm == di else no
                q_en, q_zh = closed_question("modality", phr, noun=E["modality_noun"], noun_zh=E["modality_zh"])
                add(q_en, yn[0], "CLOSED", q_zh, yn[1], "modality", phr)

            # multiple choice: fixed option sets per domain, so the options alone do not hint at the answer
            finding_pool = [L for L, _ in D["lesions"]] + ["no abnormality"] + D["distractors"]
            correct = lesion if ab else "no abnormality"
            mc = [make_mc("Which finding is present?", correct, finding_pool, trng, p["mc_finding"], "mc_finding")]
            if ab:
                mc.append(make_mc(f"Where is the {lesion} located?", loc, [L for L, _ in D["locations"]], trng,
                                  p["mc_second"], "mc_location"))
            else:
                mc.append(make_mc("What imaging modality is this?", D["modality"],
                                  [E["modality"] for E in DOMAINS] + [EXTRA_MODALITY], trng, p["mc_second"],
                                  "mc_modality"))

            conv = []
            for k, item in enumerate(qa):
                q = ("<image>\n" if k == 0 else "") + item["question"]
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": item["answer"]}]
            conv += [{"from": "human", "value": REPORT_QUESTION}, {"from": "gpt", "value": report}]
            rec = {"id": f"toy_{split}_{D['abbr']}_{idx:04d}", "image": fname, "domain": dom,
                   "modality": D["modality"], "width": SIZE, "height": SIZE, "abnormal": ab,
                   "findings": findings, "report": report, "report_zh": report_zh,
                   "qa": qa, "mc": mc, "conversations": conv, "details": details}
            if split == "train":
                rec["report_error"] = error
                if clean is not None:
                    rec["report_clean"] = clean
            records.append(rec)
    return records


def make_mc(question, correct, pool, trng, pos, kind):
    others = [o for o in pool if o != correct]
    others = [others[j] for j in trng.permutation(len(others))]
    others.insert(pos, correct)
    return {"question": question, "options": others, "answer": correct, "answer_label": "ABCD"[pos], "kind": kind}


def vqa_records(records):
    out = []
    for r in records:
        for k, item in enumerate(r["qa"]):
            row = {"id": f"{r['id']}_q{k}", "image": r["image"], "domain": r["domain"],
                   "answer_type": item["answer_type"], "kind": item["kind"]}
            if "prior_answer" in item:
                row["prior_answer"] = item["prior_answer"]
            row["conversations"] = [{"from": "human", "value": "<image>\n" + item["question"]},
                                    {"from": "gpt", "value": item["answer"]}]
            out.append(row)
    return out


def mc_records(records):
    out = []
    for r in records:
        for item in r["mc"]:
            out.append({"question": item["question"], "options": item["options"], "answer": item["answer"],
                        "answer_label": item["answer_label"], "dataset_name": f"toy_{r['domain']}",
                        "image": [r["image"]], "question_type": "closed", "kind": item["kind"]})
    return out


# ----------------------------------------------------------------------------- knowledge-base twins (d)
def build_kb(queries, toy_dir):
    """Per query image (val, test, ragpt) three KB twins drawn from the query's anatomy stream (so they look alike:
    same domain, same background) with another lesion stream and grain: an abnormal query gets `other_side` (its
    lesion at the mirrored location) and `normal` (no lesion) -- clinically serious near misses -- and `same` (its
    lesion, same location, redrawn); a normal query gets `lesion_added` (a domain lesion at a random location) and
    `same` (normal, other grain). Reports are written for the twin's own findings."""
    kb = []
    by_domain = {}
    for q in queries:
        by_domain.setdefault(q["domain"], []).append(q)
    for di, D in enumerate(DOMAINS):
        k = 0
        for q in by_domain.get(D["domain"], []):
            split, idx = q["id"].split("_")[1], int(q["id"].split("_")[-1])
            trng = np.random.default_rng([SEED, 99, di, k])
            if q["abnormal"]:
                L = [n for n, _ in D["lesions"]].index(q["findings"][0]["name"])
                li = [n for n, _ in D["locations"]].index(q["findings"][0]["location"])
                twins = [("other_side", L, D["mirror"][li]), ("normal", None, None), ("same", L, li)]
            else:
                twins = [("lesion_added", int(trng.integers(len(D["lesions"]))), int(trng.integers(4))),
                         ("same", None, None)]
            order = [int(j) for j in trng.permutation(len(twins))]  # twins appear in the KB in a random order
            q["kb_twins"] = []
            for j in order:
                kind, L, li = twins[j]
                bg = image_streams(split, di, idx)[0]
                les, grain = np.random.default_rng([SEED, 98, di, k, 1]), np.random.default_rng([SEED, 98, di, k, 2])
                fname = f"images/kb_{D['domain']}_{k:04d}.png"
                findings, size, details = render(D, bg, les, grain, L, li, fname, toy_dir)
                report, report_zh = make_report(D, trng, L, li, size, details)
                rid = f"toy_kb_{D['abbr']}_{k:04d}"
                kb.append({"id": rid, "image": fname, "domain": D["domain"], "modality": D["modality"],
                           "width": SIZE, "height": SIZE, "abnormal": L is not None, "findings": findings,
                           "report": report, "report_zh": report_zh, "twin_of": q["id"], "near_miss": kind,
                           "serious": kind != "same"})
                q["kb_twins"].append(rid)
                k += 1
    return kb


def withhold_matches(kb, queries, toy_dir):
    """A knowledge base rarely holds the query's own case: for KB_NO_MATCH of the query images (a fixed draw per
    split, domain and normal / abnormal) the `same` twin is removed from kb.json (and its image deleted), so every
    KB report of that image's twins is a serious near miss and copying the nearest one is wrong. The twins are drawn
    before, so the other twins (and the tokenizer, which reads every drawn twin) do not depend on the draw."""
    kb_ids, drop = {r["id"]: r for r in kb}, set()
    for si, split in enumerate(KB_QUERIES):
        for di, D in enumerate(DOMAINS):
            for ab in (True, False):
                group = [q for q in queries if q["id"].split("_")[1] == split and q["domain"] == D["domain"]
                         and q["abnormal"] == ab]
                rng = np.random.default_rng([SEED, 97, si, di, int(ab)])
                for j in rng.permutation(len(group))[:round(KB_NO_MATCH * len(group))]:
                    q = group[int(j)]
                    same = [t for t in q["kb_twins"] if kb_ids[t]["near_miss"] == "same"]
                    drop.update(same)
                    q["kb_twins"] = [t for t in q["kb_twins"] if t not in same]
    for rid in drop:
        os.remove(os.path.join(toy_dir, kb_ids[rid]["image"]))
    return [r for r in kb if r["id"] not in drop]


# ----------------------------------------------------------------------------- preference pairs (c)
def wording_variant(D, trng, rec):
    """Another faithful report of the same image (other templates), different from the record's."""
    f = rec["findings"]
    lesion_i = [n for n, _ in D["lesions"]].index(f[0]["name"]) if f else None
    loc_i = [n for n, _ in D["locations"]].index(f[0]["location"]) if f else None
    size = max(f[0]["box"][2] - f[0]["box"][0], f[0]["box"][3] - f[0]["box"][1]) if f else 0
    for _ in range(100):
        text, _zh = make_report(D, trng, lesion_i, loc_i, size, rec["details"])
        if text != rec["report"]:
            return text
    raise RuntimeError(f"no paraphrase for {rec['id']}")


def preference_pairs(records, split):
    """MMed-RAG / MMedPO release-format pairs on clean images. chosen = the image-grounded answer. Per image:
    every closed question (rejected = the other yes/no: `wrong_yes_no`; for half of them that is the answer the
    train prior predicts, toy_rejected_is_prior), the open location (`wrong_location`: mirrored side), the open
    abnormality (`missed_lesion`: "none" / `hallucinated_finding`: a lesion for a normal image), the report (abnormal:
    alternately `wrong_location` / `missed_lesion`; normal: `hallucinated_finding`), and two clinically irrelevant
    `wording` pairs (a closed answer re-worded, a faithful paraphrase of the report)."""
    pairs = []
    for r_i, rec in enumerate(records):
        D = DOMAINS[[E["domain"] for E in DOMAINS].index(rec["domain"])]
        trng = np.random.default_rng([SEED, 77, list(SPLITS).index(split), r_i])
        f = rec["findings"]
        out = []

        def pair(q, chosen, rejected, kind, qkind, answer_type, **extra):
            out.append((q, chosen, rejected, kind, qkind, answer_type, extra))

        closed = [qa for qa in rec["qa"] if qa["answer_type"] == "CLOSED"]
        for qa in closed:
            wrong = "no" if qa["answer"] == "yes" else "yes"
            pair(qa["question"], qa["answer"], wrong, "wrong_yes_no", qa["kind"], "CLOSED",
                 toy_prior_answer=qa["prior_answer"], toy_rejected_is_prior=wrong == qa["prior_answer"])
        qa = closed[int(trng.integers(len(closed)))]
        opts = CLOSED_WORDING[qa["answer"]]
        pair(qa["question"], qa["answer"], opts[int(trng.integers(len(opts)))], "wording", qa["kind"], "CLOSED")
        for qa in rec["qa"]:
            if qa["kind"] == "where":
                li = [n for n, _ in D["locations"]].index(qa["answer"])
                pair(qa["question"], qa["answer"], D["locations"][D["mirror"][li]][0], "wrong_location", "where", "OPEN")
            if qa["kind"] == "abnormality":
                if f:
                    pair(qa["question"], qa["answer"], "none", "missed_lesion", "abnormality", "OPEN")
                else:
                    L = D["lesions"][int(trng.integers(len(D["lesions"])))][0]
                    pair(qa["question"], qa["answer"], L, "hallucinated_finding", "abnormality", "OPEN")
        size = max(f[0]["box"][2] - f[0]["box"][0], f[0]["box"][3] - f[0]["box"][1]) if f else 0
        if f:
            lesion_i = [n for n, _ in D["lesions"]].index(f[0]["name"])
            loc_i = [n for n, _ in D["locations"]].index(f[0]["location"])
            if r_i % 2 == 0:
                bad, _ = make_report(D, trng, lesion_i, D["mirror"][loc_i], size, rec["details"])
                pair(REPORT_QUESTION, rec["report"], bad, "wrong_location", "report", "REPORT")
            else:
                bad, _ = make_report(D, trng, None, None, 0, rec["details"])
                pair(REPORT_QUESTION, rec["report"], bad, "missed_lesion", "report", "REPORT")
        else:
            fake = dict(rec["details"], dens="dense")
            bad, _ = make_report(D, trng, int(trng.integers(len(D["lesions"]))), int(trng.integers(4)),
                                 int(trng.integers(12, 19)), fake)
            pair(REPORT_QUESTION, rec["report"], bad, "hallucinated_finding", "report", "REPORT")
        pair(REPORT_QUESTION, rec["report"], wording_variant(D, trng, rec), "wording", "report", "REPORT")
        for k, (q, chosen, rejected, kind, qkind, answer_type, extra) in enumerate(out):
            human = {"from": "human", "value": "<image>\n" + q}
            pairs.append({"id": f"{rec['id']}_p{k}", "image": rec["image"],
                          "conversations": [human, {"from": "gpt", "value": chosen}],
                          "rejected_conversations": [human, {"from": "gpt", "value": rejected}],
                          "answer_type": answer_type, "toy_kind": kind, "toy_serious": kind != "wording",
                          "toy_question_kind": qkind, "toy_domain": rec["domain"],
                          "toy_findings": [{k: x[k] for k in ("name", "location", "box")} for x in f], **extra})
    rng = np.random.default_rng([SEED, 76, list(SPLITS).index(split)])
    return [pairs[j] for j in rng.permutation(len(pairs))]  # mixed domains and kinds in any prefix of the file


# ----------------------------------------------------------------------------- captions (e)
def build_captions(records):
    """PubMedVision-style source records for huatuo_vision.py, one per train image: {"id", "image", "caption",
    "context", "modality", "body_part", "toy_caption_kind"}. Kinds, with exact shares CAPTION_SHARES (per domain):
    usable (a figure caption describing the image's findings, >= 3 lexicon terms in the caption alone), near
    duplicate (a usable caption of another image with its figure label or one word changed), duplicate (a copy of
    another image's caption), off_topic (a non-medical figure caption), too_short (one to two words; the context
    paragraph is still medical, so counting terms over caption + context lets it through)."""
    out = []
    for di, D in enumerate(DOMAINS):
        recs = [r for r in records if r["domain"] == D["domain"]]
        rng = np.random.default_rng([SEED, 55, di])
        n = len(recs)
        counts = {k: int(round(v * n)) for k, v in CAPTION_SHARES.items() if k != "usable"}
        kinds = ["usable"] * (n - sum(counts.values()))
        for k, c in counts.items():
            kinds += [k] * c
        kinds = [kinds[j] for j in rng.permutation(n)]
        usable_done = []
        pending = []
        for i, (rec, kind) in enumerate(zip(recs, kinds)):
            trng = np.random.default_rng([SEED, 56, di, i])
            f = rec["findings"]
            P = CAPTION_PARTS[D["domain"]]
            pick = lambda xs: xs[int(trng.integers(len(xs)))]
            slots = dict(n=int(trng.integers(1, 9)), m=int(trng.integers(1, 9)), p="ABCD"[int(trng.integers(4))],
                         age=int(trng.integers(18, 90)), sex=pick(["man", "woman"]),
                         view=pick(["frontal", "posteroanterior", "portable"]), symptom=pick(P["symptoms"]),
                         symptom2=pick(P["symptoms"]), organ=pick(ORGANS), eye=pick(["left", "right"]),
                         weeks=int(trng.integers(2, 13)), time=pick(TIMES))
            if f:
                slots.update(loc=f[0]["location"], lesion=f[0]["name"], desc=DESC.get(f[0]["name"], ("",))[0],
                             size=max(f[0]["box"][2] - f[0]["box"][0], f[0]["box"][3] - f[0]["box"][1]))
                finding = f"The images showed {a_an(f[0]['name'])} in the {f[0]['location']}."
            else:
                finding = "The images were within normal limits."
            lead = pick(FIGURE_LEADS).format(**slots)
            context = pick(CONTEXTS[D["domain"]]).format(finding=finding, **slots)
            if kind == "off_topic":
                caption = lead + " " + pick(CAPTION_OFF_TOPIC)
                context = "The study was approved by the ethics committee. " + context.split(". ")[0] + "."
            elif kind == "too_short":
                caption = pick(CAPTION_SHORT[D["domain"]])
            else:
                words = [pick(P["subject"])]
                if trng.random() < 0.7:
                    words.append(pick(CAPTION_PATIENT))
                words += [pick(CAPTION_VERBS), pick(P["abnormal"] if f else P["normal"])]
                body = " ".join(words)
                if trng.random() < 0.5:
                    tail = pick(CAPTION_TAILS)
                    body += tail if tail[0] in ";," else " " + tail
                body = body.format(**slots).replace(", with", " with").replace(",,", ",")
                caption = lead + " " + body[0].upper() + body[1:] + "."
            item = {"id": f"{rec['id']}_cap", "image": rec["image"], "caption": caption, "context": context,
                    "modality": D["modality"], "body_part": D["body_part"], "toy_caption_kind": kind}
            if kind in ("duplicate", "near_duplicate"):
                pending.append(item)
            if kind == "usable":
                usable_done.append(item)
            out.append(item)
        for item in pending:  # copy (or lightly edit) an earlier usable caption of the same domain
            src = usable_done[int(rng.integers(len(usable_done)))]
            item["toy_duplicate_of"] = src["id"]
            if item["toy_caption_kind"] == "duplicate":
                item["caption"] = src["caption"]
            else:
                c = src["caption"]  # the figure label re-typed: "Figure 2." <-> "Fig. 2.", "(A)" -> "(B)"
                if c.startswith("Figure "):
                    item["caption"] = "Fig. " + c[len("Figure "):]
                elif c.startswith("Fig. "):
                    item["caption"] = "Figure " + c[len("Fig. "):]
                else:
                    item["caption"] = "(" + "BCDA"["ABCD".index(c[1])] + c[2:]
    return out


def dump(obj, path):
    """A json list, one compact record per line (readable diffs, a third smaller than indented json)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in obj) + "\n]\n")


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_corpus(all_records, extra_texts):
    texts = []
    for r in all_records:
        texts += [r["report"], r["report_zh"], r["modality"]]
        for f in r["findings"]:
            texts += [f["name"], f["name_zh"], f["location"], f["location_zh"]]
        for q in r.get("qa", []):
            texts += [q["question"], q["answer"], q["question_zh"], q["answer_zh"]]
        for m in r.get("mc", []):
            texts += [m["question"]] + m["options"]
    texts += extra_texts
    texts += TEMPLATE_STRINGS * 5  # weighted so chat-template words become single tokens
    texts += [str(i) for i in range(1000)]
    return texts


def build_tokenizer(corpus, tok_dir):
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
    tok.train_from_iterator(corpus, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>", extra_special_tokens=SPECIAL_TOKENS[4:],
                                 clean_up_tokenization_spaces=False, model_max_length=2048)
    os.makedirs(tok_dir, exist_ok=True)
    hf.save_pretrained(tok_dir)
    return hf


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the toy dataset (data/toy) and its tokenizer (data/tokenizer).")
    ap.add_argument("--out", default=HERE, help="folder that receives toy/ and tokenizer/ (default: data/)")
    out = ap.parse_args(argv).out
    toy_dir, tok_dir = os.path.join(out, "toy"), os.path.join(out, "tokenizer")
    shutil.rmtree(os.path.join(toy_dir, "images"), ignore_errors=True)  # no stale image survives a re-run
    os.makedirs(os.path.join(toy_dir, "images"))
    splits, seen = {}, set()
    for s, n in SPLITS.items():
        splits[s] = build_split(s, n, toy_dir, seen)
        if s == "train":  # clean-split reports must not repeat a train report word for word
            seen = {r["report"] for r in splits[s]} | {r.get("report_clean", "") for r in splits[s]}
    drawn = build_kb([r for s in KB_QUERIES for r in splits[s]], toy_dir)
    kb = withhold_matches(drawn, [r for s in KB_QUERIES for r in splits[s]], toy_dir)
    for s, recs in splits.items():
        dump([{k: v for k, v in r.items() if k != "details"} for r in recs], os.path.join(toy_dir, f"{s}.json"))
        if s in ("train", "val", "test"):
            dump(vqa_records(recs), os.path.join(toy_dir, f"{s}_vqa.json"))
        if s in ("val", "test"):
            dump(mc_records(recs), os.path.join(toy_dir, f"{s}_mc.json"))
    dump(kb, os.path.join(toy_dir, "kb.json"))
    # prefs_train: the pref images; prefs_val: every second val image (held-out pair rewards; half keeps it small)
    prefs = {"train": preference_pairs(splits["pref"], "pref"), "val": preference_pairs(splits["val"][::2], "val")}
    for s, p in prefs.items():
        dump(p, os.path.join(toy_dir, f"prefs_{s}.json"))
    captions = build_captions(splits["train"])
    dump(captions, os.path.join(toy_dir, "captions.json"))
    extra = [p["rejected_conversations"][1]["value"] for ps in prefs.values() for p in ps]
    extra += [c["caption"] for c in captions] + [c["context"] for c in captions]
    hf = build_tokenizer(tokenizer_corpus([r for recs in splits.values() for r in recs] + drawn, extra), tok_dir)

    for s, recs in splits.items():  # summary
        closed = [q["answer"] for r in recs for q in r["qa"] if q["answer_type"] == "CLOSED"]
        n_qa = sum(len(r["qa"]) for r in recs)
        print(f"[{s}] images={len(recs)} qa={n_qa} closed={len(closed)} yes={closed.count('yes')} "
              f"mc={sum(len(r['mc']) for r in recs)} abnormal={sum(r['abnormal'] for r in recs)}")
    print(f"[kb] images={len(kb)}  [prefs] train={len(prefs['train'])} val={len(prefs['val'])}  "
          f"[captions] {len(captions)}")
    print(f"tokenizer: vocab={len(hf)} -> {tok_dir}")


if __name__ == "__main__":
    main()
