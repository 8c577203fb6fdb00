"""params.yaml is kept in the layout `dvc exp run -S` writes back (DVC's own writer decides, not a copy of its
rules), so the diff after an experiment shows only the values the user set; putting a file in that layout
never changes a value."""

from __future__ import annotations

import difflib
import subprocess
import sys

import pytest
import yaml
from ruamel.yaml import YAML

from deepseek_sft.config import load_all
from deepseek_sft.config.layout import dvc_rewrite, layout_drift, to_dvc_layout

from conftest import REPO

# the shapes DVC rewrites: flow lists (one wrapped over lines), null, a flow mapping with a comment, a string
# longer than 80 columns, an exponent float, an empty list and mapping, comments everywhere
HAND_WRITTEN = """\
# header comment
seed: 42
tasks:
  intent:
    labels: [card_loss, card_activation, balance_inquiry, transfer, transfer_failed, loan_application,
             loan_repayment, credit_limit_increase]
train:
  learning_rate: 2.0e-5            # a comment
  deepspeed: null                  # null = one process
  recovery: {max_steps: 50, learning_rate: 1.0e-3, batch_size: 16, max_length: 256}  # masks held; 0 = none
  agents:
    - Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36
  empty_list: []
  empty_map: {}
"""


def changed_lines(before: str, after: str) -> list[str]:
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def test_dvc_rewrites_a_hand_written_file_wholesale():
    # the problem this guards against: one -S value, a dozen lines of noise
    after = dvc_rewrite(HAND_WRITTEN, ["seed=1"])
    assert len(changed_lines(HAND_WRITTEN, after)) > 10


def test_to_dvc_layout_keeps_every_value_and_is_stable():
    out = to_dvc_layout(HAND_WRITTEN)
    assert yaml.safe_load(out) == yaml.safe_load(HAND_WRITTEN)  # what the stages read (PyYAML, YAML 1.1)
    assert YAML(typ="safe").load(out) == YAML(typ="safe").load(HAND_WRITTEN)  # what DVC reads
    assert dvc_rewrite(out) == out  # DVC writes it back byte for byte
    lines = out.splitlines()
    assert "    - card_loss" in lines and "  deepspeed:                       # null = one process" in lines
    # the comment of the opened flow mapping comes back to its section's column
    assert "  recovery:                        # masks held; 0 = none" in lines
    assert "  empty_list: []" in lines and "  empty_map: {}" in lines
    assert lines[0] == "# header comment"


def test_repo_params_are_in_dvcs_layout():
    drift = layout_drift((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert drift == [], "run: python -m deepseek_sft.config.layout --write params.yaml\n" + "\n".join(
        drift[:40]
    )


def test_an_experiment_changes_only_the_lines_of_the_values_it_sets(tmp_path):
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    after = dvc_rewrite(text, ["train.learning_rate=1.0e-4", "seed=7", "augment.methods=[synonym,mention]"])
    changed = changed_lines(text, after)
    assert "-seed: 42" in changed and "+seed: 7" in changed
    assert "-  - structure" in changed  # a block list loses just the item that went
    assert [x for x in changed if "learning_rate" in x][1].startswith("+  learning_rate: 0.0001 ")
    assert len(changed) == 5
    path = tmp_path / "params.yaml"
    path.write_text(after, encoding="utf-8")
    params = load_all(path)
    assert params["seed"] == 7 and params["train"].learning_rate == 1.0e-4


def test_repo_params_read_the_same_through_dvcs_writer():
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(to_dvc_layout(text)) == yaml.safe_load(text)


@pytest.mark.parametrize(("text", "code"), [(HAND_WRITTEN, 1), (to_dvc_layout(HAND_WRITTEN), 0)])
def test_check_command(tmp_path, text, code):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "deepseek_sft.config.layout", "--check", str(path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == code, run.stderr
    if code:
        assert "+    - card_loss" in run.stdout and "would rewrite" in run.stderr
