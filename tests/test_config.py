"""The params schema: typos, wrong types and out-of-range values fail before any work, naming the key."""

from __future__ import annotations

import pytest

from deepseek_sft.config import ParamsError, load_all, load_section

from conftest import edit_params


def test_repo_params_are_valid(repo_root):
    loaded = load_all(repo_root / "params.yaml")
    assert loaded["seed"] == 42
    assert loaded["label_qa"].kappa_threshold == 0.8


def test_section_loads_only_its_own_keys(params_copy):
    stage = load_section("clean")
    assert stage.seed == 42
    assert set(stage.tasks) == {"intent", "compliance", "entities"}
    assert len(stage.tasks["intent"].labels) == 20
    assert stage.section.min_chars == 4


def test_typo_names_the_key(params_copy):
    edit_params(params_copy, {"clean.min_char": 3})
    with pytest.raises(ParamsError, match=r"clean\.min_char: unknown key"):
        load_section("clean")


def test_string_float_is_refused_with_yaml_hint(params_copy):
    text = params_copy.read_text(encoding="utf-8").replace("kappa_threshold: 0.8", "kappa_threshold: 8e-1")
    params_copy.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        load_section("label_qa")
    assert "label_qa.kappa_threshold" in str(err.value)
    assert "2.0e-5" in str(err.value)


def test_out_of_range_names_allowed_range(params_copy):
    edit_params(params_copy, {"label_qa.val_fraction": 0.1})
    with pytest.raises(
        ParamsError, match=r"label_qa\.val_fraction: Input should be greater than or equal to 0\.15"
    ):
        load_section("label_qa")


def test_unknown_top_level_section(params_copy):
    edit_params(params_copy, {"trian.learning_rate": 1.0e-4})
    with pytest.raises(ParamsError, match=r"unknown top-level key.*trian"):
        load_section("fetch")


def test_bad_choice_lists_allowed_values(params_copy):
    edit_params(params_copy, {"fetch.source": "s3"})
    with pytest.raises(ParamsError, match=r"fetch\.source: Input should be 'synthetic', 'local'"):
        load_section("fetch")


def test_local_source_requires_a_path(params_copy):
    edit_params(params_copy, {"fetch.source": "local"})
    with pytest.raises(ParamsError, match=r"fetch\.local\.path"):
        load_section("fetch")


def test_bad_task_type(params_copy):
    edit_params(params_copy, {"tasks.intent.type": "ranking"})
    with pytest.raises(ParamsError, match=r"tasks\.intent\.type"):
        load_section("clean")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_section("fetch", tmp_path / "nope.yaml")
