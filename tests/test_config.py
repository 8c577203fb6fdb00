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


# -- the whole file is checked by every stage -------------------------------------------------------------------
def _line_of(path, needle: str) -> int:
    return next(
        i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line
    )


def test_a_train_typo_stops_the_first_data_stage_naming_line_and_key(params_copy):
    text = params_copy.read_text(encoding="utf-8")
    params_copy.write_text(text.replace("\n  learning_rate: ", "\n  learning_rat: ", 1), encoding="utf-8")
    line = _line_of(params_copy, "learning_rat:")
    assert line > 100  # the train section, far from fetch
    with pytest.raises(ParamsError) as err:
        load_section("fetch")
    assert f"line {line}: train.learning_rat: unknown key" in str(err.value)


def test_every_problem_is_listed_at_once(params_copy):
    edit_params(params_copy, {"seed": "42", "clean.min_char": 3, "train.num_train_epochs": 2.5, "trian": {}})
    with pytest.raises(ParamsError) as err:
        load_all()
    lines = str(err.value).splitlines()
    assert lines[0] == f"{params_copy}: invalid parameters:"
    assert len(lines) == 4
    assert any("unknown top-level key 'trian'" in x for x in lines)
    assert any("seed: Input should be a valid integer (got '42')" in x for x in lines)
    assert any("clean.min_char: unknown key" in x for x in lines)


def test_a_valid_file_is_checked_once_per_content(params_copy, monkeypatch):
    import deepseek_sft.config as config

    calls = []
    real = config._file_errors
    monkeypatch.setattr(config, "_file_errors", lambda raw, text: calls.append(1) or real(raw, text))
    config._check_text.cache_clear()
    for name in ("train", "base_model", "evaluate"):
        load_section(name)
    assert len(calls) == 1
    edit_params(params_copy, {"train.max_steps": 3})
    assert load_section("train").section.max_steps == 3
    assert len(calls) == 2


# -- hints fit the value ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "hint", "not_hint"),
    [
        ("seed", "42", "a quoted number is a string: remove the quotes", "exponent"),
        ("label_qa.kappa_threshold", "8e-1", "write e.g. 2.0e-5 or 1.0e+3", "quotes"),
        ("train.learning_rate", "1.0e3", "a dot and a signed exponent", "quotes"),
        ("train.max_steps", 3.0, "write a whole number without a decimal point: 3", "exponent"),
        ("train.bf16", "false", "write true or false without quotes", "exponent"),
        ("base_model.name_or_path", False, "quote it to keep it as text", "exponent"),
    ],
)
def test_hint_fits_the_value(params_copy, key, value, hint, not_hint):
    edit_params(params_copy, {key: value})
    with pytest.raises(ParamsError) as err:
        load_all()
    message = str(err.value)
    assert f"{key}: " in message and hint in message
    assert not_hint not in message


def test_no_hint_for_plain_wrong_values(params_copy):
    edit_params(params_copy, {"train.max_steps": "many"})
    with pytest.raises(ParamsError) as err:
        load_all()
    assert str(err.value).endswith("train.max_steps: Input should be a valid integer (got 'many')")


# -- make check-params / python -m deepseek_sft.config ----------------------------------------------------------
def test_check_params_prints_the_message_alone_and_exits_2(params_copy, repo_root):
    import subprocess
    import sys

    text = params_copy.read_text(encoding="utf-8")
    params_copy.write_text(text.replace("\nseed: 42\n", '\nseed: "42"\n'), encoding="utf-8")
    line = _line_of(params_copy, 'seed: "42"')
    bad = subprocess.run(
        [sys.executable, "-m", "deepseek_sft.config", str(params_copy)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        f"{params_copy}: invalid parameters:",
        f"  line {line}: seed: Input should be a valid integer (got '42'); "
        "a quoted number is a string: remove the quotes",
    ]
    good = subprocess.run(
        [sys.executable, "-m", "deepseek_sft.config", str(repo_root / "params.yaml")],
        capture_output=True,
        text=True,
    )
    assert (good.returncode, good.stdout.strip()) == (0, f"{repo_root / 'params.yaml'}: ok")


def test_a_script_that_does_not_catch_params_error_prints_the_message_alone(params_copy):
    """scripts/train.py, evaluate.py, compress.py ... let ParamsError propagate: no traceback either."""
    import subprocess
    import sys

    edit_params(params_copy, {"train.learning_rat": 1.0e-3})
    run = subprocess.run(
        [sys.executable, "-c", "from deepseek_sft.config import load_section; load_section('train')"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: {params_copy}: invalid parameters:\n")
    assert "train.learning_rat: unknown key" in run.stderr and "Traceback" not in run.stderr
    other = subprocess.run(
        [sys.executable, "-c", "import deepseek_sft.config; 1 / 0"], capture_output=True, text=True
    )
    assert "Traceback" in other.stderr and "ZeroDivisionError" in other.stderr  # every other error as before
