"""Distance to the k-th nearest other member: exact blocked numpy, or faiss for large sets."""

from __future__ import annotations

import math
import threading

import numpy as np

from dedt_ray.selection._util import row_chunks

BLOCK_BYTES = 2**27  # one block of the squared-distance matrix: at most 128 MiB
SCRATCH_BYTES = 2**24  # blocks up to 16 MiB reuse two per-thread scratch arrays

_scratch = threading.local()


def _scratch_array(name: str, shape: tuple[int, int]) -> np.ndarray:
    """A float64 array of `shape`, reused across calls while it is small.

    Many classes mean many same-sized matrices; a fresh large array costs a page fault per
    4 KiB page, which took over half of the knn time for 500-member classes on a VM.
    """
    size = shape[0] * shape[1]
    if 8 * size > SCRATCH_BYTES:
        return np.empty(shape)
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size)
        setattr(_scratch, name, buf)
    return buf[:size].reshape(shape)


def pair_dist(X: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 ||X[rows] - X[cols]|| from the differences (exact 0 for duplicates)."""
    out = np.empty(len(rows))
    for sl in row_chunks(len(rows), X.shape[1]):
        diff = X[rows[sl]] - X[cols[sl]].astype(np.float64)
        out[sl] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def exact_kth(X: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Exact Euclidean distance from each row (or `rows`) to its k-th nearest other row.

    The neighbour is found on float64 ||a||^2 + ||b||^2 - 2ab in row blocks of the distance
    matrix (memory O(block * n)); its distance is then recomputed from the difference.
    """
    n = len(X)
    all_rows = rows is None
    rows = np.arange(n) if rows is None else np.asarray(rows)
    Xc = X - X.mean(axis=0, dtype=np.float64)  # centring keeps ||a||^2 + ||b||^2 - 2ab accurate
    half_sq = 0.5 * np.einsum("ij,ij->i", Xc, Xc)
    step = max(1, BLOCK_BYTES // (8 * n))
    kth = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        part = _scratch_array("gram", (len(block), n))
        # Xc @ Xc.T (one block for the whole class) lets BLAS use the symmetric syrk.
        np.matmul(Xc if all_rows and len(block) == n else Xc[block], Xc.T, out=part)
        np.subtract(half_sq, part, out=part)  # (d2[i, j] - sq[i]) / 2: same order along j
        part[np.arange(len(block)), block] = np.inf  # a row is not its own neighbour
        ordered = _scratch_array("partition", part.shape)
        np.copyto(ordered, part)
        ordered.partition(k - 1, axis=1)  # faster than argpartition
        kth[start : start + len(block)] = (part == ordered[:, k - 1 : k]).argmax(axis=1)
    return pair_dist(X, rows, kth)


def faiss_kth(
    X: np.ndarray,
    k: int,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 8,
    seed: int = 0,
    notes: list[str] | None = None,
) -> np.ndarray:
    """k-th nearest other row found through faiss (float32 L2), its distance in float64.

    `index="flat"` is exact brute force (`faiss.knn`, no index copy of the data);
    `index="ivf"` is an approximate IndexIVFFlat (default nlist = 4 sqrt(n) cells, k-means
    with 10 iterations on 40 * nlist sampled rows, nprobe cells probed); rows whose probed
    cells hold fewer than k + 1 rows are searched exactly.
    """
    import faiss

    X32 = np.ascontiguousarray(X, dtype=np.float32)
    n, d = X32.shape
    if index == "flat":
        D, ids = faiss.knn(X32, X32, k + 1)
    elif index == "ivf":
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 40))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        ivf.cp.seed = seed
        ivf.cp.niter = 10
        rng = np.random.default_rng(seed)
        train = np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))
        ivf.train(X32[train])
        ivf.add(X32)
        ivf.nprobe = min(nprobe, nlist)
        D, ids = ivf.search(X32, k + 1)
        short = np.flatnonzero(ids[:, k] < 0)  # probed cells held fewer than k + 1 rows
        if len(short):
            D[short], ids[short] = faiss.knn(X32[short], X32, k + 1)
        if notes is not None:
            notes.append(
                f"knn: approximate faiss IVF search (nlist={nlist}, nprobe={ivf.nprobe}); "
                f"{len(short)} rows searched exactly"
            )
    else:
        raise ValueError(f"unknown faiss index {index!r}; use 'flat' or 'ivf'")
    # If a row itself is among its first k hits the k-th other one is hit k, else hit k - 1.
    rows = np.arange(n)
    self_in_first_k = (ids[:, :k] == rows[:, None]).any(axis=1)
    return pair_dist(X, rows, ids[rows, np.where(self_in_first_k, k, k - 1)])


def knn_scores(
    X: np.ndarray,
    n_keep: int | None,
    seed: int,
    notes: list[str],
    k: int = 5,
    backend: str = "auto",
    exact_max: int = 20_000,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 8,
) -> np.ndarray:
    """Minus the distance to the k-th nearest other member (densest first).

    A class of <= k members uses its farthest other member; a class of 1 scores 0.
    `backend`: "exact" (blocked float64 numpy), "faiss", or "auto" (faiss above `exact_max`).
    """
    n = len(X)
    if k < 1:
        raise ValueError("k must be >= 1")
    if backend not in ("auto", "exact", "faiss"):
        raise ValueError(f"unknown knn backend {backend!r}; use 'auto', 'exact' or 'faiss'")
    if n == 1:
        notes.append("knn: class of 1, score set to 0")
        return np.zeros(1)
    k_eff = min(k, n - 1)
    if k_eff < k:
        notes.append(f"knn: class of {n} <= k={k}, used the farthest other member")
    if backend == "faiss" or (backend == "auto" and n > exact_max):
        dist = faiss_kth(X, k_eff, index, nlist, nprobe, seed, notes)
    else:
        dist = exact_kth(X, k_eff)
    zero = int((dist == 0).sum())
    if zero:
        notes.append(f"knn: {zero} members have a zero k-th neighbour distance (duplicates)")
    return -dist
