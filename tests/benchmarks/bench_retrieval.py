"""Retrieval: faiss search on a 100k x 512 knowledge base (normalised embeddings, inner product, the index
retrieve.py builds) against a numpy top-k (one matmul + argpartition), queries/s, index build time, and the
recall of the approximate indexes (IVF; HNSW with --hnsw) against the exact top-k. Same process, same data.

    python tests/benchmarks/bench_retrieval.py           # writes runs/bench/retrieval.json
    python tests/benchmarks/bench_retrieval.py --n 100000 --dim 512 --queries 1000 --k 10 --hnsw
"""

from __future__ import annotations

import argparse
import time

import _common as C
import numpy as np


def normalised(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_topk(kb, q, k, chunk=256):
    """Exact top-k by inner product, in query chunks (a 1000 x 100k score matrix would be 400 MB)."""
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ kb.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, 1).argsort(axis=1)[:, ::-1]
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000)  # knowledge-base size
    p.add_argument("--dim", type=int, default=512)  # embedding dimension (CLIP ViT-B/16 projection)
    p.add_argument("--queries", type=int, default=1000)  # queries per timed search
    p.add_argument("--k", type=int, default=10)  # neighbours per query
    p.add_argument("--repeats", type=int, default=5)  # timed rounds
    p.add_argument("--hnsw", action="store_true")  # also an HNSW index (build: 5 s idle, 90 s on a busy 2-core machine)
    a = p.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    # Embeddings with structure, as real report embeddings have (uniform random vectors have no near neighbours,
    # which makes any approximate index look bad): n/100 topic centres, each row a noisy copy of one; each query
    # a noisy copy of a knowledge-base row.
    centres = normalised(rng, max(a.n // 100, 1), a.dim)
    kb = centres[rng.integers(len(centres), size=a.n)] + 0.08 * normalised(rng, a.n, a.dim)
    kb /= np.linalg.norm(kb, axis=1, keepdims=True)
    q = kb[rng.choice(a.n, a.queries, replace=False)] + 0.08 * normalised(rng, a.queries, a.dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    build = {}
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(a.dim)
    flat.add(kb)
    build["flat"] = time.perf_counter() - t
    t = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(a.dim), a.dim, 1024, faiss.METRIC_INNER_PRODUCT)
    ivf.train(kb)
    ivf.add(kb)
    ivf.nprobe = 16
    build["ivf1024_nprobe16"] = time.perf_counter() - t
    if a.hnsw:
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(a.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(kb)
        hnsw.hnsw.efSearch = 64
        build["hnsw32_ef64"] = time.perf_counter() - t

    exact = numpy_topk(kb, q, a.k)
    results = {"numpy": lambda: numpy_topk(kb, q, a.k), "faiss_flat": lambda: flat.search(q, a.k),
               "faiss_ivf": lambda: ivf.search(q, a.k)}
    if a.hnsw:
        results["faiss_hnsw"] = lambda: hnsw.search(q, a.k)
    recall = {}
    for name in [r for r in results if r != "numpy"]:
        got = results[name]()[1]
        recall[name] = float(np.mean([len(set(g) & set(e)) / a.k for g, e in zip(got, exact)]))
    C.reset_peak_rss()
    times = C.interleaved(results, a.repeats)
    qps = {k: a.queries / C.median(v) for k, v in times.items()}
    C.write_result("retrieval", {
        "n": a.n, "dim": a.dim, "queries": a.queries, "k": a.k, "threads": faiss.omp_get_max_threads(),
        "queries_per_s": qps, "speedup_vs_numpy": {k: v / qps["numpy"] for k, v in qps.items() if k != "numpy"},
        "build_s": build, "recall_at_k_vs_exact": recall, "peak_rss_mb_during_search": C.peak_rss_mb()})


if __name__ == "__main__":
    main()
