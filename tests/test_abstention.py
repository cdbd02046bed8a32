"""The retrieval-confidence gate (ragtune.abstention): BM25 coverage on a planted knowledge base, a word
the KB has never seen, an article left out as if it had never been there, and the calibration on
answerable questions that never abstains on more than the share asked for."""

import pytest

from ragtune.abstention import RetrievalConfidence, calibrate, retrieve_excluding
from ragtune.records import ReadingQuestion
from ragtune.retrieval import BM25Index

CHUNKS = {  # chunk_id: (article_id, text)
    "lighthouse-0": ("lighthouse", "岚峰灯塔建于1887年，塔顶的铜钟重三百斤。"),
    "lighthouse-1": ("lighthouse", "灯塔的守塔人每晚点亮灯火，为渔船指引航向。"),
    "bridge-0": ("bridge", "长河大桥全长两千米，连接南北两岸的城市。"),
    "bridge-1": ("bridge", "大桥于1999年通车，每天有数万辆汽车经过。"),
    "tea-0": ("tea", "山谷里的茶园种植绿茶，春天采摘的嫩芽最为珍贵。"),
    "tea-1": ("tea", "茶农把鲜叶摊开晾干，再用铁锅炒制成茶。"),
}


@pytest.fixture(scope="module")
def gate():
    index = BM25Index(list(CHUNKS), [text for _, text in CHUNKS.values()])
    return RetrievalConfidence(index, {cid: article for cid, (article, _) in CHUNKS.items()})


def question(qid, text, article):
    chunk = next(cid for cid, (a, _) in CHUNKS.items() if a == article)
    return ReadingQuestion(id=qid, question=text, answers=["x"], article_id=article, gold_chunk_ids=[chunk],
                           context=CHUNKS[chunk][1])


def confidence(gate, text, exclude=None):
    hits = retrieve_excluding(gate.index, gate.article_of, [text], 1, exclude)[0]
    return gate.confidence(text, hits, exclude)


def test_retrieval_without_an_article_keeps_k_hits_and_none_of_its_chunks(gate):
    text = "灯塔的铜钟和守塔人"
    whole = retrieve_excluding(gate.index, gate.article_of, [text], 2)[0]
    assert {gate.article_of[cid] for cid, _ in whole} == {"lighthouse"}  # both of its chunks rank first
    without = retrieve_excluding(gate.index, gate.article_of, [text, "大桥"], 2, {"lighthouse"})
    assert [len(hits) for hits in without] == [2, 2]  # k is still honoured after the article's chunks go
    assert all(gate.article_of[cid] != "lighthouse" for hits in without for cid, _ in hits)
    assert without[1] == retrieve_excluding(gate.index, gate.article_of, ["大桥"], 2)[0]  # untouched otherwise


def test_a_question_the_kb_covers_scores_higher_than_one_it_does_not(gate):
    covered = confidence(gate, "岚峰灯塔塔顶的铜钟有多重？")
    unrelated = confidence(gate, "长河大桥的铜钟有多重？")  # 铜钟 is in another article than 大桥
    assert 0 < unrelated < covered <= 1.0 + 1e-9


def test_a_word_no_chunk_holds_counts_against_the_question(gate):
    known = confidence(gate, "茶园种植什么茶？")
    with_unseen = confidence(gate, "茶园种植什么茶？碧螺春")  # 碧螺春 is in no chunk
    assert with_unseen < known
    assert gate.unseen_bound > 0


def test_leaving_the_article_out_removes_it_from_the_bounds_too(gate):
    text = "岚峰灯塔塔顶的铜钟有多重？"
    assert confidence(gate, text, {"lighthouse"}) < confidence(gate, text)
    # as if the article had never been there: its words are unseen, not bounded by its own scores
    tokens_best = gate._token_bests(["岚峰"], {"lighthouse"})
    assert tokens_best == [0.0]


def test_no_hits_is_no_confidence(gate):
    assert gate.confidence("？", []) == 0.0


def test_dense_and_hybrid_retrievers_use_the_top_score():
    class Dense:
        kind = "dense"

    gate = RetrievalConfidence(Dense(), {"a-0": "a"})
    assert gate.confidence("anything", [("a-0", 0.42), ("a-1", 0.1)]) == pytest.approx(0.42)


def test_calibration_keeps_answerable_abstentions_within_the_share(gate):
    questions = [
        question("q1", "岚峰灯塔塔顶的铜钟有多重？", "lighthouse"),
        question("q2", "守塔人每晚做什么？", "lighthouse"),
        question("q3", "长河大桥全长多少？", "bridge"),
        question("q4", "大桥哪一年通车？", "bridge"),
        question("q5", "茶园种植什么茶？", "tea"),
        question("q6", "茶农用什么炒制茶叶？", "tea"),
    ]
    none = calibrate(gate, questions, 0.0, top_k=1)
    assert none.answerable_abstain == 0.0 and none.questions == 6
    some = calibrate(gate, questions, 0.34, top_k=1)
    assert some.answerable_abstain <= 0.34 and some.threshold >= none.threshold
    assert some.unanswerable_abstain >= some.answerable_abstain  # their articles left out, they score lower
    assert set(some.as_dict()) == {"min_confidence", "train_answerable_abstain", "train_unanswerable_abstain",
                                   "train_questions"}
    with pytest.raises(ValueError):
        calibrate(gate, [], 0.03, top_k=1)
