from pathlib import Path

import pytest

from aevae import AevaeError
from aevae.config.load import load_params
from aevae.config.schema import Params, TrainingData
from aevae.data.params import DataParams, load_data_params
from aevae.evaluate.params import EvalParams, load_eval_params
from aevae.report.params import ReportParams, load_report_params
from aevae.tune.params import TuneParams, load_tune_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_load_and_match_the_documented_defaults():
    params = load_params(REPO / "params.yaml")
    # params.yaml and the typed defaults must not drift apart; eval: and report: are checked by their stages
    assert params.model_copy(update={"eval": {}, "report": {}, "tune": {}, "data": TrainingData()}) == Params()
    assert load_tune_params(REPO / "params.yaml") == TuneParams()
    assert load_data_params(REPO / "params.yaml") == DataParams()
    assert params.lr == 0.002 and params.data.image_size == 64
    assert load_eval_params(REPO / "params.yaml") == EvalParams()
    assert load_report_params(REPO / "params.yaml") == ReportParams()
    assert params.eval == EvalParams().model_dump() and params.report == ReportParams().model_dump()


def test_flat_names_match_dvc_keys():
    flat = Params().flat()
    assert flat["lr"] == 0.002
    assert flat["models.vae.beta"] == 1.0 and flat["models.ae.kind"] == "ae"
    assert flat["train.seeds"] == [0]
    assert "data.source" not in flat  # the schema training reads knows data.image_size only ...
    assert load_params(REPO / "params.yaml").flat()["data.groups"] == "file"  # ... and passes the rest on


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
        ({"vae": {"beta": 1.0}}, "unknown key 'vae': the VAE's settings moved under models:"),
        ({"train": {"seed": 1}}, "unknown key 'train.seed': train.seed became train.seeds"),
        ({"train": {"seeds": [0, 0]}}, "train.seeds lists a seed twice"),
        ({"train": {"seeds": []}}, "train.seeds"),
        ({"models": {"my vae": {"kind": "vae"}}}, "models.my vae: a configuration's name is a folder"),
        ({"models": {"ae": {"kind": "ae", "lr": -1.0}}}, "models.ae.lr: Input should be greater than 0 (got -1.0)"),
        ({"models": {"ae": {"kind": "ae", "batch_size": 1}}}, "models.ae.batch_size: Input should be greater"),
        ({"lr": 0}, "lr: Input should be greater than 0"),
        ({"lr": -1.0}, "lr: Input should be greater than 0"),
        ({"epochs": "ten"}, "epochs: Input should be a valid integer"),
        ({"epochs": True}, "epochs: Input should be a valid integer"),
        ({"data": {"image_size": 60}}, "must be a multiple of 8"),
    ],
)
def test_bad_params_are_rejected_with_the_key_named(write_params, overrides, message):
    with pytest.raises(AevaeError) as err:
        load_params(write_params(overrides))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert "{'" not in str(err.value)  # one line that names the key, not a dump of the whole section


@pytest.mark.parametrize(
    ("load", "overrides", "message"),
    [
        (load_eval_params, {"eval": {"bootstrap_sample": 500}}, "unknown key 'eval.bootstrap_sample' (a typo?)"),
        (load_eval_params, {"eval": {"fid": "sometimes"}}, "Input should be 'auto'"),
        (load_eval_params, {"eval": {"bootstrap_samples": 10}}, "eval.bootstrap_samples: Input should be greater"),
        (load_eval_params, {"eval": [1, 2]}, "eval must be a mapping of keys to values"),
        (load_report_params, {"report": {"grid_images": 0}}, "report.grid_images: Input should be greater"),
        (load_report_params, {"report": {"colour": "red"}}, "unknown key 'report.colour'"),
        (load_data_params, {"data": {"sorce": "web"}}, "unknown key 'data.sorce'"),
        (load_data_params, {"data": {"source": "web"}}, "data.source: Input should be 'builtin' or 'folder'"),
        (load_data_params, {"data": {"image_size": 60}}, "must be a multiple of 8"),
        (load_data_params, {"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "must be below 1"),
        (load_data_params, {"data": {"groups": "folders"}}, "data.groups must be file, folder or the path of a .csv"),
        (load_data_params, {"data": {"groups": "folder"}}, "data.groups: folder applies to data.source: folder"),
    ],
)
def test_the_eval_report_and_data_sections_are_checked_by_their_stages_with_the_key_named(write_params, load, overrides,
                                                                                  message):
    """Checked where they are read (aevae.evaluate.params, aevae.report.params, aevae.data.params), so that
    the schema every training imports holds no evaluation, report or data option but the image size:
    adding one retrains nothing."""
    path = write_params(overrides)
    with pytest.raises(AevaeError) as err:
        load(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: ")


def test_a_configuration_may_set_its_own_training_settings():
    """models.<name>.lr (and weight_decay, batch_size) replace the shared ones for that configuration only;
    they are training settings, not the kind's (the model is built from the rest)."""
    from aevae.models.registry import build_model
    from aevae.train.stage import training_params

    params = Params.model_validate({"models": {"ae": {"kind": "ae", "lr": 0.01, "batch_size": 32},
                                               "vae": {"kind": "vae", "latent_dim": 8}}})
    assert params.models["ae"].settings() == {} and params.models["ae"].training() == {"lr": 0.01, "batch_size": 32}
    ae, vae = params.for_config("ae"), params.for_config("vae")
    assert (ae.lr, ae.batch_size, ae.weight_decay) == (0.01, 32, params.weight_decay)
    assert (vae.lr, vae.batch_size) == (params.lr, params.batch_size)
    assert training_params("ae", 0, ae)["lr"] == 0.01 and "model.lr" not in training_params("ae", 0, ae)
    build_model("ae", ae)  # the kind's schema never sees lr
    tuned = params.for_config("vae", {"lr": 0.003, "latent_dim": 4})  # tuning's choice: a setting of each sort
    assert tuned.lr == 0.003 and tuned.models["vae"].settings()["latent_dim"] == 4


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(AevaeError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(AevaeError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(AevaeError, match="must be a mapping"):
        load_params(bad)
