"""Stage augment: spans stay on their entity text, labels carry over, only train is read, seeded."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from deepseek_sft.augment import augment_records, load_train, run_augment
from deepseek_sft.augment_backtranslate import backtranslate
from deepseek_sft.augment_edits import (
    MentionPool,
    SynonymDictionary,
    clauses,
    latin_sentences,
    mention_edit,
    structure_edit,
    synonym_edit,
)
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.io import DataError, write_jsonl

from conftest import REPO, edit_params

BODIES = [
    "我在{ORG}的卡丢了，帮我挂失一下",
    "帮我给{PER}转账{MONEY}，怎么操作。谢谢",
    "{DATE}的信用卡账单怎么这么多，能不能分期。我想了解一下",
    "你好，我想查一下{ORG}的余额，现在还剩多少钱",
    "想申请{PRODUCT}，需要什么材料",
    "余额还有12,000，怎么办",
    "{PER}的密码忘了，能重置吗？急用钱，麻烦尽快处理",
    "我想提前还款{MONEY}，要不要违约金",
]
OPENERS = ["", "你好，", "请问", "麻烦问一下，", "在吗？"]
CLOSERS = ["", "，谢谢", "。在线等", "！", "，急"]
SLOTS = {
    "ORG": ["招商银行", "工商银行", "平安保险", "中信证券", "易方达基金", "建设银行北京分行"],
    "PER": ["张伟", "李娜", "欧阳明", "王芳", "刘洋", "陈静"],
    "MONEY": ["5000元", "12,000元", "两千块", "3.5万", "人民币800元", "300美元"],
    "DATE": ["3月5日", "上个月15号", "2024-03-05", "下周二", "昨天"],
    "PRODUCT": [
        "招商银行信用卡",
        "稳盈理财",
        "闪电贷",
        "安心重疾险",
        "易方达消费精选A",
    ],  # 招商银行信用卡 holds 信用卡
}


def make_record(i: int, rng: random.Random) -> dict:
    """A processed record with entity spans computed while filling the template."""
    template = rng.choice(OPENERS) + BODIES[i % len(BODIES)] + rng.choice(CLOSERS)
    text, entities, cursor = "", [], 0
    while (start := template.find("{", cursor)) >= 0:
        end = template.index("}", start)
        text += template[cursor:start]
        kind = template[start + 1 : end]
        surface = rng.choice(SLOTS[kind])
        entities.append({"start": len(text), "end": len(text) + len(surface), "type": kind, "text": surface})
        text += surface
        cursor = end + 1
    text += template[cursor:]
    intent = ["card_loss", "transfer", "credit_card_bill", "balance_inquiry"][i % 4]
    return {
        "id": f"r{i:04d}",
        "text": text,
        "intent": intent,
        "compliance": "compliant",
        "entities": entities,
        "annotations": {"ann_a": {"intent": intent}},
    }


@pytest.fixture
def train_file(tmp_path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "processed" / "train.jsonl"
    write_jsonl(path, [make_record(i, rng) for i in range(80)])
    return path


@pytest.fixture
def stage(params_copy, monkeypatch):
    monkeypatch.chdir(REPO)  # the dictionary path in params is relative to the repository root
    edit_params(params_copy, {"augment.ratio": 0.6, "augment.methods": ["synonym", "structure", "mention"]})
    return load_section("augment")


def assert_spans_follow_source(
    variant: dict, source: dict, mentions: dict[str, set[str]] | None = None
) -> None:
    """Every span covers its own text and the source's entities carry over: the same (type, text) pairs, or,
    for mention replacement, the same types with surfaces that are train mentions of that type."""
    for span in variant["entities"]:
        assert variant["text"][span["start"] : span["end"]] == span["text"]
    if mentions is None:
        got = Counter((s["type"], s["text"]) for s in variant["entities"])
        assert got == Counter((s["type"], s["text"]) for s in source["entities"])
        return
    assert Counter(s["type"] for s in variant["entities"]) == Counter(s["type"] for s in source["entities"])
    assert all(s["text"] in mentions[s["type"]] for s in variant["entities"])
    assert {(s["type"], s["text"]) for s in variant["entities"]} != {
        (s["type"], s["text"]) for s in source["entities"]
    }


class FakeTranslator:
    """zh -> "en" tags the text; "en" -> zh rewrites a word and spaces out the placeholders."""

    def __init__(self, lose_placeholder_in: str | None = None):
        self.calls: list[tuple[str, str, int]] = []
        self.lose = lose_placeholder_in

    def translate(self, texts, source, target):
        self.calls.append((source, target, len(texts)))
        if target == "en":
            return [f"<en>{t}" for t in texts]
        out = []
        for t in texts:
            t = "请问" + t.removeprefix("<en>").replace("我", "本人").replace("[E0]", " [ E0 ] ")
            if self.lose and self.lose in t:
                t = t.replace("[E1]", "")
            out.append(t)
        return out


# --- edits ---------------------------------------------------------------------------------------------


def test_synonym_never_replaces_inside_an_entity():
    synonyms = SynonymDictionary([["信用卡", "贷记卡"], ["申请", "办理"]])
    text = "想申请招商银行信用卡"
    spans = {"entities": [{"start": 3, "end": 10, "type": "PRODUCT"}]}
    edited = synonym_edit(text, spans, synonyms, 5, random.Random(0))
    assert edited.text == "想办理招商银行信用卡"
    assert edited.spans["entities"] == [{"start": 3, "end": 10, "type": "PRODUCT", "text": "招商银行信用卡"}]


def test_synonym_shifts_spans_after_a_longer_replacement():
    synonyms = SynonymDictionary([["帮我", "麻烦帮我"]])
    text = "帮我给张伟转5000元"
    spans = {"entities": [{"start": 3, "end": 5, "type": "PER"}, {"start": 6, "end": 11, "type": "MONEY"}]}
    edited = synonym_edit(text, spans, synonyms, 2, random.Random(0))
    assert edited.text == "麻烦帮我给张伟转5000元"
    assert [(s["start"], s["end"], s["text"]) for s in edited.spans["entities"]] == [
        (5, 7, "张伟"),
        (8, 13, "5000元"),
    ]


def test_structure_moves_spans_with_their_clause():
    text = "我在招商银行开户，给张伟转5000元"
    spans = {"entities": [{"start": 2, "end": 6, "type": "ORG"}, {"start": 10, "end": 12, "type": "PER"}]}
    edited = structure_edit(text, spans, True, random.Random(0))
    assert edited.text == "给张伟转5000元，我在招商银行开户"
    assert [(s["start"], s["text"]) for s in edited.spans["entities"]] == [(1, "张伟"), (12, "招商银行")]


def test_a_comma_inside_a_number_or_entity_is_no_clause_boundary():
    text = "余额还有12,000，怎么办"
    assert clauses(text, 0, len(text), [False] * len(text)) == [(0, 10), (11, 14)]
    money = "转12,000元给他"
    blocked = [1 <= i < 8 for i in range(len(money))]
    assert clauses(money, 0, len(money), blocked) == [(0, len(money))]


def test_sentences_reorder_but_an_unterminated_tail_stays_last():
    text = "在吗？卡丢了。怎么办"
    edited = structure_edit(text, {"entities": []}, True, random.Random(1))
    assert edited.text == "卡丢了。在吗？怎么办"


def test_single_clause_text_gives_a_reason_not_a_variant():
    edited = structure_edit("帮我挂失", {"entities": []}, True, random.Random(0))
    assert edited.reason == "single_clause" and edited.text == ""


def test_mention_replacement_swaps_surfaces_of_the_same_type_and_moves_later_spans():
    text = "给张伟转5000元，招商银行"
    spans = {
        "entities": [
            {"start": 1, "end": 3, "type": "PER"},
            {"start": 4, "end": 9, "type": "MONEY"},
            {"start": 10, "end": 14, "type": "ORG"},
        ]
    }
    other = {"entities": [{"start": 0, "end": 3, "type": "PER"}, {"start": 3, "end": 5, "type": "MONEY"}]}
    pool = MentionPool([spans, other], [text, "欧阳锋五元"])
    assert pool.by_type == {"PER": ["张伟", "欧阳锋"], "MONEY": ["5000元", "五元"], "ORG": ["招商银行"]}
    edited = mention_edit(text, spans, pool, 3, random.Random(0))
    # ORG has no other mention in the pool, so it stays; the others change and everything after them moves
    assert edited.text == "给欧阳锋转五元，招商银行"
    assert [(s["start"], s["end"], s["type"], s["text"]) for s in edited.spans["entities"]] == [
        (1, 4, "PER", "欧阳锋"),
        (5, 7, "MONEY", "五元"),
        (8, 12, "ORG", "招商银行"),
    ]


def test_mention_replacement_gives_reasons_and_leaves_overlapping_spans_alone():
    pool = MentionPool([{"entities": [{"start": 0, "end": 2, "type": "PER"}]}], ["张伟"])
    assert mention_edit("在吗", {"entities": []}, pool, 3, random.Random(0)).reason == "no_entity"
    only = {"entities": [{"start": 0, "end": 2, "type": "PER"}]}
    assert mention_edit("张伟在吗", only, pool, 3, random.Random(0)).reason == "no_alternative_mention"
    nested = {"a": [{"start": 0, "end": 4, "type": "ORG"}], "b": [{"start": 0, "end": 2, "type": "PER"}]}
    assert mention_edit("招商银行", nested, pool, 3, random.Random(0)).reason == "no_entity"


def test_backtranslation_restores_entities_verbatim(params_copy):
    params = load_section("augment").section.backtranslation
    items = [
        (
            "我给张伟转了5000元",
            {"entities": [{"start": 2, "end": 4, "type": "PER"}, {"start": 6, "end": 11, "type": "MONEY"}]},
        ),
        ("我的卡丢了", {"entities": []}),
    ]
    translator = FakeTranslator()
    first, second = backtranslate(items, translator, params)
    assert translator.calls == [("zh", "en", 2), ("en", "zh", 2)]  # one batch each way
    assert first.text == "请问本人给张伟转了5000元"  # the spaces the translator put around [E0] are gone
    assert [(s["start"], s["end"], s["text"]) for s in first.spans["entities"]] == [
        (5, 7, "张伟"),
        (9, 14, "5000元"),
    ]
    assert second.text == "请问本人的卡丢了" and second.spans == {"entities": []}


def test_backtranslation_drops_a_round_trip_that_lost_an_entity(params_copy):
    params = load_section("augment").section.backtranslation
    items = [
        (
            "我给张伟转了5000元",
            {"entities": [{"start": 2, "end": 4, "type": "PER"}, {"start": 6, "end": 11, "type": "MONEY"}]},
        )
    ]
    (edited,) = backtranslate(items, FakeTranslator(lose_placeholder_in="[E1]"), params)
    assert edited.reason == "entity_lost"


# --- stage ---------------------------------------------------------------------------------------------


def test_every_variant_keeps_spans_and_labels(train_file, stage):
    records, _ = load_train(train_file, stage.tasks)
    result = augment_records(records, stage)
    sources = {r["id"]: r for r in records}
    mentions: dict[str, set[str]] = {}
    for record in records:
        for span in record["entities"]:
            mentions.setdefault(span["type"], set()).add(record["text"][span["start"] : span["end"]])
    assert len(result.variants) == 48  # ratio 0.6 of 80
    assert Counter(v["augment"]["method"] for v in result.variants) == {
        "synonym": 16,
        "structure": 16,
        "mention": 16,
    }
    for variant in result.variants:
        source = sources[variant["augment"]["source_id"]]
        is_mention = variant["augment"]["method"] == "mention"
        assert_spans_follow_source(variant, source, mentions if is_mention else None)
        assert variant["text"] != source["text"]
        assert (variant["intent"], variant["compliance"]) == (source["intent"], source["compliance"])
        assert "annotations" not in variant  # per-annotator offsets would point into the old text
    texts = [r["text"] for r in result.variants]
    assert len(texts) == len(set(texts)) and not set(texts) & {r["text"] for r in records}


def test_counts_per_method_add_up(train_file, stage, tmp_path):
    out = tmp_path / "train_augmented.jsonl"
    metrics = run_augment(train_file, out, tmp_path / "reports", stage)
    lines = out.read_text(encoding="utf-8").splitlines()
    written = Counter(json.loads(line).get("augment", {}).get("method", "original") for line in lines)
    assert written == {
        "original": 80,
        "synonym": metrics["added_synonym"],
        "structure": metrics["added_structure"],
        "mention": metrics["added_mention"],
    }
    assert metrics["quota_synonym"] == metrics["quota_structure"] == metrics["quota_mention"] == 16
    assert metrics["added_synonym"] == metrics["added_structure"] == metrics["added_mention"] == 16
    assert metrics["added_total"] == 48 and metrics["out_records"] == 128
    for method in ("synonym", "structure", "mention"):
        skipped = sum(v for k, v in metrics.items() if k.startswith("skipped_") and k.endswith(f"_{method}"))
        assert metrics[f"tried_{method}"] == metrics[f"added_{method}"] + skipped
    assert lines[:80] == train_file.read_text(encoding="utf-8").splitlines()  # originals verbatim, first
    csv = (tmp_path / "reports" / "added_per_method.csv").read_text()
    assert csv == "method,added\nsynonym,16\nstructure,16\nmention,16\n"


def test_backtranslation_through_the_stage(train_file, stage, params_copy):
    edit_params(
        params_copy,
        {
            "augment.methods": ["backtranslation"],
            "augment.backtranslation.batch_size": 8,
            "augment.backtranslation.backend": "http",  # never called: the fake translator is passed in
            "augment.backtranslation.url": "http://127.0.0.1:9/translate",
        },
    )
    stage = load_section("augment")
    records, _ = load_train(train_file, stage.tasks)
    result = augment_records(records, stage, translator=FakeTranslator())
    assert result.metrics["added_backtranslation"] == 48
    sources = {r["id"]: r for r in records}
    for variant in result.variants:
        assert variant["text"].startswith("请问")
        assert_spans_follow_source(variant, sources[variant["augment"]["source_id"]])


def test_deterministic_and_seeded(train_file, stage, params_copy, tmp_path):
    run_augment(train_file, tmp_path / "a.jsonl", tmp_path / "ra", stage)
    run_augment(train_file, tmp_path / "b.jsonl", tmp_path / "rb", load_section("augment"))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    edit_params(params_copy, {"seed": 7})
    run_augment(train_file, tmp_path / "c.jsonl", tmp_path / "rc", load_section("augment"))
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_disabled_writes_a_byte_copy(train_file, params_copy, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    edit_params(params_copy, {"augment.enabled": False})
    out = tmp_path / "train_augmented.jsonl"
    metrics = run_augment(train_file, out, tmp_path / "reports", load_section("augment"))
    assert out.read_bytes() == train_file.read_bytes()
    assert metrics == {"train_records": 80, "added_total": 0, "out_records": 80}


def test_script_reads_train_only(train_file, params_copy, tmp_path):
    """Through the real script: val/test beside train are never opened (audit hook on open)."""
    for split in ("val", "test"):
        (train_file.parent / f"{split}.jsonl").write_text("not json, and must never be read\n")
    probe = (
        "import sys, runpy\n"
        "opened = []\n"
        "sys.addaudithook(lambda e, a: opened.append(str(a[0])) if e == 'open' and isinstance(a[0], str) else None)\n"
        f"sys.argv = ['augment.py', '--train', {str(train_file)!r}, '--out', {str(tmp_path / 'out.jsonl')!r},"
        f" '--reports', {str(tmp_path / 'reports')!r}]\n"
        "try:\n"
        "    runpy.run_path('scripts/augment.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('\\n'.join(p for p in opened if p.endswith('.jsonl')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    opened = {Path(p).name for p in done.stdout.split()}
    assert "train.jsonl" in opened
    assert not opened & {"val.jsonl", "test.jsonl"}
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["added_total"] == 24  # default ratio 0.3 of 80


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_json_line_names_file_and_line(tmp_path, stage):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a", "text": "帮我挂失", "entities": []}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl:2: invalid JSON"):
        load_train(path, stage.tasks)


def test_span_text_mismatch_is_refused(tmp_path, stage):
    path = tmp_path / "train.jsonl"
    record = {
        "id": "a",
        "text": "给张伟转账",
        "entities": [{"start": 0, "end": 2, "type": "PER", "text": "张伟"}],
    }
    write_jsonl(path, [record])
    with pytest.raises(
        DataError, match=r"train\.jsonl:1: key 'entities': span text '张伟' != text\[0:2\] '给张'"
    ):
        load_train(path, stage.tasks)


def test_duplicate_id_and_missing_file(tmp_path, stage):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"id": "a", "text": "帮我挂失"}, {"id": "a", "text": "帮我转账"}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: duplicate id 'a' \(also on line 1\)"):
        load_train(path, stage.tasks)
    with pytest.raises(DataError, match="not found; expected the train split"):
        load_train(tmp_path / "nope.jsonl", stage.tasks)


def test_bad_dictionary_line_names_file_and_line(tmp_path):
    path = tmp_path / "syn.tsv"
    path.write_text("# comment\n信用卡\t贷记卡\n孤零零\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"syn\.tsv:3: expected at least two TAB-separated terms"):
        SynonymDictionary.from_tsv(path)


def test_repository_dictionary_loads_with_hundreds_of_terms():
    synonyms = SynonymDictionary.from_tsv(REPO / "resources" / "financial_synonyms.tsv")
    assert len(synonyms.alternatives) >= 300
    assert "贷记卡" in synonyms.alternatives["信用卡"]


def test_params_refuse_local_backtranslation_without_models(params_copy):
    edit_params(params_copy, {"augment.methods": ["synonym", "backtranslation"]})
    with pytest.raises(ParamsError, match="needs to_pivot_model and from_pivot_model"):
        load_section("augment")
    edit_params(params_copy, {"augment.methods": ["synonym", "synonym"]})
    with pytest.raises(ParamsError, match="lists a method twice"):
        load_section("augment")


@pytest.mark.slow
def test_local_seq2seq_translator_loads_a_model_directory(tmp_path):
    """Seq2SeqTranslator drives a local AutoModelForSeq2SeqLM (a tiny random BART here) greedily."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    from deepseek_sft.augment_backtranslate import Seq2SeqTranslator

    torch.set_num_threads(1)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.train_from_iterator(
        ["我的卡丢了[E0]", "my card is lost"],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path)
    config = BartConfig(
        vocab_size=fast.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(tmp_path)
    translator = Seq2SeqTranslator(
        {("zh", "en"): str(tmp_path), ("en", "zh"): str(tmp_path)}, max_new_tokens=6
    )
    first = translator.translate(["我的卡丢了[E0]", "卡丢了"], "zh", "en")
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert translator.translate(["我的卡丢了[E0]", "卡丢了"], "zh", "en") == first  # greedy: deterministic
    with pytest.raises(ValueError, match="no local translation model for zh->fr"):
        translator.translate(["卡"], "zh", "fr")


def test_http_translator_speaks_libretranslate(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from deepseek_sft.augment_backtranslate import HttpTranslator

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            texts = body["q"] if body["target"] == "en" else body["q"][:1]  # zh replies are one short
            data = json.dumps({"translatedText": [f"{body['target']}:{t}" for t in texts]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        translator = HttpTranslator(f"http://127.0.0.1:{server.server_address[1]}/translate", api_key="k")
        assert translator.translate(["卡丢了", "转账"], "zh", "en") == ["en:卡丢了", "en:转账"]
        assert seen[0] == {
            "q": ["卡丢了", "转账"],
            "source": "zh",
            "target": "en",
            "format": "text",
            "api_key": "k",
        }
        with pytest.raises(ValueError, match="expected translatedText as a list of 2 strings"):
            translator.translate(["a", "b"], "en", "zh")
    finally:
        server.shutdown()
        server.server_close()


def balanced(stage, field: str | None = "intent"):
    """The stage's params with augment.balance_by set to `field`."""
    return dataclasses.replace(stage, section=stage.section.model_copy(update={"balance_by": field}))


def test_balance_by_gives_rare_labels_about_as_many_variants_as_frequent_ones(train_file, stage):
    records, _ = load_train(train_file, stage.tasks)
    for i, record in enumerate(records):  # a long tail: 70 card_loss records, 10 fraud_report
        record["intent"] = "fraud_report" if i % 8 == 0 else "card_loss"
    plain = augment_records(records, balanced(stage, None))
    even = augment_records(records, balanced(stage))
    rare = {
        name: sum(v["intent"] == "fraud_report" for v in result.variants)
        for name, result in (("plain", plain), ("balanced", even))
    }
    assert len(even.variants) == len(plain.variants) == 48
    # plain: about 10/80 of 48 = 6. Balanced: the 10 rare records are walked first, one variant each per
    # method (where the method finds an edit), so up to 30
    assert rare["plain"] <= 10 and rare["balanced"] >= max(14, 2 * rare["plain"])
    share = even.metrics
    assert share["balance_rarest_share_before"] == pytest.approx(10 / 80)
    assert share["balance_rarest_share_after"] == pytest.approx((10 + rare["balanced"]) / 128)


def test_balance_by_a_field_a_record_lacks_names_the_record(train_file, stage):
    records, _ = load_train(train_file, stage.tasks)
    del records[3]["intent"]
    with pytest.raises(ValueError, match=rf"balance_by: record '{records[3]['id']}' has no 'intent' label"):
        augment_records(records, balanced(stage))


# --- language: English data ----------------------------------------------------------------------------

ENGLISH = [  # sentences in the style of a public English financial-news set, ORG entities marked
    ("Biohit said that it will cut costs, and lay off 10 of its own personnel.", ["Biohit"]),
    ("Gran , the company said that net sales rose 27.7 % and S.A. has agreed .", ["Gran"]),
    ("Nokia shares rose 5.5 percent. The company expects growth in 2010.", ["Nokia"]),
    ("Operating profit fell to EUR 1.2 mn. Mr. Smith said demand was weak. Sales grew in Finland.", []),
    ("Kone said its order book grew. The firm hired 200 people.", ["Kone"]),
    ("Sales at Stockmann fell, and the firm cut its outlook.", ["Stockmann"]),
    ("Componenta raised its guidance! The company cited strong demand.", ["Componenta"]),
    ("The U.S. unit of Ruukki Corp. said sales rose. It expects more orders.", ["Ruukki"]),
]


def english_records() -> list[dict]:
    """Processed English records: sentiment labels, ORG spans at each listed surface."""
    out = []
    for i, (text, orgs) in enumerate(ENGLISH):
        spans = [
            {"start": text.index(o), "end": text.index(o) + len(o), "type": "ORG", "text": o} for o in orgs
        ]
        label = ["positive", "negative", "neutral"][i % 3]
        out.append(
            {"id": f"e{i}", "text": text, "intent": label, "compliance": "compliant", "entities": spans}
        )
    return out


def english_stage(stage, **updates):
    """The stage's params with augment fields replaced (nested sections as dicts of their own fields)."""
    section = stage.section
    for key, value in updates.items():
        if isinstance(value, dict):
            value = getattr(section, key).model_copy(update=value)
        section = section.model_copy(update={key: value})
    return dataclasses.replace(stage, section=section.model_copy(update={"balance_by": None}))


def sentence_set(text: str) -> Counter:
    """The sentences of an English text (as the structure method splits them)."""
    return Counter(text[s:e] for s, e, _ in latin_sentences(text, [False] * len(text)))


def test_english_data_each_method_adds_sound_variants_or_says_why(stage, caplog):
    caplog.set_level(logging.WARNING, logger="deepseek_sft.augment")
    records = english_records()
    result = augment_records(records, english_stage(stage, ratio=3.0))
    m = result.metrics
    # synonym: the repository dictionary is Chinese; it adds nothing and says so in one line and the metrics
    assert (m["added_synonym"], m["unsupported_synonym"], m["quota_synonym"]) == (0, 1, 8)
    assert m["chinese_only_settings_on_latin"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert (
        "augment synonym: adds nothing: the dictionary resources/financial_synonyms.tsv holds CJK terms "
        "(0% Latin, 100% CJK of " in lines[0]
    )
    assert "but the train texts are 100% Latin, 0% CJK of " in lines[0]
    # structure: whole sentences only, each keeping its capital and full stop; one-sentence texts are skipped
    # with a reason (the "personnel.,Biohit said" bug cannot happen), and the shortfall is one log line
    sources = {r["id"]: r for r in records}
    structure = result.added["structure"]
    assert m["unsupported_structure"] == 0 and len(structure) == m["added_structure"] >= 5
    for variant in structure:
        source = sources[variant["augment"]["source_id"]]
        assert (
            sentence_set(variant["text"]) == sentence_set(source["text"])
            and len(sentence_set(source["text"])) >= 2
        )
        assert all(s[0].isupper() and s.rstrip()[-1] in ".!?" for s in sentence_set(variant["text"]))
        assert ".," not in variant["text"] and variant["text"] != source["text"]
        assert_spans_follow_source(variant, source)
    assert m["skipped_single_sentence_structure"] > 0
    assert any(line.startswith("augment structure: added ") and "single_sentence x" in line for line in lines)
    # mention: ORG names swapped between records, spans on the new names
    mentions = {"ORG": {o for _, orgs in ENGLISH for o in orgs}}
    assert m["added_mention"] > 0 and m["unsupported_mention"] == 0
    for variant in result.added["mention"]:
        assert_spans_follow_source(variant, sources[variant["augment"]["source_id"]], mentions)


def test_english_dictionary_replaces_whole_words_only(stage, tmp_path):
    dictionary = tmp_path / "en.tsv"
    dictionary.write_text("company\tfirm\nrose\tincreased\tclimbed\nsaid\tstated\n", encoding="utf-8")
    synonyms = SynonymDictionary.from_tsv(dictionary)
    text = "The firmly held firm said sales rose; prose aside."
    assert [text[s:e] for s, e in synonyms.find(text, [False] * len(text))] == ["firm", "said", "rose"]
    params = english_stage(stage, methods=["synonym"], ratio=1.0, synonym={"dictionary": str(dictionary)})
    result = augment_records(english_records(), params)
    assert (
        result.metrics["unsupported_synonym"] == 0 and result.metrics["chinese_only_settings_on_latin"] == 0
    )
    assert result.metrics["added_synonym"] >= 6
    for variant in result.added["synonym"]:
        words = variant["text"].split()
        assert not {"firmly", "companyly"} & set(words)
        assert_spans_follow_source(
            variant, next(r for r in english_records() if r["id"] == variant["augment"]["source_id"])
        )


def test_english_data_backtranslation_needs_an_english_source_lang(stage, caplog):
    caplog.set_level(logging.WARNING, logger="deepseek_sft.augment")
    bt = {"backend": "http", "url": "http://127.0.0.1:9/translate"}  # never called: a fake is passed in
    zh = english_stage(stage, methods=["backtranslation"], backtranslation=bt)
    result = augment_records(english_records(), zh, translator=FakeTranslator())
    assert (result.metrics["added_backtranslation"], result.metrics["unsupported_backtranslation"]) == (0, 1)
    assert "backtranslation.source_lang='zh' is written in CJK script" in caplog.records[0].getMessage()

    class Paraphraser:  # en -> de -> en that rewrites one word and spaces out the placeholders
        def translate(self, texts, source, target):
            return [t.replace("said", "stated").replace("[E0]", " [ E0 ]  ") for t in texts]

    en = english_stage(
        stage, methods=["backtranslation"], backtranslation={**bt, "source_lang": "en", "pivot_lang": "de"}
    )
    result = augment_records(english_records(), en, translator=Paraphraser())
    assert result.metrics["unsupported_backtranslation"] == 0 and result.metrics["added_backtranslation"] == 5
    first = result.added["backtranslation"][0]
    assert "stated" in first["text"] and "  " not in first["text"]  # word spaces kept, runs collapsed
    assert (
        first["text"][first["entities"][0]["start"] : first["entities"][0]["end"]]
        == first["entities"][0]["text"]
    )


def test_mention_on_data_without_entities_says_so(stage, caplog):
    caplog.set_level(logging.WARNING, logger="deepseek_sft.augment")
    records = [{**r, "entities": []} for r in english_records()]
    result = augment_records(records, english_stage(stage, methods=["mention"], ratio=1.0))
    assert (result.metrics["added_mention"], result.metrics["unsupported_mention"]) == (0, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "augment mention: adds nothing: no train record has an entity span (no extraction task in `tasks`, "
        "or no entity labelled)"
    ]


def test_structure_never_splits_at_an_abbreviation_or_a_decimal():
    text = "Mr. Smith of Kone S.A. said sales rose 5.5 %. Profit fell."
    assert [text[s:e] for s, e, _ in latin_sentences(text, [False] * len(text))] == [
        "Mr. Smith of Kone S.A. said sales rose 5.5 %.",
        "Profit fell.",
    ]
    edited = structure_edit(text, {"entities": []}, True, random.Random(0))
    assert edited.text == "Profit fell. Mr. Smith of Kone S.A. said sales rose 5.5 %."
    biohit = ENGLISH[0][0]
    assert structure_edit(biohit, {"entities": []}, True, random.Random(0)).reason == "single_sentence"


def test_metrics_hold_no_wall_clock_time_and_repeat_byte_for_byte(train_file, stage, tmp_path):
    """DVC tracks metrics.json: identical runs must write identical bytes (issue 15 item 11)."""
    for name in ("a", "b"):
        run_augment(train_file, tmp_path / f"{name}.jsonl", tmp_path / name, stage)
    first = (tmp_path / "a" / "metrics.json").read_bytes()
    assert first == (tmp_path / "b" / "metrics.json").read_bytes()
    assert not [k for k in json.loads(first) if "second" in k or "time" in k]
    timing = json.loads((tmp_path / "a" / "timing.json").read_text())
    assert set(timing) == {"augment_seconds"} and timing["augment_seconds"] >= 0
