"""How well semantic dedup finds near-duplicates, measured against a known truth.

(a) Real images with injected near-duplicates: scikit-learn's bundled digits (1,797 scans,
    upsampled to 32 px); a seeded 15% of the images get one copy each, made by a small
    change (Gaussian pixel noise, a crop of the border resized back, or a JPEG re-encode at
    low quality). Embedded by the project's weight-free encoders (`pixels`,
    `random_projection`), as they are and centred by the mean embedding (`select.center`:
    all-positive pixel features make unrelated images cosine-near), and deduplicated as
    the select stage does (spherical k-means with the default k, the greedy rule within
    clusters, the member nearest the centroid kept). Precision: removed rows whose
    representative is their own original or copy; recall: injected copies of which one
    member was removed for the other, overall and per change. Removals between two
    original images are counted apart (digits has near-identical scans of its own).
(b) Agreement with exact pairwise search on 100k synthetic 512-d rows (selection_speed's
    clustered rows, 100 classes) with injected copies at a spread of similarities (cosine
    0.91-1): the clustered dedup against the same greedy rule, in the same priority order
    (cosine to the row's centroid), over all rows at once (every pair compared); and the
    share of all pairs above the threshold (faiss range search) inside one cluster.

    python benchmarks/dedup_quality.py --parts a,b
"""

from __future__ import annotations

import argparse
import io
import time
from itertools import product

import numpy as np
from PIL import Image
from selection_speed import clustered, with_near_duplicates

from dedt_ray.data.images import conform_array
from dedt_ray.encoders import build_encoder
from dedt_ray.selection.clusters import assign_clusters, default_clusters, fit_clusters
from dedt_ray.selection.dedup import dedup_cluster, semantic_dedup

CHANGES = ("noise", "crop", "jpeg")


def digits(size: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    raw = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    return np.stack([conform_array(img, size, "L") for img in raw])


def change(img: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate of one uint8 HxWxC image."""
    if how == "noise":
        noisy = img.astype(np.float64) + rng.normal(0.0, 8.0, img.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img.squeeze())
    if how == "crop":
        m = max(1, img.shape[0] // 10)
        pil = pil.crop((m, m, img.shape[1] - m, img.shape[0] - m))
        out = np.asarray(pil.resize(img.shape[1::-1], Image.BILINEAR))
    else:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=30)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return out.reshape(img.shape)


def inject(images: np.ndarray, share: float, seed: int):
    """images + one changed copy of a seeded `share` of them: (all, origin, change name)."""
    rng = np.random.default_rng(seed)
    src = np.sort(rng.choice(len(images), round(share * len(images)), replace=False))
    hows = [CHANGES[i % len(CHANGES)] for i in range(len(src))]
    copies = np.stack([change(images[s], h, rng) for s, h in zip(src, hows, strict=True)])
    origin = np.concatenate([np.arange(len(images)), src])
    how = np.array(["original"] * len(images) + hows)
    return np.concatenate([images, copies]), origin, how


def embed(images: np.ndarray, encoder: str, dim: int) -> np.ndarray:
    enc = build_encoder(encoder, None, dim, images.shape[-1], images.shape[1])
    return np.concatenate(
        [enc(enc.resize(images[i : i + 512])) for i in range(0, len(images), 512)]
    )


def quality(duplicate_of: np.ndarray, origin: np.ndarray, how: np.ndarray) -> dict:
    removed = np.flatnonzero(duplicate_of >= 0)
    right = origin[removed] == origin[duplicate_of[removed]]
    copies = np.flatnonzero(how != "original")
    found = set(origin[removed[right]].tolist())
    per = {h: np.mean([origin[c] in found for c in copies if how[c] == h]) for h in CHANGES}
    both_original = (how[removed] == "original") & (how[duplicate_of[removed]] == "original")
    return {
        "removed": len(removed),
        "precision": float(right.mean()) if len(removed) else 1.0,
        "recall": len(found) / len(copies),
        "per_change": per,
        "original_pairs": int(both_original.sum()),
    }


def part_a(args: argparse.Namespace) -> None:
    print(f"\n(a) digits 32 px, {args.share:.0%} of the images copied once (changed)")
    header = ["encoder", "threshold", "rows", "removed", "precision", "recall"]
    header += [f"recall {h}" for h in CHANGES] + ["orig-orig removals"]
    print(" | ".join(header))
    rows, origin, how = inject(digits(32), args.share, seed=0)
    for encoder, centre in product(("pixels", "random_projection"), (False, True)):
        X = embed(rows, encoder, 256)
        for t in args.thresholds:
            dup, _, _ = semantic_dedup(X, t, default_clusters(len(X)), seed=0, center=centre)
            q = quality(dup, origin, how)
            enc = f"{encoder}{', centred' if centre else ''}"
            cells = [enc, t, len(X), q["removed"], f"{q['precision']:.3f}"]
            cells += [f"{q['recall']:.3f}"] + [f"{q['per_change'][h]:.3f}" for h in CHANGES]
            print(" | ".join(map(str, cells + [q["original_pairs"]])), flush=True)


def pairs_above(X: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with cosine >= threshold, by exact faiss range search: (i, j, cos)."""
    import faiss

    unit = np.ascontiguousarray(X / np.linalg.norm(X, axis=1, keepdims=True), dtype=np.float32)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    lims, sims, hits = index.range_search(unit, threshold - 1e-6)
    left = np.repeat(np.arange(len(X)), np.diff(lims.astype(np.int64)))
    upper = left < hits
    return left[upper], hits[upper], sims[upper]


def part_b(args: argparse.Namespace) -> None:
    X, _ = clustered(args.b_rows, 512, max(1, args.b_rows // 1000), seed=0)
    with_near_duplicates(X, args.share, seed=1, noise=(0.0, 1.0))  # cosine 0.91-1
    k = default_clusters(len(X))
    print(f"\n(b) {len(X)} x 512 synthetic, {args.share:.0%} copies; clustered k={k} vs exact")
    header = ["threshold", "exact removed", "clustered removed", "both", "recall vs exact"]
    header += ["precision vs exact", "pairs >= threshold", "of them in one cluster"]
    print(" | ".join(header + ["exact s", "clustered s"]))
    cluster, centroid_sim = assign_clusters(X, fit_clusters(X, k, seed=0))
    left, right, sims = pairs_above(X, min(args.b_thresholds))
    for t in args.b_thresholds:
        start = time.perf_counter()
        ours, _, _ = semantic_dedup(X, t, k, seed=0, keep="centroid")
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        exact, _ = dedup_cluster(X, t, centroid_sim)  # every pair, the same visiting order
        exact_s = time.perf_counter() - start
        above = sims >= t - 1e-6
        same = (cluster[left[above]] == cluster[right[above]]).mean() if above.any() else 1.0
        a, b = set(np.flatnonzero(ours >= 0)), set(np.flatnonzero(exact >= 0))
        cells = [t, len(b), len(a), len(a & b), f"{len(a & b) / max(1, len(b)):.4f}"]
        cells += [f"{len(a & b) / max(1, len(a)):.4f}", int(above.sum()), f"{same:.4f}"]
        print(" | ".join(map(str, cells + [f"{exact_s:.1f}", f"{ours_s:.1f}"])), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="a,b")
    parser.add_argument("--share", type=float, default=0.15, help="share of rows copied")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--b-thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--b-rows", type=int, default=100_000)
    args = parser.parse_args()
    for part in args.parts.split(","):
        {"a": part_a, "b": part_b}[part.strip()](args)


if __name__ == "__main__":
    main()
