"""Metrics shared by distill, embed_ft, eval and the bundle."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# --------------------------------------------------------------------------- maths answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"^\\d?frac\{(-?[\d.,]+)\}\{(-?[\d.,]+)\}$")


def extract_boxed(text: str) -> list[str]:
    r"""Contents of every \boxed{...} in `text`, nested braces included, in order."""
    found, start = [], 0
    while (i := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # unbalanced: not a box
            break
        found.append(text[i + len("\\boxed{") : j - 1])
        start = j
    return found


def normalize_number(text: str) -> str | None:
    r"""A canonical form of a numeric answer, or None: '1,000' = '1000' = '1000.0' = '$1000' -> '1000';
    '\frac{1}{2}' = '0.5'."""
    s = text.strip().replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{[^{}]*\}|\\%|%", "", s).strip().rstrip(".").strip()
    if match := _FRAC.match(s.replace(" ", "")):
        num, den = (normalize_number(g) for g in match.groups())
        if num is None or den is None or Decimal(den) == 0:
            return None
        return _canonical(Decimal(num) / Decimal(den))
    s = s.replace(",", "").replace(" ", "")
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        return None if int(den) == 0 else _canonical(Decimal(num) / Decimal(den))
    try:
        return _canonical(Decimal(s))
    except InvalidOperation:
        return None


def _canonical(value: Decimal) -> str:
    value = value.quantize(Decimal("1.000000")) if value != value.to_integral_value() else value
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def math_answer(text: str) -> tuple[str | None, str]:
    r"""(normalised answer or None, how it was found): 'boxed'; 'conflicting_boxes' when boxes
    disagree (counts as wrong); 'no_box' when the last number stands in for a missing box;
    'no_number' when there is nothing to read (a format failure)."""
    boxes = extract_boxed(text)
    if boxes:
        values = {normalize_number(b) for b in boxes}
        if len(values) > 1:
            return None, "conflicting_boxes"
        value = values.pop()
        return value, "boxed" if value is not None else "unparsable_box"
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None, "no_number"
    return normalize_number(numbers[-1]), "no_box"


def math_correct(prediction: str, gold: str) -> bool:
    value, _ = math_answer(prediction)
    return value is not None and value == normalize_number(gold)


# --------------------------------------------------------------------------- reading-comprehension answers (eval)

# The official CMRC2018 evaluation script's punctuation list; any Unicode punctuation is removed too.
_CMRC_SPECIAL = set("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』") | {"……"}
_CJK = re.compile(r"[\u4e00-\u9fa5]")
# Stands in for nltk.word_tokenize (not installed) on the non-CJK runs: words, numbers, other symbols.
_WORD = re.compile(r"\w+(?:[.'’]\w+)*|[^\w\s]")


def _is_punctuation(ch: str) -> bool:
    import unicodedata

    return ch in _CMRC_SPECIAL or unicodedata.category(ch).startswith("P")


def mixed_segmentation(text: str) -> list[str]:
    """CMRC's tokens: each CJK character one token, other runs split into words; lower case,
    the official script's symbols dropped, then tokens made only of punctuation dropped."""
    tokens: list[str] = []
    run = ""
    for ch in str(text).lower().strip():
        if ch in _CMRC_SPECIAL:  # dropped in place, as the official script does ("new-york" -> "newyork")
            continue
        if _CJK.match(ch):
            tokens.extend(_words(run))
            run = ""
            tokens.append(ch)
        else:
            run += ch
    tokens.extend(_words(run))
    return tokens


def _words(run: str) -> list[str]:
    return [t for t in _WORD.findall(run) if not all(_is_punctuation(c) for c in t)]


def _longest_common_substring(a: list[str], b: list[str]) -> int:
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def cmrc_f1(prediction: str, golds: list[str]) -> float:
    """CMRC2018's official F1: longest common substring of mixed-segmentation tokens, max over golds."""
    pred = mixed_segmentation(prediction)
    best = 0.0
    for gold in golds:
        ref = mixed_segmentation(gold)
        common = _longest_common_substring(ref, pred)
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(prediction: str, golds: list[str]) -> bool:
    """The seed's exact match: `prediction.strip() == gold` for some gold answer."""
    return any(prediction.strip() == gold for gold in golds)


def normalize_answer(text: str) -> str:
    """NFKC, lower case, punctuation and spaces removed."""
    import unicodedata

    text = unicodedata.normalize("NFKC", str(text)).lower()
    return "".join(ch for ch in text if not (ch.isspace() or _is_punctuation(ch)))


def normalized_exact_match(prediction: str, golds: list[str]) -> bool:
    """Exact match after `normalize_answer` on both sides, against any gold; empty never matches."""
    pred = normalize_answer(prediction)
    return bool(pred) and any(pred == normalize_answer(g) for g in golds)


def contained(prediction: str, context: str) -> bool:
    """The answer is non-empty and copied verbatim from the context it was given."""
    pred = prediction.strip()
    return bool(pred) and pred in context


def semantic_similarity(embedder, predictions: list[str], golds: list[list[str]], batch_size: int = 64) -> list[float]:
    """Cosine of the embedder's embeddings of each prediction and its golds, clipped to [0, 1],
    max over golds; an empty prediction scores 0. `embedder` is a SentenceTransformer."""
    import numpy as np

    flat_golds = [g for gs in golds for g in gs]
    texts = list(dict.fromkeys([p.strip() for p in predictions if p.strip()] + flat_golds))
    vectors = embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    index = {t: vectors[i] for i, t in enumerate(texts)}
    scores = []
    for pred, gs in zip(predictions, golds, strict=True):
        if not pred.strip() or not gs:
            scores.append(0.0)
            continue
        cos = max(float(np.dot(index[pred.strip()], index[g])) for g in gs)
        scores.append(min(1.0, max(0.0, cos)))
    return scores


def cmrc_example_scores(prediction: str, golds: list[str], context: str) -> dict[str, float]:
    """The per-example reading-comprehension scores (similarity is batched separately)."""
    return {
        "exact_match": float(exact_match(prediction, golds)),
        "normalized_exact_match": float(normalized_exact_match(prediction, golds)),
        "f1": cmrc_f1(prediction, golds),
        "containment": float(contained(prediction, context)),
    }


def math_example_scores(prediction: str, gold: str) -> dict[str, object]:
    """Per-example GSM8K scores: correctness and how the answer was read (format failures show there)."""
    value, how = math_answer(prediction)
    return {"correct": float(value is not None and value == normalize_number(gold)), "answer": value, "format": how}


def mean_scores(rows: list[dict], keys: list[str]) -> dict[str, float]:
    """Average each key over rows (0 when there are none)."""
    return {k: (sum(float(r[k]) for r in rows) / len(rows) if rows else 0.0) for k in keys}


# --------------------------------------------------------------------------- retrieval (binary relevance)


def first_relevant_rank(ranked: list[str], gold: set[str] | list[str], cutoff: int | None = None) -> int | None:
    """1-based rank of the first gold id among `ranked[:cutoff]`, or None."""
    gold = set(gold)
    for rank, item in enumerate(ranked[:cutoff] if cutoff else ranked, start=1):
        if item in gold:
            return rank
    return None


def hit_at(ranked: list[str], gold: set[str] | list[str], k: int) -> float:
    """1.0 if any gold id is in the top k, else 0.0."""
    return 1.0 if first_relevant_rank(ranked, gold, k) else 0.0


def reciprocal_rank(ranked: list[str], gold: set[str] | list[str], cutoff: int = 10) -> float:
    rank = first_relevant_rank(ranked, gold, cutoff)
    return 1.0 / rank if rank else 0.0


def ndcg_at(ranked: list[str], gold: set[str] | list[str], cutoff: int = 10) -> float:
    """nDCG@cutoff with binary gains: DCG = sum 1/log2(rank+1) over gold hits (each gold id counted
    once), ideal DCG = all gold ids at the top."""
    import math

    gold = set(gold)
    if not gold:
        return 0.0
    seen: set[str] = set()
    dcg = 0.0
    for rank, item in enumerate(ranked[:cutoff], start=1):
        if item in gold and item not in seen:
            seen.add(item)
            dcg += 1.0 / math.log2(rank + 1)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(gold), cutoff) + 1))
    return dcg / ideal


def retrieval_metrics(
    ranked: list[list[str]], gold: list[list[str]], ks: tuple[int, ...] = (1, 3, 5), cutoff: int = 10
) -> dict[str, float]:
    """Means over queries of hit@k for each k, MRR@cutoff and nDCG@cutoff, plus `queries`.
    `ranked[i]` is the retrieved ids for query i, best first; `gold[i]` its relevant ids."""
    if len(ranked) != len(gold):
        raise ValueError(f"{len(ranked)} rankings for {len(gold)} gold lists")
    n = len(ranked)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = sum(hit_at(r, g, k) for r, g in zip(ranked, gold)) / n if n else 0.0
    out[f"mrr@{cutoff}"] = sum(reciprocal_rank(r, g, cutoff) for r, g in zip(ranked, gold)) / n if n else 0.0
    out[f"ndcg@{cutoff}"] = sum(ndcg_at(r, g, cutoff) for r, g in zip(ranked, gold)) / n if n else 0.0
    out["queries"] = n
    return out
