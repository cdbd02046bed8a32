"""Metrics shared by distill, embed_ft, eval and the bundle.

Reading comprehension is scored with CMRC2018's official EM and F1 (`cmrc_official_em`,
`cmrc_official_f1`), re-implemented rule for rule from ymcui/cmrc2018 baseline/cmrc2018_evaluate.py (v6)
so that our numbers compare with published ones; ragtune's own diagnostics (strict and normalised EM,
containment, similarity) sit beside them.

One deliberate deviation, the word tokenizer. The official script tokenizes each non-Chinese run with
`nltk.word_tokenize`, which needs NLTK's downloaded punkt sentence model (not installable from PyPI).
We call `nltk.tokenize.NLTKWordTokenizer().tokenize(run)`, which needs no data. In NLTK (read in 3.10.4)
`word_tokenize(text)` is exactly that tokenizer applied to each sentence of `sent_tokenize(text)`, so
what we compute is `word_tokenize(text, preserve_line=True)`. The two differ only where punkt finds a
sentence boundary *inside* one non-Chinese run, through the tokenizer's two rules anchored to the ends
of its input, which word_tokenize then also applies at every inner boundary:

1. the final-period rule: a period ending a sentence (possibly followed by closing brackets or quotes
   `)]}>"'»”’`) is split off. "went home. he slept" gives word_tokenize [..., "home", ".", "he", ...]
   and us [..., "home.", "he", ...]; likewise "(home.) then" and 'said "home." then';
2. the opening-quote rule `^"` -> "``": a '"' opening the next sentence after a newline or tab becomes
   "``" under word_tokenize and "''" here (after a plain space both give "``").

"?" and "!" are split everywhere by both, and the end of the run is treated identically. Whether punkt
breaks at all depends on its English model (not after abbreviations it knows such as "mr." or "e.g.",
often not after a number followed by a lower-case word; the official script lower-cases first).
Chinese characters never reach the tokenizer and "。" is dropped before it, so this can only matter for
an English run holding more than one sentence, which CMRC answers practically never contain: on 300
perturbed trial answers (tests/data/cmrc_official_scores.json) the scores agree exactly.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from decimal import Decimal, InvalidOperation

# --------------------------------------------------------------------------- maths answers

# A number in free text. Commas count only as thousands separators ("1,234,567"; in "1,2,3" the last number
# is 3). A minus sign counts only when it is not glued to a preceding digit, Latin letter or closing
# bracket: "3-2" is a score or a range and reads 2, "x-3" is a subtraction, while " -2", "(-5)", "x=-3",
# "-$5" and "等于-3" are negative (a Chinese character before the sign is a word, not an operand).
_NUMBER = re.compile(r"(?:(?<![\dA-Za-z)\]}])-\$?)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)|(?<!\d)\.\d+)")
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
        value = Decimal(s)
    except InvalidOperation:
        return None
    return _canonical(value) if value.is_finite() else None  # "inf" and "nan" parse but are no answer


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
#
# CMRC2018's official EM and F1 (ymcui/cmrc2018, baseline/cmrc2018_evaluate.py, v6), re-implemented
# rule for rule so that our numbers can be compared with published ones:
#
# * segmentation: lower case and strip the text; drop each character of the script's own special-character
#   list *in place* (the pending run is not flushed, so "new-york" -> "newyork"); a character in
#   [\u4e00-\u9fa5] flushes the pending run through the word tokenizer and is a token of its own; any other
#   character joins the pending run; the last run is flushed the same way.
# * F1: longest common contiguous token run between gold and prediction, P = lcs/len(pred),
#   R = lcs/len(gold), 2PR/(P+R), 0 when nothing is shared; the best gold counts.
# * EM: the special characters removed from both lower-cased, stripped strings, then plain string equality
#   against any gold (so an empty prediction matches a gold that is empty after the removal).
#
# The special-character list is the script's, character for character. Its "……" entry is two characters
# long, so it can never equal a single character: "…" is kept. Much other punctuation is kept too:
# "【】—,.\"'()" and the like are not in the list and survive as (parts of) tokens.
#
# Word tokenizer: NLTKWordTokenizer in place of nltk.word_tokenize; the module docstring says where they differ.

OFFICIAL_SPECIAL_CHARS: tuple[str, ...] = (
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
)  # fmt: skip
# Membership of one character; the two-character "……" entry can never match, exactly as in the script.
_OFFICIAL_SPECIAL = frozenset(OFFICIAL_SPECIAL_CHARS)


def _is_official_cjk(ch: str) -> bool:
    """The script's test for a Chinese character: re.search('[\\u4e00-\\u9fa5]', ch)."""
    return "\u4e00" <= ch <= "\u9fa5"


@functools.cache
def _word_tokenizer():
    """NLTK's Treebank-style word tokenizer, imported on first use (importing nltk takes seconds)."""
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def _tokenize_run(run: str) -> list[str]:
    return _word_tokenizer().tokenize(run) if run else []


def official_segmentation(text: str) -> list[str]:
    """CMRC2018's `mixed_segmentation(text, rm_punc=True)`: one token per Chinese character, NLTK words
    for the runs between them, the official special characters dropped without splitting the run."""
    tokens: list[str] = []
    run = ""
    for ch in str(text).lower().strip():
        if ch in _OFFICIAL_SPECIAL:
            continue
        if _is_official_cjk(ch):
            tokens.extend(_tokenize_run(run))
            run = ""
            tokens.append(ch)
        else:
            run += ch
    tokens.extend(_tokenize_run(run))
    return tokens


def official_remove_punctuation(text: str) -> str:
    """CMRC2018's `remove_punctuation`: lower case, stripped, official special characters dropped."""
    return "".join(ch for ch in str(text).lower().strip() if ch not in _OFFICIAL_SPECIAL)


def longest_common_run(a: list[str], b: list[str]) -> int:
    """Length of the longest contiguous token run shared by `a` and `b` (the script's `find_lcs`)."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def _require_golds(golds: list[str]) -> None:
    """The script takes max() over the golds, which fails on none; say so plainly instead."""
    if not golds:
        raise ValueError("no gold answers: CMRC2018's EM and F1 need at least one")


def cmrc_official_f1(prediction: str, golds: list[str]) -> float:
    """CMRC2018's official per-question F1 as a fraction in [0, 1] (the script reports 100x the mean)."""
    _require_golds(golds)
    pred = official_segmentation(prediction)
    best = 0.0
    for gold in golds:
        ref = official_segmentation(gold)
        common = longest_common_run(ref, pred)
        if common:
            precision = 1.0 * common / len(pred)
            recall = 1.0 * common / len(ref)
            best = max(best, (2 * precision * recall) / (precision + recall))
    return best


def cmrc_official_em(prediction: str, golds: list[str]) -> bool:
    """CMRC2018's official EM: equal strings after `official_remove_punctuation`, for some gold."""
    _require_golds(golds)
    pred = official_remove_punctuation(prediction)
    return any(official_remove_punctuation(gold) == pred for gold in golds)


def strict_exact_match(prediction: str, golds: list[str]) -> bool:
    """The seed's exact match, kept for continuity: `prediction.strip() == gold` for some gold answer."""
    return any(prediction.strip() == gold for gold in golds)


def _is_punctuation(ch: str) -> bool:
    """Punctuation for ragtune's own normalised EM: the official special characters or any Unicode P*."""
    return ch in _OFFICIAL_SPECIAL or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """NFKC, lower case, punctuation and spaces removed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    return "".join(ch for ch in text if not (ch.isspace() or _is_punctuation(ch)))


def normalized_exact_match(prediction: str, golds: list[str]) -> bool:
    """ragtune's lenient EM: equal after `normalize_answer` on both sides, against any gold; empty never
    matches. Broader than the official EM (all Unicode punctuation, full width, spaces)."""
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
    """The per-example reading-comprehension scores, each in [0, 1] (similarity is batched separately):
    the official CMRC2018 EM and F1, then ragtune's diagnostics."""
    return {
        "official_em": float(cmrc_official_em(prediction, golds)),
        "official_f1": cmrc_official_f1(prediction, golds),
        "strict_em": float(strict_exact_match(prediction, golds)),
        "normalized_em": float(normalized_exact_match(prediction, golds)),
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
