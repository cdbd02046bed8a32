"""Prompt formats, shared by split, distill, sft, eval and the bundle so all see identical text."""

from __future__ import annotations

from typing import Any

# The seed's CMRC template, byte for byte.
CMRC_TEMPLATE = "请用下面的文段的原文来回答问题\n\n### 已知文段:{context}\n\n### 问题:{question}\n"

# The maths chain-of-thought instruction: the teacher and the student both see it.
MATH_TEMPLATE = (
    "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)


def cmrc_prompt(context: str, question: str) -> str:
    return CMRC_TEMPLATE.format(context=context, question=question)


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
