"""Scaling: time of one DPO step (dpo.dpo_step, live reference, LoRA, + AdamW) on the tiny LLaVA at three
sequence lengths and 1 / 2 / 4 images per sample, each relative to the smallest setting, in one process.

    python tests/benchmarks/bench_scaling.py             # writes runs/bench/scaling.json
    python tests/benchmarks/bench_scaling.py --lengths 128 256 512 --images 1 2 4 --pairs 8

Sequences are synthetic (random text ids, `images x 16` image tokens at the front, a 16-token answer): what is
measured is the cost of the tokens and the images, not the data.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import _common as C
import torch

import dpo
import llava_med as lm

warnings.filterwarnings("ignore", category=FutureWarning)


class SyntheticPairs:
    """The two things collate_pairs reads from a PairData: .items and .pixel(key)."""

    def __init__(self, n, length, images, cfg, vocab, answer=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.items = cfg, []
        text = length - images * cfg.num_image_tokens - answer
        assert text > 0, "length too short for the images and the answer"
        for i in range(n):
            prompt = [cfg.image_token_id] * (images * cfg.num_image_tokens) + \
                torch.randint(10, vocab, (text,), generator=g).tolist()
            seqs = {}
            for side in ("chosen", "rejected"):
                ans = torch.randint(10, vocab, (answer,), generator=g).tolist()
                seqs[side] = {"input_ids": prompt + ans, "labels": [lm.IGNORE_INDEX] * len(prompt) + ans}
            keys = [f"{i}/{k}" for k in range(images)]
            self.items.append({**seqs, "images": keys, "rejected_images": keys})

    def pixel(self, key):
        g = torch.Generator().manual_seed(hash(key) % 2**31)
        return torch.randn(3, self.cfg.image_size, self.cfg.image_size, generator=g)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])  # tokens per sequence, images included
    p.add_argument("--images", type=int, nargs="+", default=[1, 2, 4])  # images per sample
    p.add_argument("--pairs", type=int, default=8)  # pairs per step
    p.add_argument("--repeats", type=int, default=5)  # timed steps per setting
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    base, tok = lm.load("tiny")
    args = dpo.Args(batch_size=a.pairs, micro_batch_size=a.pairs, lora_dropout=0.0)
    model, ref = lm.policy_and_reference(copy.deepcopy(base), args.full_finetune, args.lora_r, args.lora_alpha,
                                         args.lora_dropout, args.tune_projector)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    idx = list(range(a.pairs))
    rows = []
    for n_img in a.images:
        for length in a.lengths:
            data = SyntheticPairs(a.pairs, length, n_img, model.config, len(tok))

            def step():
                dpo.dpo_step(args, model, ref, data, idx, tok, torch.device("cpu"))["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            C.reset_peak_rss()
            t = C.median(C.interleaved({"step": step}, a.repeats)["step"])
            rows.append({"images": n_img, "length": length, "step_s": t, "tokens_per_s": 2 * a.pairs * length / t,
                         "peak_rss_mb": C.peak_rss_mb()})
            print(json.dumps(rows[-1]))
    t0 = rows[0]["step_s"]
    for r in rows:
        r["relative_to_first"] = r["step_s"] / t0
    C.write_result("scaling", {"pairs_per_step": a.pairs, "rows": rows,
                               "note": "step time relative to the first setting; tokens grow x2 per length step"})


if __name__ == "__main__":
    main()
