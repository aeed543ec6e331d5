"""Generation: tokens/s of llava_med.generate against transformers' LlavaForConditionalGeneration.generate on the
same weights (tiny LLaVA saved as a llava-hf checkpoint and loaded back), batch 8, greedy, same prompts and
images, in one process. The generated tokens must be identical.

    python tests/benchmarks/bench_generate.py            # writes runs/bench/generate.json
    python tests/benchmarks/bench_generate.py --batch 8 --new-tokens 64 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings

import _common as C
import torch

import llava_med as lm

warnings.filterwarnings("ignore", category=FutureWarning)
TOY = C.ROOT / "data" / "toy"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)  # prompts per generate call
    p.add_argument("--new-tokens", type=int, default=32)  # max new tokens per prompt
    p.add_argument("--repeats", type=int, default=8)  # timed rounds
    p.add_argument("--only", default="", help="ours | hf: one side in this process, print its peak RSS")
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    import transformers

    model, tok = lm.load("tiny")
    model.eval()
    cfg = model.config
    recs = lm.read_records(TOY / "test.json")[:a.batch]
    prompts, images = [], []
    for where, rec in recs:
        q = lm.record_turns(rec, where)[0][1].replace("<image>", "").strip()
        prompts.append(lm.tokenize_prompt(tok, lm.place_image_markers([("user", q)], 1), cfg.template,
                                          cfg.num_image_tokens, cfg.image_token_id))
        images.append(lm.preprocess_image(lm.load_image(TOY / rec["image"]), cfg.image_size))
    pix = torch.stack(images)
    with tempfile.TemporaryDirectory() as d:
        lm.save_llava_hf(model, tok, d)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32,
                                                                       attn_implementation="sdpa").eval()
    batch = lm.collate([{"input_ids": q} for q in prompts], tok.pad_token_id, padding_side="left")
    hf_ids = batch["input_ids"].clone()
    hf_ids[hf_ids == cfg.image_token_id] = hf.config.image_token_id
    end = {tok.eos_token_id, tok.pad_token_id}

    @torch.no_grad()
    def ours():
        return lm.generate(model, tok, prompts, pix, max_new_tokens=a.new_tokens, stop=[])

    @torch.no_grad()
    def hf_gen():
        out = hf.generate(input_ids=hf_ids, attention_mask=batch["attention_mask"], pixel_values=pix,
                          max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        rows = [[t for t in row.tolist() if t not in end] for row in out[:, hf_ids.shape[1]:]]
        hf_gen.n_tokens = sum(len(r) for r in rows)  # new tokens, EOS and padding excluded
        return [tok.decode(r, skip_special_tokens=True).strip() for r in rows]

    if a.only:
        fn = ours if a.only == "ours" else hf_gen
        fn()
        C.reset_peak_rss()
        fn()
        print(json.dumps({"peak_rss_mb": C.peak_rss_mb()}))
        return
    o, h = ours(), hf_gen()
    identical = o == h
    assert identical, "generated tokens differ"  # same decoded text from the same greedy token ids
    n_tokens = hf_gen.n_tokens
    t = C.interleaved({"ours": ours, "hf": hf_gen}, a.repeats)
    tps = {k: n_tokens / C.median(v) for k, v in t.items()}
    rss = {s: C.rss_of([__file__, "--only", s, "--batch", str(a.batch), "--new-tokens", str(a.new_tokens)])
           for s in ("ours", "hf")}
    C.write_result("generate", {"batch": a.batch, "max_new_tokens": a.new_tokens, "generated_tokens": n_tokens,
                                "identical_tokens": identical, "tokens_per_s": tps,
                                "speedup_vs_hf": tps["ours"] / tps["hf"], "target_speedup": 1.0,
                                "peak_rss_mb_during_generate": rss})


if __name__ == "__main__":
    main()
