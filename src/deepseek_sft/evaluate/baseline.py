"""The classical reference for label tasks: TF-IDF over character n-grams + logistic regression.

Character n-grams need no Chinese word segmenter, which is why they are the usual strong baseline here.
"""

from __future__ import annotations

import time
from collections import Counter

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from threadpoolctl import threadpool_limits

from ..config.data import TaskSpec
from ..config.evaluate import BaselineParams
from .metrics import classification_metrics

NAME = "tfidf_lr"
MAJORITY = "majority"  # always answers the train split's most frequent label: the floor any model must clear


def make_baseline(params: BaselineParams, seed: int) -> Pipeline:
    """An unfitted TF-IDF (char n-grams, sublinear tf) + LogisticRegression pipeline."""
    vectorizer = TfidfVectorizer(
        analyzer="char",
        ngram_range=(params.ngram_min, params.ngram_max),
        max_features=params.max_features,
        sublinear_tf=True,
    )
    classifier = LogisticRegression(C=params.C, max_iter=params.max_iter, random_state=seed)
    return make_pipeline(vectorizer, classifier)


def evaluate_baseline(
    train: list[dict], test: list[dict], tasks: dict[str, TaskSpec], params: BaselineParams, seed: int
) -> tuple[dict[str, dict], dict[str, dict], dict[str, list[str]]]:
    """Fit on train and score on test for every classification task: (metrics, details, predictions)."""
    metrics, details, predictions = {}, {}, {}
    for name, task in tasks.items():
        if task.type != "classification":
            continue
        y_train = [str(r[task.field]) for r in train]
        if len(set(y_train)) < 2:
            continue  # LogisticRegression needs two classes; a one-class task has no meaningful baseline
        started = time.perf_counter()
        # lbfgs on sparse TF-IDF gains nothing from BLAS threads, and they oversubscribe cores torch is using
        with threadpool_limits(limits=1):
            model = make_baseline(params, seed).fit([r["text"] for r in train], y_train)
        pred = [str(p) for p in model.predict([r["text"] for r in test])]
        report = classification_metrics([str(r[task.field]) for r in test], pred, task.labels)
        details[name] = {k: report.pop(k) for k in ("per_class", "confusion")}
        metrics[name] = report | {"fit_predict_s": time.perf_counter() - started}
        predictions[name] = pred
    return metrics, details, predictions


def evaluate_majority(train: list[dict], test: list[dict], tasks: dict[str, TaskSpec]) -> dict[str, dict]:
    """Metrics of the majority-class answer for every classification task (accuracy = the top class's share)."""
    metrics = {}
    for name, task in tasks.items():
        if task.type != "classification" or not train:
            continue
        top = Counter(str(r[task.field]) for r in train).most_common(1)[0][0]
        report = classification_metrics([str(r[task.field]) for r in test], [top] * len(test), task.labels)
        metrics[name] = {k: v for k, v in report.items() if k not in ("per_class", "confusion")}
    return metrics
