"""Prompt formats, shared by split, distill, sft, eval and the bundle so all see identical text."""

from __future__ import annotations

from typing import Any

# The seed's CMRC template, byte for byte.
CMRC_TEMPLATE = "请用下面的文段的原文来回答问题\n\n### 已知文段:{context}\n\n### 问题:{question}\n"

# What the assistant says when the passages it was given do not hold the answer: sft teaches it
# (examples whose passages miss the answer), the bundle flags it (`abstained`), eval counts it.
NO_ANSWER = "文段中没有提到。"

# The maths chain-of-thought instruction: the teacher and the student both see it.
MATH_TEMPLATE = (
    "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)


# Starts the box when a maths answer ended without one (package.force_box): the model then writes
# only the final number.
FORCE_BOX = "\n\nThe final answer is \\boxed{"


def cmrc_prompt(context: str, question: str) -> str:
    return CMRC_TEMPLATE.format(context=context, question=question)


def join_passages(texts: list[str]) -> str:
    """Retrieved passages as one context, best first: how the bundle serves them and sft trains on them."""
    return "\n".join(texts)


def is_abstention(answer: str) -> bool:
    """The answer is the abstention reply (punctuation and spaces aside)."""
    strip = "。.！!，, \n\t"
    return answer.strip().strip(strip) == NO_ANSWER.strip(strip)


def math_prompt(question: str) -> str:
    return MATH_TEMPLATE.format(question=question)


def alpaca_record(instruction: str, output: str, input_text: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": input_text, "output": output}


def alpaca_user_text(record: dict[str, Any]) -> str:
    """The user turn of an Alpaca record: instruction, then input when there is one."""
    instruction, extra = record.get("instruction", ""), record.get("input", "")
    return f"{instruction}\n{extra}" if extra else instruction


def chat_messages(user_text: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_text})
    return messages


def apply_chat_template(tokenizer, user_text: str, system: str | None = None) -> str:
    """The generation prompt for one user turn in the model's own chat template."""
    return tokenizer.apply_chat_template(
        chat_messages(user_text, system), tokenize=False, add_generation_prompt=True
    )
