"""Speed and memory of dedt_ray.selection, measured in one run.

(a) dedt_ray.selection vs the reference computation on the same data (sklearn
    GaussianMixture(n_components=1, reg_covar=1e-5).score_samples per class; sklearn
    pairwise_distances + k-th value per class for knn): wall time, speed ratio, and whether
    the kept rows are the same.
(b) a class-wise run at ImageNet scale (synthetic clustered float32 embeddings; full size is
    --b-rows 1281167 --b-classes 1000): gaussian and knn wall time and peak RSS.
(c) unlabelled knn through faiss (flat = exact, ivf = approximate): wall time and peak RSS.
(d) the Ray `select` stage (groupby label + map_groups) on the part (b) embeddings written as
    embed/embeddings.parquet: wall time and peak memory (PSS) of the driver and every Ray
    process together.
(e) label-free curation through the Ray `select` stage: the part (b) embeddings without
    labels and with injected near-duplicates (--e-duplicates of the rows overwritten by noisy
    copies of others); spherical k-means groups, semantic dedup at 0.95, gaussian selection:
    wall time, peak PSS, rows removed and the injected pairs found (and without dedup).

Every measurement runs in a fresh process (its peak RSS is its own); data is generated there
from a seed, so every process sees the same embeddings.

    python benchmarks/selection_speed.py --parts a,b,c
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil


def clustered(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, d] embeddings: per class a shifted low-rank blob plus isotropic noise."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    X = np.empty((n, d), dtype=np.float32)
    rank = min(32, d)
    for c in range(classes):
        idx = np.flatnonzero(y == c)
        mix = rng.standard_normal((rank, d), dtype=np.float32) / np.sqrt(rank)
        X[idx] = rng.standard_normal((len(idx), rank), dtype=np.float32) @ mix
        X[idx] += 0.3 * rng.standard_normal((len(idx), d), dtype=np.float32)
        X[idx] += 2.0 * rng.standard_normal(d, dtype=np.float32)
    return X, y


def ref_gaussian(Xc: np.ndarray) -> np.ndarray:
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=1, reg_covar=1e-5, covariance_type="full")
    return gm.fit(Xc).score_samples(Xc)


def ref_knn(Xc: np.ndarray, k: int = 5) -> np.ndarray:
    from sklearn.metrics import pairwise_distances

    dist = pairwise_distances(Xc)
    np.fill_diagonal(dist, np.inf)
    return -np.partition(dist, k - 1, axis=1)[:, k - 1]


def reference_select(X: np.ndarray, y: np.ndarray, criterion: str, keep_ratio: float):
    """The reference: per class, score with sklearn, keep the top max(1, round(r * n_c))."""
    from dedt_ray.selection import class_groups

    fn = {"gaussian": ref_gaussian, "knn": ref_knn}[criterion]
    kept = []
    for _, idx in class_groups(y, len(X)):
        scores = fn(X[idx])
        n_keep = max(1, round(keep_ratio * len(idx)))
        kept.append(idx[np.argsort(-scores, kind="stable")[:n_keep]])
    return np.sort(np.concatenate(kept))


def _job(data: dict[str, Any], task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Child process: build the data, run one task, report wall time and memory."""
    from threadpoolctl import threadpool_limits

    from dedt_ray.selection import select

    X, y = clustered(data["n"], data["d"], data["classes"], data["seed"])
    if data.get("unlabelled"):
        y = None
    data_rss = psutil.Process().memory_info().rss
    cpu0 = sum(psutil.Process().cpu_times()[:2])
    start = time.perf_counter()
    if task == "ours":
        kept = select(X, y, **kwargs)
    else:
        with threadpool_limits(kwargs.pop("threads", None), user_api="blas"):
            kept = reference_select(X, y, **kwargs)
    wall = time.perf_counter() - start
    cpu = sum(psutil.Process().cpu_times()[:2]) - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "wall": wall,
        "cpu": cpu,
        "kept": kept,
        "data_gb": data_rss / 2**30,
        "peak_gb": peak / 2**30,
    }


def with_near_duplicates(
    X: np.ndarray, fraction: float, seed: int, noise: tuple[float, float] = (0.02, 0.02)
) -> np.ndarray:
    """Overwrite `fraction` of the rows with noisy copies of other rows (in place): the
    (copy, source) row pairs. Per copy, Gaussian noise of a std drawn from U(noise) per
    coordinate: 0.02 gives cosine ~0.9999 on `clustered` rows, 1.0 about 0.91."""
    rng = np.random.default_rng(seed)
    n = len(X)
    rows = rng.permutation(n)[: 2 * int(fraction * n)]
    copies, sources = rows[0::2], rows[1::2]
    for sl in np.array_split(np.arange(len(copies)), max(1, len(copies) // 65536)):
        shape = (len(sl), X.shape[1])
        std = rng.uniform(*noise, (len(sl), 1)).astype(np.float32)
        X[copies[sl]] = X[sources[sl]] + std * rng.standard_normal(shape, dtype=np.float32)
    return np.stack([copies, sources], axis=1)


def found_pairs(duplicates, pairs: np.ndarray) -> float:
    """Fraction of injected (copy, source) pairs of which one was removed for the other."""
    got = set(
        zip(
            duplicates.column("id").to_pylist(),
            duplicates.column("duplicate_of").to_pylist(),
            strict=True,
        )
    )
    names = pairs.astype(str)
    hit = [(a, b) in got or (b, a) in got for a, b in names]
    return float(np.mean(hit)) if len(hit) else 0.0


def _stage_job(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Child process: write the embeddings as the embed stage does, run the Ray select stage."""
    import tempfile

    import pyarrow.parquet as pq
    import ray
    from peak_memory import PeakMemory

    from dedt_ray.config import load_config
    from dedt_ray.embed import EMBEDDINGS, embedding_table
    from dedt_ray.selection import stage
    from dedt_ray.store import RunStore

    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        X, y = clustered(data["n"], data["d"], data["classes"], data["seed"])
        pairs = np.zeros((0, 2), dtype=np.int64)
        if data.get("unlabelled"):
            y[:] = -1
        if data.get("duplicates"):
            pairs = with_near_duplicates(X, data["duplicates"], data["seed"] + 1)
        path = store.path("embed", EMBEDDINGS)
        os.makedirs(path)
        step = 100_000
        for i in range(0, len(X), step):  # files of 100k rows, like embed.rows_per_file
            part = embedding_table(
                map(str, range(i, min(i + step, len(X)))), y[i : i + step], X[i : i + step]
            )
            pq.write_table(part, f"{path}/part-{i // step:03d}.parquet")
        del X, y, part
        cfg = load_config(None, overrides)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with PeakMemory() as mem:
            start = time.perf_counter()
            out = stage.run(cfg, store)
            wall = time.perf_counter() - start
        ray.shutdown()
        found = None
        if cfg.select.dedup:
            found = found_pairs(pq.read_table(store.path("select", "duplicates.parquet")), pairs)
    return {
        "wall": wall,
        "kept": out["kept"],
        "base_gb": mem.base / 2**30,
        "peak_gb": mem.peak / 2**30,
        "removed": (out.get("dedup") or {}).get("removed", 0),
        "groups": out["grouping"]["groups"],
        "injected": len(pairs),
        "found": found,
    }


def stage_run(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_stage_job, (data, overrides))


def isolated(data: dict[str, Any], task: str, **kwargs: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_job, (data, task, kwargs))


def table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def part_a(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    data = {"n": args.a_rows, "d": args.a_dim, "classes": args.a_classes, "seed": 0}
    log(f"(a) {args.a_rows} x {args.a_dim}, {args.a_classes} classes, keep {args.keep_ratio}")
    rows = []
    for criterion in ("gaussian", "knn"):
        ours = isolated(data, "ours", criterion=criterion, keep_ratio=args.keep_ratio)
        refs = {
            threads: isolated(
                data, "ref", criterion=criterion, keep_ratio=args.keep_ratio, threads=threads
            )
            for threads in (None, 1)
        }
        best = min(refs.values(), key=lambda r: r["wall"])
        diff = max(len(np.setxor1d(ours["kept"], r["kept"])) for r in refs.values())
        rows.append(
            [
                criterion,
                ours["wall"],
                ours["cpu"],
                refs[None]["wall"],
                refs[1]["wall"],
                best["cpu"],
                best["wall"] / ours["wall"],
                best["cpu"] / ours["cpu"],
                "identical" if diff == 0 else f"{diff} rows differ",
            ]
        )
    header = ["criterion", "ours s", "ours cpu s", "ref s", "ref 1-thread s", "ref cpu s"]
    table(rows, header + ["speed-up wall", "speed-up cpu", "kept vs ref"])
    log("ref cpu s / speed-ups are against the faster reference run (default or 1 BLAS thread)")


def part_b(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    data = {"n": args.b_rows, "d": args.b_dim, "classes": args.b_classes, "seed": 1}
    gb = args.b_rows * args.b_dim * 4 / 2**30
    log(f"(b) class-wise {args.b_rows} x {args.b_dim} float32 ({gb:.2f} GiB), {args.b_classes} cl.")
    rows = []
    for criterion in ("gaussian", "knn"):
        r = isolated(data, "ours", criterion=criterion, keep_ratio=args.keep_ratio)
        rows.append([criterion, r["wall"], r["cpu"], r["data_gb"], r["peak_gb"], len(r["kept"])])
    table(rows, ["criterion", "wall s", "cpu s", "RSS with data GiB", "peak RSS GiB", "kept"])


def part_c(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    data = {"n": args.c_rows, "d": args.c_dim, "classes": args.c_clusters, "seed": 2}
    data["unlabelled"] = True
    log(f"(c) unlabelled knn, {args.c_rows} x {args.c_dim} float32 ({args.c_clusters} clusters)")
    rows, kept = [], {}
    for index in args.c_index.split(","):
        r = isolated(
            data, "ours", criterion="knn", keep_ratio=args.keep_ratio, backend="faiss", index=index
        )
        kept[index] = r["kept"]
        rows.append([index, r["wall"], r["cpu"], r["data_gb"], r["peak_gb"], len(r["kept"])])
    table(rows, ["faiss index", "wall s", "cpu s", "RSS with data GiB", "peak RSS GiB", "kept"])
    if {"flat", "ivf"} <= set(kept):
        same = len(np.intersect1d(kept["flat"], kept["ivf"])) / len(kept["flat"])
        log(f"ivf keeps {same:.4f} of the rows exact (flat) search keeps")


def part_d(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    data = {"n": args.b_rows, "d": args.b_dim, "classes": args.b_classes, "seed": 1}
    gb = args.b_rows * args.b_dim * 4 / 2**30
    log(f"(d) Ray select stage, {args.b_rows} x {args.b_dim} ({gb:.2f} GiB), {args.b_classes} cl.")
    rows = []
    for criterion in ("gaussian", "knn"):
        overrides = [f"select.criterion={criterion}", f"select.keep_ratio={args.keep_ratio}"]
        r = stage_run(data, overrides)
        rows.append(
            [criterion, r["wall"], r["base_gb"], r["peak_gb"], r["peak_gb"] / gb, r["kept"]]
        )
    table(rows, ["criterion", "wall s", "PSS idle GiB", "peak PSS GiB", "peak / matrix", "kept"])


def part_e(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    data = {"n": args.b_rows, "d": args.b_dim, "classes": args.b_classes, "seed": 3}
    data.update(unlabelled=True, duplicates=args.e_duplicates)
    gb = args.b_rows * args.b_dim * 4 / 2**30
    log(
        f"(e) Ray select stage, unlabelled {args.b_rows} x {args.b_dim} ({gb:.2f} GiB), "
        f"{args.b_classes} latent classes, {args.e_duplicates:.0%} of rows overwritten by "
        "near-duplicates; groups=clusters (default k), dedup 0.95, gaussian"
    )
    rows = []
    for dedup in ("true", "false"):
        overrides = [f"select.dedup={dedup}", f"select.keep_ratio={args.keep_ratio}"]
        r = stage_run(data, overrides)
        found = "-" if r["found"] is None else f"{r['found']:.4f}"
        rows.append(
            [dedup, r["wall"], r["base_gb"], r["peak_gb"], r["peak_gb"] / gb, r["groups"]]
            + [r["removed"], r["injected"], found, r["kept"]]
        )
    header = ["dedup", "wall s", "PSS idle GiB", "peak PSS GiB", "peak / matrix", "groups"]
    table(rows, header + ["removed", "injected pairs", "pairs found", "kept"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="a,b,c", help="comma list of a, b, c, d, e")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--a-rows", type=int, default=50_000)
    parser.add_argument("--a-dim", type=int, default=128)
    parser.add_argument("--a-classes", type=int, default=100)
    parser.add_argument("--b-rows", type=int, default=128_000, help="full ImageNet: 1281167")
    parser.add_argument("--b-dim", type=int, default=512)
    parser.add_argument("--b-classes", type=int, default=100, help="full ImageNet: 1000")
    parser.add_argument("--c-rows", type=int, default=200_000)
    parser.add_argument("--c-dim", type=int, default=512)
    parser.add_argument("--c-clusters", type=int, default=1000, help="latent clusters")
    parser.add_argument("--c-index", default="ivf", help="comma list of flat, ivf")
    parser.add_argument("--e-duplicates", type=float, default=0.05, help="rows made copies")
    args = parser.parse_args()

    def log(msg: str) -> None:
        load = ", ".join(f"{v:.1f}" for v in psutil.getloadavg())
        print(f"\n{msg}  [load average {load}]", flush=True)

    log(f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    for part in args.parts.split(","):
        parts = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}
        parts[part.strip()](args, log)


if __name__ == "__main__":
    main()
