"""Intent routing: a question is either `maths` (answered by the generator directly, chain of thought)
or `reading` (answered from retrieved passages).

The default router is character n-grams + logistic regression fitted on the training questions.
GSM8K is English and CMRC Chinese, so a classifier fitted on those alone learns the language, not
the intent; seeded template-generated Chinese maths word problems, bare calculations in both
languages and English passage questions are added to the training set to break that shortcut, and
hand-written held-out sets (Chinese maths, English reading, short calculations; phrased unlike the
templates) measure whether it worked.

`router=llm` asks an OpenAI-compatible model with a strict label prompt. A label the router does not
recognise raises `UnknownLabel`: it never silently becomes `maths`.
"""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field

from ragtune.config import Config
from ragtune.io import DataError, atomic_dir, read_json
from ragtune.records import CMRC_EVAL, CMRC_TRAIN, GSM8K_EVAL, GSM8K_TRAIN, MathsQuestion, ReadingQuestion, read_records

MATHS, READING = "maths", "reading"
LABELS = (MATHS, READING)

# The strict label prompt of `router=llm`: one word back, nothing else.
LLM_ROUTER_SYSTEM = (
    "You are a router. Classify the user's question by intent. Reply with exactly one word:\n"
    "maths - a maths word problem or calculation to solve, in any language;\n"
    "reading - a question to answer from an encyclopaedia passage or article, in any language.\n"
    "Reply with the single word maths or reading and nothing else."
)


class ClassifierRouterConfig(Config):
    """`router=classifier`: character n-grams + logistic regression, fitted by the router stage."""

    kind: Literal["classifier"] = Field(description="classifier: fitted on the train questions")
    synthetic_per_label: int = Field(ge=0, description="template-made questions per label that break the language shortcut")
    ngram_max: int = Field(ge=1, le=8, description="character 1..ngram_max-grams")
    C: float = Field(gt=0, description="inverse regularisation strength of the logistic regression")


class LLMRouterConfig(Config):
    """`router=llm`: an OpenAI-compatible model asked for one label."""

    kind: Literal["llm"] = Field(description="llm: asked with a strict one-word prompt")
    base_url: str = Field(description="the OpenAI-compatible endpoint")
    model: str = Field(description="the model name the endpoint serves")
    api_key_env: str | None = Field(description="environment variable holding the API key (null: none needed)")
    timeout: float = Field(gt=0, description="seconds per call")


RouterConfig = Annotated[ClassifierRouterConfig | LLMRouterConfig, Field(discriminator="kind")]


class UnknownLabel(ValueError):
    """The router produced something that is not one of LABELS."""


def parse_label(text: str) -> str:
    """A router reply -> a label; anything but exactly one known label (case and trailing '.' aside)
    raises UnknownLabel."""
    word = (text or "").strip().strip(".").strip().lower()
    if word in LABELS:
        return word
    raise UnknownLabel(f"router replied {text!r}, expected one of {', '.join(LABELS)}")


def normalize_question(text: str) -> str:
    """NFKC, lower case, every digit -> 0: the router sees that a number is there, not which."""
    return re.sub(r"\d", "0", unicodedata.normalize("NFKC", text).lower())


_NUMBER = re.compile(r"\d+(?:[.,]\d+)?|[一二三四五六七八九十百千万两半]+(?:分之[一二三四五六七八九十]+)?(?=[个只本支元米千克斤岁天小时分秒倍名棵台把张颗辆份行人%％])")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def question_shape(questions: Sequence[str]):
    """Language-neutral intent cues: how many quantities a question states (word problems state
    several, passage questions rarely more than a year), as a few capped indicator columns."""
    import numpy as np

    counts = np.array([len(_NUMBER.findall(unicodedata.normalize("NFKC", q))) for q in questions])
    return np.stack([counts >= 1, counts >= 2, counts >= 3, counts >= 4], axis=1).astype(float)


# --------------------------------------------------------------------------- training questions

# Template material for the shortcut-breaking examples, composed from parts (statements with numbers
# + a question; lead-in + wh-question + topic) so that the classifier sees structure, not a few fixed
# strings. The hand-written held-out set below uses other wording, so scoring well there is not recall.
_ZH_NAMES = ["小明", "小红", "小华", "王阿姨", "李老师", "张叔叔", "小刚", "妈妈", "爷爷", "小丽", "陈师傅", "刘同学",
             "甲", "乙", "工人", "农民伯伯", "商店", "学校", "工厂", "车队"]
_ZH_ITEMS = [("苹果", "个"), ("铅笔", "支"), ("故事书", "本"), ("糖果", "颗"), ("气球", "个"), ("邮票", "张"),
             ("鸡蛋", "个"), ("练习本", "本"), ("橘子", "个"), ("彩纸", "张"), ("玻璃球", "颗"), ("面包", "个"),
             ("树苗", "棵"), ("零件", "个"), ("大米", "千克"), ("油漆", "升"), ("布料", "米"), ("砖", "块"),
             ("羊", "只"), ("学生", "名"), ("电脑", "台"), ("椅子", "把")]
_ZH_STATEMENTS = [
    "{n}有{a}{u}{item}", "{n}买了{b}{u}{item}", "{n}送出{b}{u}{item}", "{n}每天用掉{c}{u}{item}",
    "每{u}{item}{p}元", "{n}一共花了{a}元", "{n}比{n2}多{b}{u}{item}", "{n}的{item}是{n2}的{d}倍",
    "{n}把{a}{u}{item}平均分成{c}份", "一共运来{a}{u}{item}", "第一天卖出{b}{u}", "第二天卖出的是第一天的{d}倍",
    "剩下的{item}占总数的{c}分之一", "每小时行{a}千米", "行了{c}小时", "长{a}米", "宽{c}米", "高{d}米",
    "打{d}折后", "利率是百分之{c}", "{n}每分钟做{c}个", "连续工作了{d}天", "速度提高了{c}%", "原价{a}元",
    "{n}今年{c}岁", "{d}年后", "一个数的{d}倍减去{b}", "和是{a}", "差是{b}", "平均每人{c}{u}",
]
_ZH_QUESTIONS = [
    "一共有多少{u}{item}？", "还剩多少{u}？", "每份是多少{u}？", "需要多少元？", "{n2}有多少{u}？", "平均每天多少{u}？",
    "面积是多少平方米？", "体积是多少立方米？", "一共行了多少千米？", "现价是多少元？", "这个数是多少？",
    "至少需要几天？", "利息是多少元？", "{n}今年几岁？", "求这两个数。", "第二天卖出多少{u}？", "需要几小时？",
    "比原来多了百分之几？", "列式计算结果是多少？", "周长是多少米？",
]
_EN_LEADS = ["", "", "", "According to the passage, ", "Based on the text, ", "In the article, ", "From the context, ",
             "As the paragraph says, ", "Per the document, "]
_EN_QUESTIONS = [
    "who founded {t}?", "when was {t} first built?", "what is {t} known for?", "where is {t} located?",
    "why did {t} become famous?", "which country is {t} associated with?", "what was the original name of {t}?",
    "in which year did {t} open?", "who directed {t}?", "what role did {t} play in the {y} events?",
    "what happened to {t} after {y}?", "how does the author describe {t}?", "what nickname was given to {t}?",
    "who led {t} during its early years?", "what was {t} called before {y}?", "what is {t} made of?",
    "which language is spoken on {t}?", "who wrote about {t}?", "what caused the decline of {t}?",
    "which award did {t} receive?", "who was the first leader of {t}?", "what does the name of {t} mean?",
    "how did {t} get its name?", "whom did {t} marry?", "what genre does {t} belong to?",
]
_EN_TOPICS = ["the author", "the company", "the emperor", "the river", "the festival", "the album", "the novel",
              "the university", "the temple", "the war", "the species", "the team", "the museum", "the city",
              "the scientist", "the film", "the dynasty", "the island", "the bridge", "the game", "the poet",
              "the monastery", "the railway", "the queen", "the treaty", "the opera", "the mountain range",
              "the newspaper", "the church", "the general", "the protagonist", "the kingdom", "the castle"]


# Bare calculations, in both languages: GSM8K and the word problems above are long, so without these
# a short "What is 15 plus 27?" looks more like a passage question than like maths.
_ARITH_OPS = [("+", ["plus", "added to"], ["加", "加上"]), ("-", ["minus", "take away"], ["减", "减去"]),
              ("*", ["times", "multiplied by"], ["乘", "乘以"]), ("/", ["divided by", "over"], ["除以"])]
_EN_ARITH = ["What is {a} {w} {b}?", "what's {a} {w} {b}", "How much is {a} {w} {b}?", "Calculate {a} {s} {b}.",
             "{a} {s} {b} = ?", "{a}{s}{b}?", "{a} {s} {b} {s2} {c}", "Compute {a} {s} {b} {s2} {c}.",
             "What is {d}% of {b}?", "What is the square root of {sq}?", "Solve for x: {d}x + {a} = {b}",
             "Evaluate ({a} {s} {b}) {s2} {c}.", "What do you get if you add {a} and {b}?",
             "What is {a} squared?", "Find the sum of {a}, {b} and {c}."]
_ZH_ARITH = ["{a}{zw}{b}等于多少？", "{a}{zw}{b}是多少", "{a}{s}{b}=？", "{a}{s}{b}等于几？", "计算：{a}{s}{b}{s2}{c}",
             "{a}{s}{b}{s2}{c}=", "{b}的百分之{d}是多少？", "{sq}的平方根是多少？", "解方程：{d}x+{a}={b}",
             "求{a}、{b}和{c}的和。", "{a}的平方是多少？", "({a}{s}{b}){s2}{c}等于多少？", "算一算{a}{s}{b}"]


def arithmetic_questions(n: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        (s, words, zh_words), (s2, _, _) = rng.choice(_ARITH_OPS), rng.choice(_ARITH_OPS)
        fill = dict(s=s, s2=s2, w=rng.choice(words), zw=rng.choice(zh_words), a=rng.randint(1, 999),
                    b=rng.randint(1, 999), c=rng.randint(1, 99), d=rng.randint(2, 95), sq=rng.randint(2, 40) ** 2)
        template = rng.choice(_EN_ARITH if i % 2 else _ZH_ARITH)
        out.append((template.format(**fill), MATHS))
    return out


def synthetic_questions(n_per_label: int, seed: int) -> list[tuple[str, str]]:
    """Seeded (question, label) pairs: Chinese maths word problems, bare calculations in both
    languages, and English passage questions."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = arithmetic_questions(n_per_label // 2, random.Random(seed + 1))
    for _ in range(n_per_label):
        item, unit = rng.choice(_ZH_ITEMS)
        n, n2 = rng.sample(_ZH_NAMES, 2)
        a, b = sorted(rng.sample(range(12, 2000), 2), reverse=True)
        fill = dict(n=n, n2=n2, item=item, u=unit, a=a, b=b, c=rng.randint(2, 60), d=rng.randint(2, 9),
                    p=rng.choice([rng.randint(2, 99), round(rng.uniform(0.5, 20), 1)]))
        statements = rng.sample(_ZH_STATEMENTS, rng.randint(1, 3))
        text = "，".join(s.format(**fill) for s in statements) + "，" + rng.choice(_ZH_QUESTIONS).format(**fill)
        out.append((text, MATHS))
    for _ in range(n_per_label):
        question = rng.choice(_EN_QUESTIONS).format(t=rng.choice(_EN_TOPICS), y=rng.randint(1500, 2020))
        lead = rng.choice(_EN_LEADS)
        out.append((lead + (question if lead else question[0].upper() + question[1:]), READING))
    return out


def training_set(prepared_dir: str | os.PathLike, synthetic_per_label: int, seed: int) -> list[tuple[str, str]]:
    """Train questions labelled by where they come from, plus the shortcut-breaking examples. Your own
    data may have no maths or no reading questions: the templates then give that label its examples
    (Chinese word problems and calculations in both languages; English passage questions); with
    synthetic_per_label 0 as well, a label without any example is an error."""
    prepared = Path(prepared_dir)
    pairs = [(q.question, MATHS) for q in read_records(prepared / GSM8K_TRAIN.name, MathsQuestion)]
    pairs += [(q.question, READING) for q in read_records(prepared / CMRC_TRAIN.name, ReadingQuestion)]
    pairs += synthetic_questions(synthetic_per_label, seed)
    missing = [label for label in LABELS if not any(lab == label for _, lab in pairs)]
    if missing:
        files = {MATHS: GSM8K_TRAIN.name, READING: CMRC_TRAIN.name}
        raise DataError(f"no {' and no '.join(missing)} training questions ({', '.join(files[m] for m in missing)} "
                        "empty and router.synthetic_per_label is 0): the classifier needs both labels")
    return pairs


# --------------------------------------------------------------------------- routers


class Router(Protocol):
    def route_many(self, questions: Sequence[str]) -> list[str]: ...


# How a fitted ClassifierRouter is stored: data only, never a pickle. router.json is the folder's
# manifest; classifier.json holds the vectoriser's settings, vocabulary (n-grams in column order) and
# idf weights and the logistic regression's classes, coefficients and intercept. The question_shape
# columns are code, named in the file but never read from it. Loading rebuilds the scikit-learn
# objects from these numbers, so an edited file can make the router wrong but cannot run code.
CLASSIFIER_FILE = "classifier.json"
CLASSIFIER_FORMAT = "ragtune.router.classifier/1"
# Pickles a router folder once held (or that someone could drop into one): refused, never opened.
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
SHAPE_FEATURES = {"function": "question_shape", "columns": 4}
# Vectoriser settings fixed by ClassifierRouter.fit; a file must state exactly these.
_VECTORIZER_SETTINGS = {"analyzer": "char_wb", "preprocessor": "normalize_question", "sublinear_tf": True,
                        "norm": "l2", "use_idf": True, "smooth_idf": True}
_NGRAM_MAX_LIMIT = 8  # ClassifierRouterConfig.ngram_max's bound


def _classifier_pipeline(ngram_max: int, *, c: float = 1.0, seed: int | None = None,
                         vocabulary: list[str] | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.preprocessing import FunctionTransformer

    return make_pipeline(
        make_union(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, ngram_max), preprocessor=normalize_question,
                            sublinear_tf=True, min_df=2, norm="l2", use_idf=True, smooth_idf=True,
                            vocabulary=vocabulary),
            FunctionTransformer(question_shape),
        ),
        LogisticRegression(C=c, max_iter=3000, random_state=seed),
    )


def _is_number(x: Any) -> bool:
    return type(x) is float or type(x) is int  # not bool, not a numeric string


def _finite_vector(value: Any, length: int, what: str, path: Path):
    """A JSON list of `length` finite numbers -> float64 array; anything else raises DataError."""
    import numpy as np

    if not isinstance(value, list):
        raise DataError(f"{path}: {what} must be a list of numbers, got {type(value).__name__}")
    if len(value) != length:
        raise DataError(f"{path}: {what} has {len(value)} values, expected {length}")
    if not all(_is_number(x) for x in value):
        bad = next(x for x in value if not _is_number(x))
        raise DataError(f"{path}: {what} holds {bad!r}, expected numbers only")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: {what} holds a value that is not finite")
    return array


def _exact_keys(obj: Any, keys: set[str], what: str, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - keys)
        raise DataError(f"{path}: {what} has unexpected fields (missing {missing}, unexpected {extra})")
    return obj


def _read_strict_json(path: Path) -> Any:
    """JSON as the spec defines it: NaN, Infinity and -Infinity are refused, not read as floats."""

    def refuse(name: str) -> None:
        raise DataError(f"{path}: {name} is not a number JSON allows")

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None


def refuse_pickles(folder: Path) -> None:
    """A router folder holding a pickle (classifier.joblib from before routers were saved as JSON,
    or one dropped in by hand) is refused before anything in it is read: unpickling runs whatever
    code the file names, so whoever can edit the folder could run code on this machine."""
    found = sorted(f for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
    if found:
        raise DataError(
            f"{found[0]}: refusing to load a pickled router: unpickling a file runs any code it contains, so "
            f"whoever can edit this folder could run code here. Routers are saved as {CLASSIFIER_FILE} now; "
            "delete the pickle and re-save the router (dvc repro router, then rebuild the bundle)"
        )


def classifier_from_json(path: str | os.PathLike) -> Any:
    """classifier.json -> the fitted scikit-learn pipeline, validated field by field; never unpickles.
    Anything unexpected (types, shapes, labels, settings, NaN) raises DataError naming `path`."""
    import numpy as np

    path = Path(path)
    data = _exact_keys(_read_strict_json(path), {"format", "vectorizer", "shape_features", "logistic_regression"},
                       "the file", path)
    if data["format"] != CLASSIFIER_FORMAT:
        raise DataError(f"{path}: format {data['format']!r}, expected {CLASSIFIER_FORMAT!r}")

    vec = _exact_keys(data["vectorizer"], {*_VECTORIZER_SETTINGS, "ngram_range", "vocabulary", "idf"},
                      "vectorizer", path)
    for key, expected in _VECTORIZER_SETTINGS.items():
        if vec[key] != expected or type(vec[key]) is not type(expected):
            raise DataError(f"{path}: vectorizer {key} is {vec[key]!r}, expected {expected!r}")
    ngram_range = vec["ngram_range"]
    if not (isinstance(ngram_range, list) and len(ngram_range) == 2 and all(type(n) is int for n in ngram_range)
            and ngram_range[0] == 1 and 1 <= ngram_range[1] <= _NGRAM_MAX_LIMIT):
        raise DataError(f"{path}: vectorizer ngram_range {ngram_range!r}, expected [1, n] with 1 <= n <= "
                        f"{_NGRAM_MAX_LIMIT}")
    ngram_max = ngram_range[1]
    vocabulary = vec["vocabulary"]
    if not isinstance(vocabulary, list) or not vocabulary:
        raise DataError(f"{path}: vectorizer vocabulary must be a non-empty list of n-grams")
    for i, term in enumerate(vocabulary):
        if not isinstance(term, str) or not 1 <= len(term) <= ngram_max:
            raise DataError(f"{path}: vectorizer vocabulary[{i}] is {term!r}, expected a string of 1 to "
                            f"{ngram_max} characters")
    if len(set(vocabulary)) != len(vocabulary):
        seen: set[str] = set()
        dup = next(t for t in vocabulary if t in seen or seen.add(t))
        raise DataError(f"{path}: vectorizer vocabulary lists {dup!r} twice")
    idf = _finite_vector(vec["idf"], len(vocabulary), "vectorizer idf", path)
    if (idf < 1.0).any():  # smooth idf = ln((1 + n) / (1 + df)) + 1 >= 1
        raise DataError(f"{path}: vectorizer idf holds a weight below 1, impossible for smoothed idf")

    if data["shape_features"] != SHAPE_FEATURES:
        raise DataError(f"{path}: shape_features {data['shape_features']!r}, expected {SHAPE_FEATURES!r}")

    lr = _exact_keys(data["logistic_regression"], {"classes", "coef", "intercept"}, "logistic_regression", path)
    if lr["classes"] != list(LABELS):
        raise DataError(f"{path}: logistic_regression classes {lr['classes']!r}, expected exactly {list(LABELS)!r}")
    n_features = len(vocabulary) + SHAPE_FEATURES["columns"]
    coef = lr["coef"]
    if not isinstance(coef, list) or len(coef) != 1:
        raise DataError(f"{path}: logistic_regression coef must be a list of 1 row (two classes), got "
                        f"{len(coef) if isinstance(coef, list) else type(coef).__name__}")
    coef = _finite_vector(coef[0], n_features, "logistic_regression coef[0]", path)
    intercept = _finite_vector(lr["intercept"], 1, "logistic_regression intercept", path)

    pipeline = _classifier_pipeline(ngram_max, vocabulary=vocabulary)
    vectorizer = pipeline[0].transformer_list[0][1]
    vectorizer.idf_ = idf  # also builds vocabulary_ from the list, in column order
    model = pipeline[-1]
    model.classes_ = np.array(LABELS)
    model.coef_ = coef.reshape(1, -1)
    model.intercept_ = intercept
    model.n_features_in_ = n_features
    model.n_iter_ = np.zeros(1, dtype=np.int32)
    return pipeline


def classifier_to_json(pipeline: Any) -> dict[str, Any]:
    """The fitted pipeline ClassifierRouter.fit makes -> the classifier.json object."""
    from sklearn.preprocessing import FunctionTransformer

    (_, vectorizer), (_, shape) = pipeline[0].transformer_list
    model = pipeline[-1]
    params = vectorizer.get_params()
    settings = {k: params[k] for k in _VECTORIZER_SETTINGS}
    settings["preprocessor"] = getattr(params["preprocessor"], "__name__", repr(params["preprocessor"]))
    if (settings != _VECTORIZER_SETTINGS or params["ngram_range"][0] != 1
            or not (isinstance(shape, FunctionTransformer) and shape.func is question_shape)):
        raise ValueError("the pipeline is not the one ClassifierRouter.fit builds; cannot save it as JSON")
    if [str(c) for c in model.classes_] != list(LABELS):
        raise ValueError(f"the classifier's classes are {list(model.classes_)}, expected {list(LABELS)}")
    vocabulary = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
    return {
        "format": CLASSIFIER_FORMAT,
        "vectorizer": {**_VECTORIZER_SETTINGS, "ngram_range": list(params["ngram_range"]),
                       "vocabulary": vocabulary, "idf": vectorizer.idf_.tolist()},
        "shape_features": dict(SHAPE_FEATURES),
        "logistic_regression": {"classes": list(LABELS), "coef": model.coef_.tolist(),
                                "intercept": model.intercept_.tolist()},
    }


class ClassifierRouter:
    """TF-IDF over character 1-4-grams (within word boundaries) + logistic regression."""

    kind = "classifier"

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    @classmethod
    def fit(cls, pairs: Sequence[tuple[str, str]], *, seed: int, ngram_max: int, c: float):
        import numpy as np

        bad = sorted({label for _, label in pairs} - set(LABELS))
        if bad:
            raise ValueError(f"unknown training labels {bad}")
        pipeline = _classifier_pipeline(ngram_max, c=c, seed=seed)
        questions = [q for q, _ in pairs]
        labels = [label for _, label in pairs]
        # Every (language, label) cell weighs the same in total, so 7,000 English maths questions
        # cannot teach "English means maths".
        groups = [(language(q), label) for q, label in pairs]
        counts = {g: groups.count(g) for g in set(groups)}
        weights = np.array([len(groups) / (len(counts) * counts[g]) for g in groups])
        pipeline.fit(questions, labels, logisticregression__sample_weight=weights)
        return cls(pipeline)

    def route_many(self, questions: Sequence[str]) -> list[str]:
        if not questions:
            return []
        return [parse_label(str(label)) for label in self.pipeline.predict(list(questions))]

    def route(self, question: str) -> str:
        return self.route_many([question])[0]

    def probabilities(self, questions: Sequence[str]):
        """P(label | question) as an (n, 2) array, columns in LABELS order."""
        return self.pipeline.predict_proba(list(questions))

    def save(self, folder: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
        """router.json (manifest) + classifier.json (the fitted numbers); no pickle."""
        import sklearn

        payload = classifier_to_json(self.pipeline)
        with atomic_dir(folder) as tmp:
            (tmp / CLASSIFIER_FILE).write_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n",
                                               encoding="utf-8")
            meta = {**(info or {}), "kind": self.kind, "format": CLASSIFIER_FORMAT, "labels": list(LABELS),
                    "classifier": CLASSIFIER_FILE, "sklearn": sklearn.__version__}
            (tmp / "router.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


class LLMRouter:
    """An OpenAI-compatible chat model asked for one label, temperature 0."""

    kind = "llm"

    def __init__(self, base_url: str, model: str, api_key_env: str | None, timeout: float):
        from openai import OpenAI

        api_key = "EMPTY"
        if api_key_env and os.environ.get(api_key_env):
            api_key = os.environ[api_key_env]
        self.base_url, self.model, self.api_key_env, self.timeout = base_url, model, api_key_env, timeout
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=1)

    def route(self, question: str) -> str:
        resp = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": LLM_ROUTER_SYSTEM}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0.0,
        )
        return parse_label(resp.choices[0].message.content or "")

    def route_many(self, questions: Sequence[str]) -> list[str]:
        return [self.route(q) for q in questions]

    def save(self, folder: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
        with atomic_dir(folder) as tmp:
            meta = {"kind": self.kind, "labels": list(LABELS), "base_url": self.base_url, "model": self.model,
                    "api_key_env": self.api_key_env, "timeout": self.timeout, **(info or {})}
            (tmp / "router.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_router(folder: str | os.PathLike) -> ClassifierRouter | LLMRouter:
    """The router saved in `folder`. A folder holding a pickle (such as a leftover classifier.joblib)
    is refused with DataError, never unpickled; a classifier is rebuilt from JSON and validated."""
    folder = Path(folder)
    refuse_pickles(folder)
    manifest_path = folder / "router.json"
    meta = read_json(manifest_path)
    if not isinstance(meta, dict):
        raise DataError(f"{manifest_path}: expected a JSON object, got {type(meta).__name__}")
    kind = meta.get("kind")
    if kind == "classifier":
        if meta.get("format") != CLASSIFIER_FORMAT or meta.get("classifier") != CLASSIFIER_FILE:
            raise DataError(f"{manifest_path}: format {meta.get('format')!r} / classifier {meta.get('classifier')!r}, "
                            f"expected {CLASSIFIER_FORMAT!r} / {CLASSIFIER_FILE!r} (re-save the router)")
        if meta.get("labels") != list(LABELS):
            raise DataError(f"{manifest_path}: labels {meta.get('labels')!r}, expected exactly {list(LABELS)!r}")
        return ClassifierRouter(classifier_from_json(folder / CLASSIFIER_FILE))
    if kind == "llm":
        return LLMRouter(meta["base_url"], meta["model"], meta.get("api_key_env"), float(meta.get("timeout", 60)))
    raise DataError(f"{manifest_path}: unknown router kind {kind!r} (expected classifier or llm)")


def build_router(cfg: ClassifierRouterConfig | LLMRouterConfig, prepared_dir: str | os.PathLike,
                 seed: int) -> tuple[Any, dict[str, Any]]:
    """The router `cfg` (params `router`) describes, and facts about how it was made."""
    if isinstance(cfg, LLMRouterConfig):
        return LLMRouter(cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout), {}
    pairs = training_set(prepared_dir, cfg.synthetic_per_label, seed)
    router = ClassifierRouter.fit(pairs, seed=seed, ngram_max=cfg.ngram_max, c=cfg.C)
    counts = {label: sum(1 for _, lab in pairs if lab == label) for label in LABELS}
    return router, {"train_questions": counts, "synthetic_per_label": cfg.synthetic_per_label}


# --------------------------------------------------------------------------- held-out evaluation

# Hand-written, never generated: Chinese maths problems and English passage questions, the two
# cases a language-shortcut router gets wrong.
HANDWRITTEN_ZH_MATHS = [
    "学校组织春游，共有245名学生，每辆大巴能坐45人，至少需要几辆大巴？",
    "果园里桃树有120棵，梨树的棵数是桃树的三分之二，梨树有多少棵？",
    "一件衣服先涨价10%，再降价10%，现在的价格和原价相比怎么样？",
    "甲乙两地相距360千米，一列火车从甲地开往乙地用了4小时，这列火车的平均速度是多少？",
    "水池有一根进水管，每分钟注水15升，注满600升的水池需要多长时间？",
    "某工厂上午生产零件368个，下午比上午多生产57个，这一天共生产零件多少个？",
    "一个正方形的周长是48分米，它的边长和面积各是多少？",
    "鸡兔同笼，共有头35个，脚94只，鸡和兔各有几只？",
    "农场今年收获小麦8400千克，比去年增产了20%，去年收获多少千克？",
    "服装店把一批T恤按每件80元卖出，每件赚了25元，进价是多少元一件？",
    "三个连续自然数的和是72，这三个数分别是多少？",
    "一根绳子长18米，剪去它的六分之一后，还剩几米？",
    "图书馆借出科技书156本，借出的故事书是科技书的2倍少12本，故事书借出了多少本？",
    "小芳的储蓄罐里有1元硬币和5角硬币共30枚，总值21元，两种硬币各几枚？",
    "圆的半径是5厘米，它的周长是多少厘米？（π取3.14）",
    "一项工程，甲队单独做要12天完成，乙队单独做要18天完成，两队合作几天完成？",
    "超市里一箱牛奶有24盒，食堂买了15箱，一共买了多少盒牛奶？",
    "某数的3倍加上7等于43，这个数是多少？",
    "张华骑自行车上学，每分钟骑250米，12分钟到校，他家离学校多远？",
    "一块梯形菜地，上底8米，下底12米，高5米，面积是多少平方米？",
    "同学们排队做操，每行站9人，正好站了14行，参加做操的有多少人？",
    "妈妈买3千克香蕉和2千克葡萄共付了41元，香蕉每千克7元，葡萄每千克多少元？",
    "一个数除以8商是15余数是3，这个数是多少？",
    "班级买来乒乓球拍6副，每副38元，付出250元，应找回多少元？",
    "养殖场有鸭子480只，卖掉了其中的四分之三，还剩多少只鸭子？",
    "小林的身高是1.45米，比哥哥矮0.28米，哥哥身高多少米？",
    "把一个棱长为6厘米的正方体切成棱长为2厘米的小正方体，能切成多少个？",
    "一列队伍长450米，以每秒3米的速度通过一座长150米的桥，需要多少秒？",
    "求1到100之间所有偶数的和。",
    "爸爸今年的年龄是儿子的4倍，再过20年是儿子的2倍，儿子今年几岁？",
]
HANDWRITTEN_EN_READING = [
    "Which instrument did the composer play as a child, according to the biography?",
    "What reason does the article give for moving the capital?",
    "Who succeeded the king after his death in the passage?",
    "Where did the expedition set up its base camp?",
    "What is the main theme of the poem discussed in the text?",
    "Which two rivers meet near the town described above?",
    "What did critics praise most about the album, according to the review?",
    "How long did the construction of the cathedral take, as the passage says?",
    "Which language was the manuscript originally written in?",
    "What was the name of the ship that carried the settlers?",
    "Who designed the building mentioned in the second paragraph?",
    "What event caused the trading company to collapse?",
    "In the story, why does the narrator return to her village?",
    "Which award did the film win at the festival described?",
    "What are the three main ingredients of the dish described in the article?",
    "According to the report, which region suffered the most damage from the storm?",
    "Whom did the scientist collaborate with on the discovery?",
    "What title did the ruler adopt after unifying the kingdoms?",
    "What does the author compare the city's skyline to?",
    "Which museum currently holds the painting?",
    "What was the population of the town at the time of the census mentioned?",
    "Which character betrays the hero in the novel's plot summary?",
    "What does the acronym stand for, according to the passage?",
    "Why was the railway line eventually closed?",
    "Which season is the festival traditionally held in?",
    "What nickname did the fans give the football club?",
    "Who is described as the founder of the school of philosophy?",
    "What kind of habitat does the frog described in the entry prefer?",
    "When did the band release their debut single, according to the text?",
    "What material were the ancient coins in the collection made from?",
]


HANDWRITTEN_ARITHMETIC = [
    "What is 15 plus 27?", "What is 12 times 7?", "2+2?", "How many is 100 minus 37?", "Add 48 and 56.",
    "Is 91 a prime number?", "What is half of 350?", "Multiply 23 by 19.", "Divide 144 by 12, please.",
    "What's 3/4 plus 1/8?", "What is 7 cubed?", "Round 3.14159 to two decimal places.",
    "25乘4是多少？", "100减去37等于几？", "7的3次方是多少？", "一百除以四等于多少？", "3/4加1/8等于多少？",
    "48和56的和是多少？", "请算出125×8。", "36的平方根是几？", "15%的200是多少？", "1+1=？",
]


def heldout_sets(prepared_dir: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """Named held-out sets of (question, label): GSM8K test, CMRC trial, and the hand-written ones."""
    prepared = Path(prepared_dir)
    return {
        "gsm8k_eval": [(q.question, MATHS) for q in read_records(prepared / GSM8K_EVAL.name, MathsQuestion)],
        "cmrc_eval": [(q.question, READING) for q in read_records(prepared / CMRC_EVAL.name, ReadingQuestion)],
        "handwritten_zh_maths": [(q, MATHS) for q in HANDWRITTEN_ZH_MATHS],
        "handwritten_en_reading": [(q, READING) for q in HANDWRITTEN_EN_READING],
        "handwritten_arithmetic": [(q, MATHS) for q in HANDWRITTEN_ARITHMETIC],
    }


def router_accuracy(router: Router, pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Accuracy of `router` on (question, gold label) pairs; a reply outside LABELS counts as wrong."""
    pairs = list(pairs)
    questions = [q for q, _ in pairs]
    try:
        predicted = router.route_many(questions)
    except UnknownLabel:  # route one by one so a single bad reply costs only its own item
        predicted = []
        for q in questions:
            try:
                predicted.append(router.route_many([q])[0])
            except UnknownLabel:
                predicted.append("unknown")
    wrong = [{"question": q, "gold": g, "predicted": p} for (q, g), p in zip(pairs, predicted, strict=True) if p != g]
    n = len(pairs)
    return {"n": n, "accuracy": (n - len(wrong)) / n if n else None, "errors": wrong}


MAIN_SETS = ("gsm8k_eval", "cmrc_eval")
CROSS_LANGUAGE_SETS = ("handwritten_zh_maths", "handwritten_en_reading")


def evaluate_router(router: Router, prepared_dir: str | os.PathLike) -> dict[str, Any]:
    """Accuracy per held-out set and pooled over the main sets (GSM8K test + CMRC trial) and the
    cross-language ones; an empty set (your own data without maths, say) is left out and named."""
    sets = heldout_sets(prepared_dir)
    per_set = {name: router_accuracy(router, pairs) for name, pairs in sets.items() if pairs}

    def pooled(names: Sequence[str]) -> tuple[float | None, int]:
        scored = [per_set[n] for n in names if n in per_set]
        n = sum(s["n"] for s in scored)
        return (sum(round(s["accuracy"] * s["n"]) for s in scored) / n if n else None), n

    accuracy, n = pooled(MAIN_SETS)
    cross, cross_n = pooled(CROSS_LANGUAGE_SETS)
    return {
        "accuracy": accuracy,
        "n": n,
        "cross_language_accuracy": cross,
        "cross_language_n": cross_n,
        "empty_sets": [name for name, pairs in sets.items() if not pairs],
        "sets": {name: {"n": r["n"], "accuracy": r["accuracy"]} for name, r in per_set.items()},
        "errors": [dict(e, set=name) for name, r in per_set.items() for e in r["errors"]][:50],
    }
