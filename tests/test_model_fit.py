"""A config checked against the model it runs on, before anything is wrapped or trained: seq_len within the
model's context, and SAT layers that exist in it (SATConfig.layers in apply_sat, sat.layers in a run config, and
`satlm train` failing before its first step)."""

from __future__ import annotations

import pytest
from tiny_run import run_overrides, tiny_data, tiny_model_dir  # noqa: F401 (fixtures)

from satlm.app.model_io import check_run_fits_model
from satlm.app.run_config import load_run_config
from satlm.config import SATConfig, SATConfigError
from satlm.errors import RunConfigError


# -- seq_len and the model's context -----------------------------------------------------------------------
def test_seq_len_beyond_the_model_context_names_both(tiny_model_dir):
    check_run_fits_model(load_run_config(None, ["seq_len=128"]), str(tiny_model_dir))  # the tiny model's context
    with pytest.raises(RunConfigError) as e:
        check_run_fits_model(load_run_config(None, ["seq_len=129"]), str(tiny_model_dir))
    assert "seq_len=129 exceeds the model's context of 128 tokens (max_position_embeddings" in str(e.value)
    assert "set seq_len <= 128" in str(e.value)


# -- layers the model lacks --------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, fragment", [
    ([99], "layer 99 does not exist (the model has 2 decoder layers: 0..1, or -2..-1 from the end)"),
    ([0, -3], "layer -3 does not exist (the model has 2 decoder layers"),
    ([1, -1], "1 and -1 are the same layer"),
])
def test_layers_the_model_lacks_name_its_layer_count(make_model, layers, fragment):
    from satlm import apply_sat

    model = make_model()
    with pytest.raises(SATConfigError) as e:
        apply_sat(model, SATConfig(layers=layers))
    assert f"SATConfig.layers={layers!r}" in str(e.value) and fragment in str(e.value)
    assert getattr(model, "sat_runtime", None) is None  # nothing was wrapped


def test_run_config_layers_checked_against_the_model_config(tiny_model_dir):
    check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[0, -1]"]), str(tiny_model_dir))
    with pytest.raises(SATConfigError, match=r"sat.layers=\[0, 7\]: layer 7 does not exist \(the model has 2 "
                                             r"decoder layers: 0..1, or -2..-1 from the end"):
        check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[0, 7]"]), str(tiny_model_dir))
    with pytest.raises(SATConfigError, match=r"sat.layers=\[0, -2\] names a layer twice"):
        check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[0, -2]"]), str(tiny_model_dir))
    check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[7]", "sat.enabled=false"]),
                         str(tiny_model_dir))  # a dense run uses no layers


@pytest.mark.integration
def test_train_with_a_layer_that_does_not_exist_fails_before_training(tmp_path, tiny_model_dir, tiny_data):
    from satlm.app.train import run_train

    out = tmp_path / "run"
    cfg = load_run_config(None, run_overrides(tiny_model_dir, tiny_data, out, **{"sat.layers": "[99]"}))
    with pytest.raises(SATConfigError, match="layer 99 does not exist"):
        run_train(cfg, quiet=True)
    assert not (out / "metrics.jsonl").exists()
