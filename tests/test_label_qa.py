"""Tests of stage label_qa: kappa statistics, the gate, adjudication, the split and the script."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from deepseek_sft.config import ParamsError, StageParams, load_section
from deepseek_sft.config.data import LabelQaParams
from deepseek_sft.io import DataError, read_jsonl
from deepseek_sft.label_qa import AgreementGateError, label_qa, load_interim
from deepseek_sft.label_qa_agreement import cohen_kappa, fleiss_from_sequences, fleiss_kappa
from deepseek_sft.label_qa_split import label_deviation, normalised_text, split_fingerprint, split_records

REPO = Path(__file__).resolve().parents[1]
TASKS = load_section("label_qa", REPO / "params.yaml").tasks
INTENTS = ["transfer", "card_loss", "balance_inquiry", "loan_application", "fraud_report", "fee_dispute"]
WEIGHTS = [40, 25, 15, 10, 6, 4]  # long-tailed, like the real corpus
ORGS = ["招商银行", "工商银行", "建设银行", "平安银行"]


def make_record(i: int, rng: random.Random, noise: dict[str, float], intent: str | None = None) -> dict:
    """One interim record; annotator `a` mislabels each layer with probability noise[a]."""
    org, amount = rng.choice(ORGS), str(rng.randint(100, 99999))
    text = f"我在{org}的第{i}笔转账{amount}元没到账"
    money_start = text.index(amount)
    truth = {
        "intent": intent or rng.choices(INTENTS, WEIGHTS)[0],
        "compliance": rng.choice(["compliant", "violation"]),
        "entities": [
            {"start": 2, "end": 2 + len(org), "type": "ORG"},
            {"start": money_start, "end": money_start + len(amount) + 1, "type": "MONEY"},
        ],
    }
    annotations = {}
    for name, rate in noise.items():
        labels = json.loads(json.dumps(truth))
        if rng.random() < rate:
            labels["intent"] = rng.choice([x for x in INTENTS if x != truth["intent"]])
        if rng.random() < rate:
            labels["compliance"] = "violation" if truth["compliance"] == "compliant" else "compliant"
        if rng.random() < rate:
            labels["entities"][0]["type"] = "PER"
        annotations[name] = labels
    return {"id": f"t-{i:05d}", "text": text, "source": "synthetic", "annotations": annotations, "meta": {}}


def make_records(n: int, noise: dict[str, float] | None = None, seed: int = 0) -> list[dict]:
    """`n` records labelled by the annotators in `noise` (default: three careful ones)."""
    rng = random.Random(seed)
    noise = noise or {"ann_a": 0.0, "ann_b": 0.02, "ann_c": 0.02}
    return [make_record(i, rng, noise) for i in range(n)]


def flat(records: list[dict]) -> list[dict]:
    """Processed-shape records (the first annotator's labels), as split_records receives them."""
    return [{"id": r["id"], "text": r["text"], **next(iter(r["annotations"].values()))} for r in records]


def stage_params(**section) -> StageParams:
    """StageParams with the repository's tasks and a label_qa section built from `section`."""
    return StageParams(seed=42, tasks=TASKS, section=LabelQaParams(**section))


def write_interim(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- kappa statistics --------------------------------------------------------------------------------


def test_cohen_kappa_on_a_hand_computed_table():
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # po = 35/50 = 0.7; pe = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["x", "y", "x"], ["x", "y", "x"]) == pytest.approx(1.0)
    # one shared label throughout: sklearn says nan (0/0); it is perfect agreement
    assert cohen_kappa(["x"] * 4, ["x"] * 4) == 1.0


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) style example as on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    # by hand: column totals 20, 28, 39, 21, 32 of 140 ratings -> Pe = 4170 / 19600;
    # sum_i (sum_j n_ij^2 - 14) = 688 over 10 * 14 * 13 -> P = 688 / 1820
    p_bar, p_e = Fraction(688, 1820), Fraction(4170, 19600)
    expected = float((p_bar - p_e) / (1 - p_e))
    assert expected == pytest.approx(0.2099, abs=1e-4)
    assert fleiss_kappa(table) == pytest.approx(expected, abs=1e-12)


def test_fleiss_from_sequences_builds_the_count_table():
    # 4 items x 3 raters: counts per item (x, y) = (3,0), (2,1), (1,2), (0,3)
    seqs = {"a": ["x", "x", "x", "y"], "b": ["x", "x", "y", "y"], "c": ["x", "y", "y", "y"]}
    assert fleiss_from_sequences(seqs) == pytest.approx(fleiss_kappa([[3, 0], [2, 1], [1, 2], [0, 3]]))
    # P_i = 1, 1/3, 1/3, 1 -> P = 2/3; p = (1/2, 1/2) -> Pe = 1/2; kappa = 1/3
    assert fleiss_from_sequences(seqs) == pytest.approx(1 / 3)
    # items someone did not label are left out
    seqs["c"] = [None, "y", "y", "y"]
    assert fleiss_from_sequences(seqs) == pytest.approx(fleiss_kappa([[2, 1], [1, 2], [0, 3]]))
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[2, 1], [1, 1]])


def test_entity_layer_is_measured_on_character_bio_tags():
    records = make_records(60, {"ann_a": 0.0, "ann_b": 0.0}, seed=3)
    for r in records[:30]:  # ann_b misses the MONEY span on half the records
        r["annotations"]["ann_b"]["entities"] = r["annotations"]["ann_b"]["entities"][:1]
    result = label_qa(records, stage_params(on_fail="warn"))
    kappa = result.metrics["kappa_entities_ann_a_ann_b"]
    assert 0.3 < kappa < 0.95
    assert result.metrics["kappa_intent_ann_a_ann_b"] == 1.0
    # with two annotators a span needs both to be kept: the MONEY span is gone where ann_b missed it
    processed = {r["id"]: r for split in result.splits.values() for r in split}
    assert [e["type"] for e in processed["t-00000"]["entities"]] == ["ORG"]
    assert [e["type"] for e in processed["t-00059"]["entities"]] == ["ORG", "MONEY"]


# --- the gate ----------------------------------------------------------------------------------------


def noisy_records() -> list[dict]:
    return make_records(300, {"ann_a": 0.0, "ann_b": 0.01, "ann_c": 0.35}, seed=1)


def test_gate_fails_naming_the_weak_pairs_and_the_remedy():
    with pytest.raises(AgreementGateError) as info:
        label_qa(noisy_records(), stage_params())
    message = str(info.value)
    assert "layer intent: ann_a/ann_c kappa=" in message
    assert "layer compliance: ann_b/ann_c kappa=" in message
    assert "ann_a/ann_b" not in message
    assert "exclude_annotators: [ann_c]" in message and "on_fail: warn" in message
    kappas = info.value.agreement.kappas
    assert kappas["intent"][("ann_a", "ann_b")] > 0.95 > 0.8 > kappas["intent"][("ann_a", "ann_c")]


def test_gate_warn_records_the_failure_and_continues():
    result = label_qa(noisy_records(), stage_params(on_fail="warn"))
    m = result.metrics
    assert m["gate_passed"] == 0 and m["kappa_skipped"] == 0
    assert m["min_kappa"] < 0.8 and m["min_kappa"] == min(
        v for k, v in m.items() if k.startswith(("kappa_intent", "kappa_compliance"))
    )
    assert 0.0 < m["fleiss_intent"] < 1.0
    assert m["train_records"] + m["val_records"] + m["test_records"] == m["adjudicated"]
    assert m["adjudicated"] + m["needs_review"] == m["records_in"] == 300
    # the careful annotator agrees with the majority more than the noisy one
    assert m["agreement_ann_a_intent_accuracy"] > m["agreement_ann_c_intent_accuracy"]
    assert m["agreement_ann_a_entities_kappa"] > m["agreement_ann_c_entities_kappa"]


def test_exclude_annotators_drops_the_weak_one_from_qa_and_votes():
    result = label_qa(noisy_records(), stage_params(exclude_annotators=["ann_c"]))
    m = result.metrics
    assert m["gate_passed"] == 1 and m["annotators"] == 2 and m["min_kappa"] > 0.9
    assert not [k for k in m if "ann_c" in k]
    assert result.agreement.annotators == ["ann_a", "ann_b"]


def test_exclude_unknown_annotator_lists_the_known_ones():
    with pytest.raises(ParamsError, match=r"unknown annotator\(s\) 'ann_x'.*ann_a, ann_b, ann_c"):
        label_qa(make_records(20), stage_params(exclude_annotators=["ann_x"]))
    with pytest.raises(ParamsError, match="leaves no annotator"):
        label_qa(make_records(20), stage_params(exclude_annotators=["ann_a", "ann_b", "ann_c"]))


# --- adjudication ------------------------------------------------------------------------------------


def test_ties_go_to_needs_review_with_all_labels():
    records = make_records(80, {"ann_a": 0.0, "ann_b": 0.0}, seed=2)
    for r in records[:5]:  # two annotators disagree: no strict majority
        r["annotations"]["ann_b"]["intent"] = (
            "fraud_report" if r["annotations"]["ann_a"]["intent"] != "fraud_report" else "transfer"
        )
    three = make_records(1, {"ann_a": 0.0, "ann_b": 0.0, "ann_c": 0.0}, seed=9)[0]
    three["id"], three["text"] = "t-three", three["text"] + "（三人三个答案）"
    for name, label in zip(["ann_a", "ann_b", "ann_c"], INTENTS, strict=False):
        three["annotations"][name]["intent"] = label
    records.append(three)
    result = label_qa(records, stage_params(on_fail="warn"))
    review_ids = {r["id"] for r in result.needs_review}
    assert review_ids == {r["id"] for r in records[:5]} | {"t-three"}
    assert result.metrics["needs_review"] == 6 and result.metrics["adjudicated"] == 75
    in_splits = {r["id"] for split in result.splits.values() for r in split}
    assert not review_ids & in_splits
    tie = next(r for r in result.needs_review if r["id"] == "t-three")
    assert set(tie["annotations"]) == {"ann_a", "ann_b", "ann_c"}
    assert (
        "no strict majority" in tie["unresolved"]["intent"]
        and "ann_c=balance_inquiry" in tie["unresolved"]["intent"]
    )


def test_majority_vote_on_labels_and_entity_spans():
    record = make_records(1, {"ann_a": 0.0, "ann_b": 0.0, "ann_c": 0.0}, seed=4)[0]
    ann = record["annotations"]
    ann["ann_c"]["intent"] = "fee_dispute" if ann["ann_a"]["intent"] != "fee_dispute" else "transfer"
    ann["ann_c"]["entities"].append({"start": 0, "end": 1, "type": "PER"})  # one of three: dropped
    ann["ann_b"]["entities"] = ann["ann_b"]["entities"][:1]  # MONEY: two of three (a, c) -> kept
    records = [record, *make_records(40, {"ann_a": 0.0, "ann_b": 0.0, "ann_c": 0.0}, seed=5)]
    result = label_qa(records, stage_params())
    processed = next(r for split in result.splits.values() for r in split if r["id"] == record["id"])
    assert processed["intent"] == ann["ann_a"]["intent"]
    org, money = ann["ann_a"]["entities"]
    assert processed["entities"] == [
        {**org, "text": record["text"][org["start"] : org["end"]]},
        {**money, "text": record["text"][money["start"] : money["end"]]},
    ]
    assert set(processed) == {"id", "text", "intent", "compliance", "entities"}


# --- the split ---------------------------------------------------------------------------------------


def test_identical_texts_never_land_in_two_splits():
    records = flat(make_records(200, seed=6))
    for i, r in enumerate(records[100:], start=100):  # every text twice (dedup off upstream)
        r["text"] = records[i - 100]["text"]
    records[150]["text"] = " " + records[50]["text"].upper()  # differs only in case and spacing
    splits = split_records(records, 0.15, 0.15, seed=42)
    texts = {name: {normalised_text(r["text"]) for r in split} for name, split in splits.items()}
    assert (
        not texts["train"] & texts["val"]
        and not texts["train"] & texts["test"]
        and not texts["val"] & texts["test"]
    )
    assert sum(len(s) for s in splits.values()) == 200


@pytest.mark.parametrize(("val_fraction", "test_fraction"), [(0.15, 0.15), (0.2, 0.1), (0.3, 0.05)])
def test_shares_are_about_the_fractions_asked(val_fraction, test_fraction):
    records = flat(make_records(3000, seed=3))
    splits = split_records(records, val_fraction, test_fraction, seed=42)
    assert sum(len(s) for s in splits.values()) == 3000
    # binomial noise at n=3000: one standard deviation is under 0.9 points
    assert abs(len(splits["val"]) / 3000 - val_fraction) < 0.025
    assert abs(len(splits["test"]) / 3000 - test_fraction) < 0.025


def test_stratification_is_approximate_and_its_deviation_is_reported():
    records = flat(make_records(2000, seed=7))
    splits = split_records(records, 0.15, 0.15, seed=42)
    deviation = label_deviation(splits, "intent")
    assert 0 < deviation["stratify_deviation_val"] < 0.05 and 0 < deviation["stratify_deviation_test"] < 0.05
    assert deviation["classes_missing_from_train"] == 0
    # the measure is the total variation distance: a split holding one class only is far from the whole
    lopsided = {
        "train": splits["train"],
        "val": [r for r in records if r["intent"] == "fraud_report"],
        "test": [],
    }
    whole = lopsided["train"] + lopsided["val"]
    fraud_share = sum(r["intent"] == "fraud_report" for r in whole) / len(whole)
    assert label_deviation(lopsided, "intent")["stratify_deviation_val"] == round(1 - fraud_share, 4)


def test_a_records_split_does_not_depend_on_the_other_records():
    records = flat(make_records(600, seed=8))
    where = {
        r["id"]: name for name, split in split_records(records, 0.15, 0.15, seed=42).items() for r in split
    }
    fewer = records[::3]
    again = {
        r["id"]: name for name, split in split_records(fewer, 0.15, 0.15, seed=42).items() for r in split
    }
    assert again == {r["id"]: where[r["id"]] for r in fewer}
    # by id: texts may change (another clean rule) and the split stays
    by_id = split_records(records, 0.15, 0.15, seed=42, by="id")
    retexted = [{**r, "text": r["text"] + "。"} for r in records]
    assert split_records(retexted, 0.15, 0.15, seed=42, by="id")["test"] == [
        {**r, "text": r["text"] + "。"} for r in by_id["test"]
    ]


def test_tiny_data_still_gets_a_val_and_a_test_record():
    rng = random.Random(8)
    records = flat([make_record(i, rng, {"gold": 0.0}, intent=INTENTS[i % 4]) for i in range(5)])
    splits = split_records(records, 0.15, 0.05, seed=42)
    assert len(splits["val"]) >= 1 and len(splits["test"]) >= 1 and len(splits["train"]) >= 1
    assert sum(len(s) for s in splits.values()) == 5
    with pytest.raises(DataError, match="too few"):
        split_records(records[:2], 0.15, 0.15, seed=42)


def test_split_is_deterministic_for_a_seed():
    records = flat(make_records(120, seed=9))
    first = split_records(records, 0.15, 0.15, seed=42)
    again = split_records(records, 0.15, 0.15, seed=42)
    other = split_records(records, 0.15, 0.15, seed=43)
    assert first == again and first != other


def test_test_fingerprint_changes_when_and_only_when_the_test_set_changes():
    records = flat(make_records(400, seed=12))
    splits = split_records(records, 0.15, 0.15, seed=42)
    base = split_fingerprint(splits["test"])
    assert base["test_fingerprint_count"] == len(splits["test"]) and len(base["test_fingerprint"]) == 12
    assert split_fingerprint(list(reversed(splits["test"]))) == base  # order-free
    # a different val share moves records between train and val only: same test, same fingerprint
    wider_val = split_records(records, 0.3, 0.15, seed=42)
    assert wider_val["val"] != splits["val"] and split_fingerprint(wider_val["test"]) == base
    # a train record removed upstream: same test set, same fingerprint
    train_id = splits["train"][0]["id"]
    assert (
        split_fingerprint(split_records([r for r in records if r["id"] != train_id], 0.15, 0.15, 42)["test"])
        == base
    )
    # a test record removed, or another seed: a different test set, a different fingerprint
    test_id = splits["test"][0]["id"]
    fewer = split_fingerprint(
        split_records([r for r in records if r["id"] != test_id], 0.15, 0.15, 42)["test"]
    )
    assert (
        fewer["test_fingerprint"] != base["test_fingerprint"]
        and fewer["test_fingerprint_count"] == len(splits["test"]) - 1
    )
    assert split_fingerprint(split_records(records, 0.15, 0.15, seed=43)["test"]) != base


def test_single_annotator_skips_kappa_and_still_splits():
    records = make_records(100, {"gold": 0.0}, seed=10)
    result = label_qa(records, stage_params())
    m = result.metrics
    assert m["kappa_skipped"] == 1 and m["gate_passed"] == 1 and m["annotators"] == 1
    assert not [k for k in m if k.startswith(("kappa_intent", "fleiss", "min_kappa", "agreement_"))]
    assert m["adjudicated"] == 100 and m["needs_review"] == 0
    assert m["val_records"] > 0 and m["test_records"] > 0
    assert m["train_records"] + m["val_records"] + m["test_records"] == 100


# --- bad input and params ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda r: r.pop("text"), r":2: key 'text': expected a non-empty string"),
        (lambda r: r.update(annotations={}), r":2: key 'annotations'"),
        (
            lambda r: r["annotations"]["ann_a"].update(intent="no_such_intent"),
            r":2: key annotations.ann_a.intent: label 'no_such_intent'",
        ),
        (
            lambda r: r["annotations"]["ann_b"]["entities"].append({"start": 5, "end": 999, "type": "ORG"}),
            r":2: key annotations.ann_b.entities: bad span",
        ),
        (
            lambda r: r["annotations"]["ann_b"]["entities"].append({"start": 0, "end": 2, "type": "CITY"}),
            r"entity type 'CITY'",
        ),
        (lambda r: r.update(id="t-00000"), r":2: duplicate id 't-00000' \(also on line 1\)"),
    ],
)
def test_bad_records_name_file_line_and_key(tmp_path, mutate, pattern):
    records = make_records(3)
    mutate(records[1])
    path = write_interim(tmp_path / "clean.jsonl", records)
    with pytest.raises(DataError, match=pattern):
        load_interim(path, TASKS)


def test_bad_files_and_params(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_interim(tmp_path / "missing.jsonl", TASKS)
    (tmp_path / "broken.jsonl").write_text('{"id": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        load_interim(tmp_path / "broken.jsonl", TASKS)
    with pytest.raises(ParamsError, match="stratify_by='entities' is not a classification field"):
        label_qa(make_records(20), stage_params(stratify_by="entities"))
    records = make_records(20)
    for r in records:
        for labels in r["annotations"].values():
            labels.pop("compliance")
    with pytest.raises(
        DataError, match=r"no record has field 'compliance' \(params tasks.compliance.field\)"
    ):
        label_qa(records, stage_params())


# --- the script --------------------------------------------------------------------------------------


def run_script(tmp_path: Path, records: list[dict], **section) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["label_qa"].update(section)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    write_interim(tmp_path / "clean.jsonl", records)
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "label_qa.py"),
        "--in",
        "clean.jsonl",
        "--out-dir",
        "processed",
    ]
    cmd += ["--needs-review", "needs_review.jsonl", "--reports", "reports"]
    env = {**os.environ, "DSFT_PARAMS": str(tmp_path / "params.yaml"), "MPLBACKEND": "Agg"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_script_end_to_end(tmp_path):
    records = make_records(240, {"ann_a": 0.0, "ann_b": 0.02, "ann_c": 0.04}, seed=11)
    records[0]["annotations"]["ann_b"]["intent"] = (
        "fee_dispute" if records[0]["annotations"]["ann_a"]["intent"] != "fee_dispute" else "transfer"
    )
    records[0]["annotations"]["ann_c"]["intent"] = (
        "fraud_report" if records[0]["annotations"]["ann_a"]["intent"] != "fraud_report" else "card_loss"
    )
    done = run_script(tmp_path, records)
    assert done.returncode == 0, done.stderr
    splits = {name: read_jsonl(tmp_path / "processed" / f"{name}.jsonl") for name in ("train", "val", "test")}
    review = read_jsonl(tmp_path / "needs_review.jsonl")
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in review] == [records[0]["id"]]
    assert metrics["records_in"] == 240 and metrics["needs_review"] == 1
    assert {k: metrics[f"{k}_records"] for k in splits} == {k: len(v) for k, v in splits.items()}
    assert 0.1 < metrics["val_share"] < 0.2 and metrics["gate_passed"] == 1
    assert metrics["test_fingerprint_count"] == len(splits["test"]) and metrics["split_given"] == 0
    assert {
        "kappa_intent_ann_a_ann_b",
        "kappa_entities_ann_b_ann_c",
        "fleiss_compliance",
        "min_kappa",
    } <= set(metrics)
    # DVC metrics are numbers, or a string for the fingerprint
    assert all(isinstance(v, int | float) for k, v in metrics.items() if k != "test_fingerprint")
    assert splits["train"][0]["entities"][0]["text"] in splits["train"][0]["text"]
    for png in ("kappa_heatmap.png", "label_distribution.png"):
        assert (tmp_path / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = (tmp_path / "reports" / "label_counts.csv").read_text(encoding="utf-8").splitlines()
    assert counts[0] == "label,count" and counts[1].startswith("transfer,")
    assert sum(int(line.split(",")[1]) for line in counts[1:]) == metrics["adjudicated"]
    first = (tmp_path / "processed" / "train.jsonl").read_bytes()
    assert run_script(tmp_path, records).returncode == 0
    assert (tmp_path / "processed" / "train.jsonl").read_bytes() == first  # same params, same bytes


def test_script_exits_non_zero_when_the_gate_fails(tmp_path):
    done = run_script(tmp_path, noisy_records())
    assert done.returncode == 1
    assert "label_qa gate failed" in done.stderr and "ann_a/ann_c" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "processed" / "train.jsonl").exists()
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["gate_passed"] == 0 and (tmp_path / "reports" / "kappa_heatmap.png").exists()
    assert run_script(tmp_path, noisy_records(), on_fail="warn").returncode == 0
