"""MMed-RAG (report metrics block; the method is built around it)."""

import math
import re
from collections import Counter


# ----------------------------------------------------------------------------------------------------------
# Report-generation metrics, written by hand (no pycocoevalcap / Java here). MMed-RAG releases no metric code
# (spec A, issue #24); MMedPO reports BLEU as the average of BLEU-1..4 with ROUGE-L and METEOR. Verified in
# tests/test_mmed_rag.py against sacrebleu (BLEU) and rouge-score (ROUGE-L); METEOR on hand-computed cases.
# ----------------------------------------------------------------------------------------------------------

def report_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped, as pycocoevalcap's PTB tokenizer does before scoring."""
    return re.findall(r"\w+", text.lower())


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> list[float]:
    """[BLEU-1, ..., BLEU-max_n] in % over the corpus (Papineni et al. 2002): clipped n-gram counts summed over
    all sentences, geometric mean of the first n precisions, brevity penalty exp(1 - r/c) when the summed
    hypothesis length c is below the summed reference length r. No smoothing, as pycocoevalcap: a corpus with
    no matching n-gram scores 0 for that order and above. Equals sacrebleu's BLEU(tokenize="none",
    smooth_method="none", max_ngram_order=n) on report_tokens-joined text (tested)."""
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = report_tokens(hyp), report_tokens(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0:
        return [0.0] * max_n
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if correct[n] == 0 or total[n] == 0:
            scores.extend([0.0] * (max_n - n))
            break
        log_sum += math.log(correct[n] / total[n])
        scores.append(100 * bp * math.exp(log_sum / (n + 1)))
    return scores


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length by dynamic programming over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypothesis: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin 2004) in %: P = LCS/|hyp|, R = LCS/|ref|, F = (1+β²)PR / (R + β²P). β = 1 matches
    rouge-score's fmeasure (tested); pycocoevalcap uses β = 1.2, pass beta=1.2 to compare with papers using it."""
    h, r = report_tokens(hypothesis), report_tokens(reference)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 100 * (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)


def meteor(hypothesis: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR (Banerjee & Lavie 2005) in %, exact-match stage only (no stemmer or WordNet synonyms: those need
    data we do not ship, so scores run a little below pycocoevalcap's METEOR 1.5 on paraphrases).
    Fmean = PR / (αP + (1-α)R) (α = 0.9 gives the paper's 10PR/(R+9P)); penalty = γ (chunks/matches)^β;
    score = Fmean (1 - penalty). The alignment maps each hypothesis word to an unused identical reference word,
    preferring the one that extends the current chunk, so a copied phrase is one chunk."""
    h, r = report_tokens(hypothesis), report_tokens(reference)
    positions: dict[str, list[int]] = {}
    for j, w in enumerate(r):
        positions.setdefault(w, []).append(j)
    used, align = set(), []
    for w in h:
        free = [j for j in positions.get(w, []) if j not in used]
        if not free:
            align.append(None)
            continue
        prev = align[-1] if align else None  # reference position of the previous hypothesis word, if matched
        j = prev + 1 if prev is not None and prev + 1 in free else free[0]
        used.add(j)
        align.append(j)
    matches = len(used)
    if matches == 0:
        return 0.0
    chunks, last = 0, None  # a chunk: a run of matched hypothesis words whose reference positions are consecutive
    for j in align:
        if j is not None and (last is None or j != last + 1):
            chunks += 1
        last = j
    p, rec = matches / len(h), matches / len(r)
    fmean = p * rec / (alpha * p + (1 - alpha) * rec)
    return 100 * fmean * (1 - gamma * (chunks / matches) ** beta)


def report_scores(hypotheses: list[str], references: list[str]) -> dict:
    """The report columns of MMed-RAG Table 2 / MMedPO Table 1: BLEU-1..4, their average ("BLEU" in MMedPO), and
    sentence ROUGE-L and METEOR averaged over reports. All in %."""
    b = corpus_bleu(hypotheses, references)
    n = max(len(hypotheses), 1)
    return {"bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3], "bleu": sum(b) / 4,
            "rouge_l": sum(rouge_l(h, r) for h, r in zip(hypotheses, references)) / n,
            "meteor": sum(meteor(h, r) for h, r in zip(hypotheses, references)) / n, "n": len(hypotheses)}
