"""docs/config-reference.md is generated from the comments of conf/ (densenet_se.config_docs), and every key
of conf/ has a comment to generate it from."""

from __future__ import annotations

import shutil

import pytest

from densenet_se.config_docs import PAGE, render, undocumented_keys
from helpers.config import CONF, ROOT


def test_the_reference_page_is_up_to_date():
    if render(CONF) != (ROOT / PAGE).read_text():
        pytest.fail(
            f"{PAGE} is out of date with conf/: run `python -m densenet_se.config_docs` and commit it"
        )


def test_every_key_of_conf_has_a_comment():
    assert undocumented_keys(CONF) == []


def test_a_key_without_a_comment_is_reported_and_a_changed_comment_changes_the_page(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    before = render(conf)
    adam = conf / "optim" / "adam.yaml"
    adam.write_text(adam.read_text() + "nesterov: true\n")
    assert undocumented_keys(conf) == ["conf/optim/adam.yaml: optim.nesterov"]
    adam.write_text(adam.read_text().replace("# Momentum for sgd.", "# Momentum for sgd (heavy ball)."))
    page = render(conf)
    assert page != before
    assert "| `optim.momentum` | `0.9` | Momentum for sgd (heavy ball). |" in page
    assert "| `optim.nesterov` | `true` |  |" in page


def test_side_by_side_values_follow_what_each_file_builds_on():
    page = render(CONF)
    # augment=light builds on none: its own values, none's for the rest, none's comment for the key.
    assert "| key | `none` | `custom` | `light` | `strong` | meaning |" in page
    assert "| `augment.rotation` | `0.0` | `0.0` | `15.0` | `0.0` | Random rotation" in page
    # trainer=ddp builds on gpu (a global-package file), which builds on default; keys trainer=gpu adds in
    # other groups are not set (–) by the files that do not build on it.
    assert "| `trainer.precision` | `32-true` | `32-true` | `32-true` | `bf16-mixed` | `bf16-mixed` |" in page
    assert "| `data.cache` | – | – | – | `device` | `device` |" in page
    # A file's own comment on an inherited key is kept beside the base's.
    assert "*ddp*: GPUs per node" in page
    # The defaults list is named, not listed as keys; hydra's own run dir is left out.
    assert "Defaults: `data=imagefolder`, `model=densenet121_se`," in page
    assert "`defaults" not in page and "`hydra.run" not in page
