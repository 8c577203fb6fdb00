"""The shipped params profiles (configs/profiles/) apply cleanly on params.yaml and say what they claim."""

from __future__ import annotations

import shutil

import pytest

from deepseek_sft.config import load_section
from deepseek_sft.train.profile import apply_profile

from conftest import REPO

PROFILES = sorted((REPO / "configs" / "profiles").glob("*.yaml"))


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_applies_to_params_yaml(profile, params):
    keys = apply_profile(profile, params)
    assert keys and load_section("train", params).seed == load_section("train", REPO / "params.yaml").seed


def test_smollm2_then_banking77_is_the_documented_real_data_setup(params):
    apply_profile(REPO / "configs/profiles/smollm2_135m.yaml", params)
    apply_profile(REPO / "configs/profiles/banking77.yaml", params)
    fetch = load_section("fetch", params)
    # the disabled tasks are gone for every stage; the one left reads the dataset's labels
    assert list(fetch.tasks) == ["intent"] and fetch.tasks["intent"].labels is None
    assert fetch.tasks["intent"].system_prompt == "You label banking queries."
    # a mapping set where params.yaml holds `path: null` becomes that mapping (the dataset's own split)
    assert fetch.section.local.path == {
        "train": "data/external/banking77/train.csv",
        "test": "data/external/banking77/test.csv",
    }
    assert fetch.section.local.label_columns == {"intent": "category"}
    base = load_section("base_model", params).section
    assert base.name_or_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert load_section("train", params).section.learning_rate == pytest.approx(2.0e-4)
    assert load_section("train", params).section.deepspeed is None


def test_a_profile_replaces_a_block_list_as_dvc_writes_it(params, tmp_path):
    # DVC's writer puts list items at their key's indent (`methods:` then `- synonym`); a profile must replace
    # the whole list, never leave it silently as it was
    profile = tmp_path / "lists.yaml"
    profile.write_text("augment:\n  methods: [structure]\ntasks:\n  intent:\n    labels: null\n")
    apply_profile(profile, params)
    assert load_section("augment", params).section.methods == ["structure"]
    assert load_section("augment", params).tasks["intent"].labels is None
