"""benchmarks/quality_sweep.py's variants measure what their names say on top of the shipped real-model configs:
a lever a config ships (vocabulary rows, loss tokens dense) must not leak into a variant that does not name it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from satlm.app.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def _sweep():
    spec = importlib.util.spec_from_file_location("quality_sweep", ROOT / "benchmarks" / "quality_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SWEEP = _sweep()


@pytest.mark.parametrize("config", ["real-cpt.yaml", "real-sft.yaml"])
@pytest.mark.parametrize("name", sorted(SWEEP.VARIANTS))
def test_each_variant_sets_the_levers_its_name_says_and_no_other(config, name):
    overrides, _ = SWEEP.VARIANTS[name]
    sat = load_run_config(ROOT / "configs" / config, overrides).sat
    assert sat.attn_omission_rate == 0  # every variant omits MLP channels only
    assert sat.vocab_omission_rate == (0.9 if re.search(r"v90", name) else 0.0)
    assert sat.vocab_omission_input_grad == name.endswith("v90i")
    assert sat.loss_tokens_dense == ("ltd" in name)
    assert (sat.layer_rates == "auto") == ("auto" in name)
    assert (sat.layer_drop_rate > 0) == name.startswith(("drop", "drop25"))
    assert (sat.omitted_update == "skip") == ("skip" in name)
    assert (sat.selection == "unbiased") == ("unb" in name)
    assert (sat.forward == "sparse") == name.startswith("thin")
    assert sat.dense_start == (0.05 if name == "l4-lr" else 0.0)
    m = re.match(r"(?:thin-)?c(\d+)", name)
    if m:  # cNN: the channel rate, 0.NN (c62 = 0.625, c58 = 0.577)
        assert abs(sat.omission_rate - int(m.group(1)) / 100) < 0.01
