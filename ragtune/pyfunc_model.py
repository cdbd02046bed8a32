"""The bundle as an MLflow pyfunc model, logged from code (`mlflow.pyfunc.log_model(python_model=<this file>)`).

Input: a DataFrame with a `question` column (or a list of questions, or one string).
Output: a DataFrame with `answer` (the final answer: the extracted number for maths), `route`,
`sources` (JSON list of {chunk_id, title, text, score}) and `text` (the generator's full text).
The bundle travels as the model's artifact `bundle`; the base generator is found as `ragtune serve`
finds it (model_config `base_dir`, $RAGTUNE_BASE_GENERATOR, or the manifest's project path).
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def questions_of(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        if "question" not in model_input.columns:
            raise ValueError(f"input needs a 'question' column, got {list(model_input.columns)}")
        return [str(q) for q in model_input["question"].tolist()]
    if isinstance(model_input, dict):
        value = model_input.get("question")
        return [value] if isinstance(value, str) else [str(q) for q in value or []]
    return [str(q) for q in model_input]


class BundleModel(PythonModel):
    def load_context(self, context) -> None:
        from ragtune.bundle import Bundle

        config = context.model_config or {}
        self.max_new_tokens = config.get("max_new_tokens")
        self.bundle = Bundle.load(context.artifacts["bundle"], base_dir=config.get("base_dir") or None)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        max_new_tokens = (params or {}).get("max_new_tokens") or self.max_new_tokens
        results = self.bundle.answer_many(questions_of(model_input), max_new_tokens=max_new_tokens)
        return pd.DataFrame(
            {
                "answer": [str(r["answer"]) for r in results],
                "route": [r["route"] for r in results],
                "sources": [json.dumps(r["sources"], ensure_ascii=False) for r in results],
                "text": [r["text"] for r in results],
            }
        )


mlflow.models.set_model(BundleModel())
