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
