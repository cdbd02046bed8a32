"""ragtune.raft: SFT contexts built as the served path builds them (the gold chunk always among the
passages, distractors never holding the answer, k honoured, seeded), gold-only and abstention
examples in their shares, and passages dropped (never the gold one) to fit the token budget."""

import pytest

from ragtune.prompts import NO_ANSWER, cmrc_prompt, join_passages
from ragtune.raft import ContextSettings, build_contexts
from ragtune.records import KbChunk, ReadingQuestion
from ragtune.retrieval import BM25Index

# Four articles of three chunks each; every question's answer sits in chunk 1 of its article, and one
# distractor in its own article (chunk 2) repeats the answer (it must never serve as a distractor).
TOPICS = ["长江", "黄河", "珠江", "淮河"]


def corpus():
    chunks, questions = [], []
    for a, river in enumerate(TOPICS):
        aid = f"A{a}"
        texts = [f"{river}流经很多省份，{river}两岸风景优美。", f"{river}的长度是{1000 + a}公里，{river}非常有名。",
                 f"人们常说{river}有{1000 + a}公里长，{river}是母亲河。"]
        chunks += [KbChunk(chunk_id=f"{aid}-{i}", article_id=aid, title=river, text=t) for i, t in enumerate(texts)]
        questions.append(ReadingQuestion(id=f"Q{a}", question=f"{river}的长度是多少公里？", answers=[f"{1000 + a}"],
                                         article_id=aid, gold_chunk_ids=[f"{aid}-1"], context=texts[1]))
    return chunks, questions


def index_of(chunks):
    return BM25Index([c.chunk_id for c in chunks], [c.text for c in chunks])


def passages_of(record):
    context = record.instruction.split("### 已知文段:")[1].split("\n\n### 问题:")[0]
    return context.split("\n")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gold_always_present_distractors_never_hold_the_answer_k_honoured(k):
    chunks, questions = corpus()
    settings = ContextSettings(kind="retrieved", gold_only_share=0, abstain_share=0)
    records, counts = build_contexts(questions * 5, chunks, settings, retriever=index_of(chunks), top_k=k, seed=3)
    assert counts["retrieved"] == 20
    by_text = {c.text: c for c in chunks}
    for q, record in zip(questions * 5, records, strict=True):
        passages = passages_of(record)
        assert len(passages) == k and record.output == q.answers[0]
        gold = [p for p in passages if by_text[p].chunk_id in q.gold_chunk_ids]
        assert len(gold) == 1 and q.answers[0] in gold[0]  # whole chunk: the answer never cut out
        assert all(q.answers[0] not in p for p in passages if p not in gold)
        assert record.instruction == cmrc_prompt(join_passages(passages), q.question)  # the served template


def test_seeded_and_shares_respected():
    chunks, questions = corpus()
    settings = ContextSettings(kind="retrieved", gold_only_share=0.3, abstain_share=0.2)
    many = questions * 50
    first, counts = build_contexts(many, chunks, settings, retriever=index_of(chunks), top_k=2, seed=7)
    again, _ = build_contexts(many, chunks, settings, retriever=index_of(chunks), top_k=2, seed=7)
    other, _ = build_contexts(many, chunks, settings, retriever=index_of(chunks), top_k=2, seed=8)
    assert first == again and first != other
    assert abs(counts["abstain"] / 200 - 0.2) < 0.08 and abs(counts["gold_only"] / 200 - 0.3) < 0.08
    for q, record in zip(many, first, strict=True):
        if record.output == NO_ANSWER:  # abstention: no passage holds the answer, none is from its article
            assert all(q.answers[0] not in p for p in passages_of(record))
        elif len(passages_of(record)) == 1:
            assert passages_of(record) == [q.context]


def test_gold_inserted_when_the_retriever_misses_it():
    chunks, questions = corpus()

    class Blind:  # a retriever that never finds the gold chunk
        def retrieve_many(self, queries, k):
            return [[(c.chunk_id, 1.0) for c in chunks if not c.chunk_id.endswith("-1")][:k] for _ in queries]

    settings = ContextSettings(kind="retrieved", gold_only_share=0, abstain_share=0, order="shuffled")
    records, counts = build_contexts(questions, chunks, settings, retriever=Blind(), top_k=3, seed=1)
    assert counts["gold_inserted"] == 4
    assert all(q.context in passages_of(r) for q, r in zip(questions, records, strict=True))


def test_budget_drops_distractors_first_never_the_gold_passage():
    chunks, questions = corpus()
    settings = ContextSettings(kind="retrieved", gold_only_share=0, abstain_share=0)
    fits_two = lambda prompt: prompt.count("\n") <= 6  # the template has 5 newlines, each join one more  # noqa: E731
    records, _ = build_contexts(questions, chunks, settings, retriever=index_of(chunks), top_k=3, seed=2, fits=fits_two)
    for q, record in zip(questions, records, strict=True):
        assert len(passages_of(record)) == 2 and q.context in passages_of(record)


def test_window_and_gold_kinds_keep_the_answer():
    chunks, questions = corpus()
    window = ContextSettings(kind="window", window_chars=20)
    records, counts = build_contexts(questions, chunks, window, top_k=1, seed=0)
    assert counts["window"] == 4
    for q, record in zip(questions, records, strict=True):
        (context,) = passages_of(record)
        assert len(context) == 20 and q.answers[0] in context and context in q.context
    gold, _ = build_contexts(questions, chunks, ContextSettings(kind="gold"), top_k=1, seed=0)
    assert [passages_of(r) for r in gold] == [[q.context] for q in questions]


def test_longest_target_and_settings_checks():
    chunks, questions = corpus()
    q = questions[0].model_copy(update={"answers": ["1000", "1000公里"]})
    (record,), _ = build_contexts([q], chunks, ContextSettings(kind="gold", target="longest"), top_k=1, seed=0)
    assert record.output == "1000公里"
    with pytest.raises(ValueError):
        ContextSettings(gold_only_share=0.7, abstain_share=0.5)
    with pytest.raises(ValueError, match="retriever"):
        build_contexts(questions, chunks, ContextSettings(kind="retrieved"), top_k=1, seed=0)
