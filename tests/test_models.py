import pickle

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from aevae import AevaeError
from aevae.config.schema import ModelEntry, Params
from aevae.data.params import DataParams
from aevae.models.ae import AutoEncoder
from aevae.models.checkpoints import load_model, save_model
from aevae.models.contract import Model, active_units
from aevae.models.conv import conv_decoder, conv_encoder
from aevae.models.registry import MODELS, build_model
from aevae.models.vae import VAE, kl_divergence, reconstruction_error
from aevae.train.state import read_history, start_or_resume, train_one_epoch, write_history

DEFAULT_SETTINGS = {"ae": {}, "ae_code": {"latent_dim": 8}, "vae": {"latent_dim": 8, "beta": 1.0}}


def small_params(image_size: int = 64, latent_dim: int = 8) -> Params:
    """One configuration of every registered kind, named after it."""
    models = {kind: ModelEntry(kind=kind, **{k: (latent_dim if k == "latent_dim" else v)
                                             for k, v in DEFAULT_SETTINGS.get(kind, {}).items()}) for kind in MODELS}
    return Params(data=DataParams(image_size=image_size), models=models)


def test_ae_is_the_studys_architecture():
    ae = AutoEncoder().eval()
    x = torch.rand(2, 3, 64, 64)
    assert ae.encoder(x).shape == (2, 256, 8, 8)  # the study's 256x8x8 bottleneck
    y = ae(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    convs = [m for m in ae.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 64, (4, 4), (2, 2), (1, 1)), (64, 128, (4, 4), (2, 2), (1, 1)), (128, 256, (4, 4), (2, 2), (1, 1))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in ae.encoder) == 2  # not after the first conv
    assert isinstance(ae.decoder[-1], torch.nn.Sigmoid)


def test_vae_reuses_the_ae_parts():
    vae = VAE(image_size=64, latent_dim=16)
    assert repr(vae.encoder) == repr(conv_encoder()) and repr(vae.decoder) == repr(conv_decoder())
    x = torch.rand(3, 3, 64, 64)
    x_hat, mu, logvar = vae(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (3, 16)
    vae.eval()
    assert torch.equal(vae.reconstruct(x), vae.reconstruct(x))  # posterior mean: deterministic


@pytest.mark.parametrize("size", [32, 64, 96])
def test_models_follow_the_image_size(size):
    x = torch.rand(2, 3, size, size)
    for kind in MODELS:
        assert build_model(kind, small_params(size)).eval().reconstruct(x).shape == x.shape


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_keeps_the_one_contract(kind, tmp_path):
    """What training, evaluation and the report rely on, for every kind alike."""
    torch.manual_seed(0)
    model = build_model(kind, small_params(32))
    x = torch.rand(4, 3, 32, 32)
    loss = model.train().loss(x, epoch=1)
    assert {"loss", "mse"} <= set(loss.terms) and loss.terms["loss"] is loss.value
    assert all(t.ndim == 0 and torch.isfinite(t) for t in loss.terms.values())
    loss.value.backward()  # the value to minimise is differentiable
    grouped = [p for group in model.param_groups(0.01) for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, model.parameters()))  # each parameter in one group
    assert all(group["lr"] <= 0.01 for group in model.param_groups(0.01))
    assert isinstance(model.loss_unit, str) and model.label and model.code_size()
    save_model(tmp_path / "m.pt", model, epoch=1)
    loaded, meta = load_model(tmp_path / "m.pt", image_size=32)
    assert type(loaded) is type(model) and loaded.config == model.config and meta["kind"] == kind
    model.eval()
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert loaded.reconstruct(x).shape == x.shape


def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    expected = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(dim=1)
    assert torch.allclose(kl_divergence(mu, logvar), expected, atol=1e-5)
    # Known Gaussian: mu = 1, sigma = 1 in each of 4 dims -> KL = 4 * 0.5 * mu^2 = 2 nats.
    assert kl_divergence(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(2.0)
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0  # the prior itself
    assert (kl_divergence(mu, logvar) >= 0).all()


def test_reconstruction_error_is_a_per_image_sum():
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    assert reconstruction_error(x_hat, x).tolist() == [12.0, 12.0]  # 48 pixels * 0.25


def test_active_units_counts_varying_dimensions():
    mu = torch.zeros(100, 4)
    mu[:, 0] = torch.linspace(-1, 1, 100)
    assert active_units(mu) == 1


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    vae = VAE(64, 8)
    save_model(tmp_path / "vae.pt", vae, epoch=3)
    loaded, meta = load_model(tmp_path / "vae.pt", image_size=64)
    assert meta["epoch"] == 3 and isinstance(loaded, VAE)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(AevaeError, match="trained on 64px"):
        load_model(tmp_path / "vae.pt", image_size=32)
    ae_state = AutoEncoder().state_dict()
    torch.save({"kind": "vae", "config": {"image_size": 64, "latent_dim": 8}, "state_dict": ae_state},
               tmp_path / "wrong.pt")
    with pytest.raises(AevaeError, match="does not match the vae architecture"):
        load_model(tmp_path / "wrong.pt")
    with pytest.raises(AevaeError, match="not found"):
        load_model(tmp_path / "missing.pt")


class _Exploit:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))  # unpickling this would create `target`


def test_a_subclass_with_a_kind_registers_itself_and_gets_settings_from_params():
    class WideVAE(VAE):
        kind = "wide_vae_test"

    try:
        assert MODELS["wide_vae_test"] is WideVAE and issubclass(WideVAE, Model)
        params = Params(models={"wide": ModelEntry(kind="wide_vae_test", latent_dim=4, beta=0.5)},
                        data=DataParams(image_size=32))
        model = build_model("wide", params)
        assert type(model) is WideVAE and model.config == {"image_size": 32, "latent_dim": 4, "beta": 0.5,
                                                           "kl_warmup_epochs": 0}
        assert model.label == "VAE beta=0.5" and model.generative
    finally:
        del MODELS["wide_vae_test"]


@pytest.mark.parametrize(("entry", "message"), [
    (ModelEntry(kind="vae", latent_dim=8, betta=1.0), "models.m.betta: unknown key for kind 'vae'"),
    (ModelEntry(kind="vae", latent_dim=0), "models.m.latent_dim: Input should be greater than or equal to 1"),
    (ModelEntry(kind="gan"), "models.m.kind: unknown model kind 'gan'"),
    (ModelEntry(kind="ae", latent_dim=8), "models.m.latent_dim: unknown key for kind 'ae'"),
])
def test_bad_model_settings_are_one_line_errors_naming_the_key(entry, message):
    with pytest.raises(AevaeError) as err:
        build_model("m", Params(models={"m": entry}))
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(AevaeError, match="no model configuration 'other'"):
        build_model("other", Params(models={"m": entry}))


def test_the_contract_answers_what_the_report_asks(tmp_path):
    models = {kind: build_model(kind, small_params(32)) for kind in MODELS}
    generative = {kind for kind, m in models.items() if m.generative}
    assert generative == {"vae", "sigma_vae"}
    x = torch.rand(2, 3, 32, 32)
    for model in models.values():
        model.eval()
        if model.generative:
            assert model.sample(3, torch.Generator().manual_seed(0)).shape == (3, 3, 32, 32)
            assert model.latent_mean(x).shape == (2, model.code_values())
            elbo = model.elbo({"recon": 10.0, "kl": 2.0, "loss": 12.0})
            assert set(elbo) == {"recon_nats", "kl_nats", "neg_elbo_nats"} and elbo["neg_elbo_nats"] == 12.0
            assert elbo[model.neg_elbo_term] == 12.0 and elbo[model.rate_term] == 2.0  # what the report asks
            assert "10.0 + KL 2.0 = 12.0 nats per image" in model.elbo_words(elbo)
            with torch.no_grad():  # the line between two images' codes ends at their reconstructions
                line, ends = model.interpolate(x, 5), model.reconstruct(x)
            assert line.shape == (5, 3, 32, 32)
            assert torch.allclose(line[0], ends[0], atol=1e-6) and torch.allclose(line[-1], ends[1], atol=1e-6)
        else:
            with pytest.raises(AevaeError, match="no prior"):
                model.sample(1)
            with pytest.raises(AevaeError, match="no latent space"):
                model.interpolate(x, 5)
            assert model.elbo({"loss": 1.0}) == {}
            assert model.neg_elbo_term is None and model.rate_term is None and model.elbo_words({}) == ""
    # The terms the report plots beside the loss are columns of the history one epoch of training writes.
    assert models["vae"].curve_terms == ("recon", "kl") and models["ae"].curve_terms == ()
    params, cpu = small_params(32), torch.device("cpu")
    stored = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)  # as prepare stores images
    for kind, model in models.items():
        state = start_or_resume(kind, 0, params, tmp_path / f"{kind}-none.pt", {}, cpu)
        write_history(tmp_path / f"{kind}.csv", [train_one_epoch(state, stored, stored, params, cpu)])
        columns = set(read_history(tmp_path / f"{kind}.csv")[0])
        assert {f"val_{t}" for t in model.curve_terms} <= columns, (kind, columns)


def test_checkpoints_are_loaded_without_running_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"kind": "ae", "payload": _Exploit(tmp_path / "pwned")}, f, protocol=2)
    with pytest.raises(AevaeError, match="not a loadable aevae checkpoint"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()
