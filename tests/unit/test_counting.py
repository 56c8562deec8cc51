"""`mm1-moe info` counts the decoder from the real module tree (built on the meta device) and
from its formula; they must agree for every shipped config, MoE ones included."""

import os

import pytest

from mm1_moe.config import load_config
from mm1_moe.info import param_counts
from mm1_moe.models.counting import decoder_param_counts_from_modules


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "mm1-3b-moe", "mm1-7b-moe", "mm1-30b"])
def test_module_tree_equals_formula(configs_dir, name):
    config = load_config(os.path.join(configs_dir, f"{name}.yaml"))
    tree = decoder_param_counts_from_modules(config)
    formula = param_counts(config)
    assert tree["experts"] == formula.experts
    assert tree["routers"] == formula.routers
    assert tree["dense"] == formula.decoder_dense


def test_info_cli_reports_agreement(configs_dir, capsys):
    from mm1_moe.cli import main

    assert main(["info", "--config", os.path.join(configs_dir, "tiny-moe.yaml")]) == 0
    assert "equals the formula" in capsys.readouterr().out
