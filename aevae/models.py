"""The study's convolutional AutoEncoder and the VAE built from the same parts, behind one contract.

Every model here answers the same questions, so that training, evaluation, the report and the benchmark
never ask which kind they hold:
- `loss(x, epoch=...)`: a `Loss` with the value to minimise and the named terms to log (units in the
  class's `loss_unit`, stated once);
- `reconstruct(x)`: a deterministic reconstruction in [0, 1];
- `param_groups(lr)`: its parameters grouped for the optimizer, with their learning rates;
- `config`: what rebuilds it, saved in every checkpoint; `from_params(params)` builds it from params.yaml.
Adding a model means a class here, its entry in MODELS, its params, and its stage in dvc.yaml.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aevae import AevaeError
from aevae.files import atomic_path
from aevae.params import Params

CHANNELS = 256  # channels of the conv trunk's output; the spatial size is image_size / 8
DENSE_FAN_IN = 1024  # the conv trunk's typical fan-in: the width Adam's lr is tuned for (see param_groups)


def conv_encoder() -> nn.Sequential:
    """The study's encoder: 3x64x64 -> 256x8x8 (k4 s2 p1 convs, BatchNorm after all but the first)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=4, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.Conv2d(128, CHANNELS, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(CHANNELS),
        nn.ReLU(inplace=True),
    )


def conv_decoder() -> nn.Sequential:
    """The study's decoder, the encoder mirrored: 256x8x8 -> 3x64x64 in [0, 1]."""
    return nn.Sequential(
        nn.ConvTranspose2d(CHANNELS, 128, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(64, 3, kernel_size=4, stride=2, padding=1),
        nn.Sigmoid(),
    )


@dataclass
class Loss:
    """One batch's loss: `value` is minimised; `terms` are batch means logged as train_<name> / val_<name>
    (always `loss` and `mse`, the per-pixel MSE that compares models); `codes` are per-image latent means,
    for counting active latent dimensions."""

    value: Tensor
    terms: dict[str, Tensor]
    codes: Tensor | None = None


class AutoEncoder(nn.Module):
    """The study's AE: a deterministic bottleneck of 256 x (image_size/8)^2 values."""

    kind: ClassVar[str] = "ae"
    loss_unit: ClassVar[str] = "per-pixel MSE"
    reads_params: ClassVar[tuple[str, ...]] = ()  # params.yaml sections/keys beyond the shared training ones
    generative: ClassVar[bool] = False  # no prior to sample codes from

    def __init__(self, image_size: int = 64) -> None:
        super().__init__()
        self.config = {"image_size": image_size}
        self.encoder = conv_encoder()
        self.decoder = conv_decoder()

    @classmethod
    def from_params(cls, params: Params) -> AutoEncoder:
        return cls(params.data.image_size)

    @property
    def label(self) -> str:
        return "AE"

    def code_values(self) -> int:
        """How many numbers the code between encoder and decoder holds."""
        return CHANNELS * (self.config["image_size"] // 8) ** 2

    def code_size(self) -> str:
        side = self.config["image_size"] // 8
        return f"{CHANNELS} x {side} x {side} = {self.code_values():,} values (deterministic)"

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x)

    def loss(self, x: Tensor, *, epoch: int | None = None) -> Loss:
        """The study's loss: per-pixel MSE."""
        mse = F.mse_loss(self(x).float(), x)
        return Loss(mse, {"loss": mse, "mse": mse})

    def schedule(self, epoch: int) -> dict[str, float]:
        """Per-epoch values of the loss's schedule, logged beside the losses."""
        return {}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.parameters()), "lr": lr}]


class _DenseCode:
    """What the VAE and the AE at the VAE's code size share: a dense code of `latent_dim` values between
    the study's conv trunk and its decoder, and the learning rate of their wide dense layers."""

    def code_values(self) -> int:
        return self.latent_dim

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.from_latent(z).unflatten(1, self.feature_shape))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam at `lr`, except dense layers wider than the conv trunk, which get lr * 1024 / fan_in.

        The layers into the code are dense over the whole 256x8x8 feature map (fan-in 16384) with no
        normalisation after them. Adam moves every weight by about lr per step, all in the same direction
        early on, so at lr 0.002 the VAE's log-variance jumps by ~15 within a few steps, KL reaches
        1e4-1e12 nats and Adam's second moments never recover (measured). Scaling a dense layer's Adam lr
        by 1/fan_in is the muP rule (Yang et al. 2022); 1024 is the trunk's typical fan-in, so at 64px
        these layers learn at lr/16. The AE at the VAE's code size gets the same rule: the same path.
        """
        wide = {}
        for layer in self.modules():
            if isinstance(layer, nn.Linear) and layer.in_features > DENSE_FAN_IN:
                wide.setdefault(layer.in_features, []).extend(layer.parameters())
        wide_ids = {id(p) for params in wide.values() for p in params}
        rest = [p for p in self.parameters() if id(p) not in wide_ids]
        return [{"params": rest, "lr": lr},
                *({"params": params, "lr": lr * DENSE_FAN_IN / fan_in} for fan_in, params in wide.items())]


class VAE(_DenseCode, nn.Module):
    """The AE's encoder and decoder around a Gaussian latent of `latent_dim` (Kingma & Welling 2014).

    Loss per image, in nats (PITFALLS.md #1): reconstruction is the sum of squared errors over all pixels
    (a Gaussian decoder with fixed variance 1/2, up to a constant) and KL is summed over latent
    dimensions, both averaged over the batch; so beta 1 is the true negative ELBO.
    """

    kind: ClassVar[str] = "vae"
    loss_unit: ClassVar[str] = "nats per image"
    reads_params: ClassVar[tuple[str, ...]] = ("vae",)
    generative: ClassVar[bool] = True

    def __init__(self, image_size: int = 64, latent_dim: int = 128, beta: float = 1.0,
                 kl_warmup_epochs: int = 0) -> None:
        super().__init__()
        self.config = {"image_size": image_size, "latent_dim": latent_dim, "beta": beta,
                       "kl_warmup_epochs": kl_warmup_epochs}
        self.feature_shape = (CHANNELS, image_size // 8, image_size // 8)
        features = CHANNELS * (image_size // 8) ** 2
        self.encoder = conv_encoder()
        self.to_mu = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        self.decoder = conv_decoder()
        self.latent_dim = latent_dim

    @classmethod
    def from_params(cls, params: Params) -> VAE:
        return cls(params.data.image_size, params.vae.latent_dim, params.vae.beta, params.vae.kl_warmup_epochs)

    @property
    def label(self) -> str:
        return "VAE"

    def code_size(self) -> str:
        side = self.config["image_size"] // 8
        return (f"{self.latent_dim} Gaussian latents (mu and log-variance from the {CHANNELS} x {side} x {side} "
                "features)")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x).flatten(1)
        return self.to_mu(h), self.to_logvar(h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar)), mu, logvar

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: deterministic, the usual choice for reconstruction metrics."""
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I)."""
        z = torch.randn(n, self.latent_dim, generator=generator)  # drawn on the CPU: same z on any device
        return self.decode(z.to(self.to_mu.weight.device))

    def kl_weight(self, epoch: int | None) -> float:
        """beta, ramped up linearly over the first kl_warmup_epochs epochs (Bowman et al. 2016);
        the final beta when no epoch is given (validation, so val_loss is comparable across epochs)."""
        beta, warmup = self.config["beta"], self.config["kl_warmup_epochs"]
        return beta * min(1.0, epoch / warmup) if warmup and epoch is not None else beta

    def loss(self, x: Tensor, *, epoch: int | None = None) -> Loss:
        x_hat, mu, logvar = self(x)
        mu, logvar = mu.float(), logvar.float()  # KL sums many terms: keep it in fp32 under autocast
        recon = reconstruction_error(x_hat.float(), x).mean()
        kl = kl_divergence(mu, logvar).mean()
        loss = recon + self.kl_weight(epoch) * kl
        return Loss(loss, {"loss": loss, "recon": recon, "kl": kl, "mse": recon / x[0].numel()}, codes=mu)

    def schedule(self, epoch: int) -> dict[str, float]:
        return {"kl_weight": self.kl_weight(epoch)}


class CodeSizeAE(_DenseCode, nn.Module):
    """The study's AE squeezed to the VAE's code size: the same encoder, a linear layer to `latent_dim`
    deterministic values, and the VAE's path back to the decoder, trained on the study's per-pixel MSE.

    The study's AE keeps 16,384 numbers for a 12,288-value image; this one keeps as many as the VAE has
    latents, so the gap between it and the VAE is what the VAE's noise and KL cost, not code size.
    """

    kind: ClassVar[str] = "ae_code"
    loss_unit: ClassVar[str] = "per-pixel MSE"
    reads_params: ClassVar[tuple[str, ...]] = ("vae.latent_dim",)
    generative: ClassVar[bool] = False

    def __init__(self, image_size: int = 64, latent_dim: int = 128) -> None:
        super().__init__()
        self.config = {"image_size": image_size, "latent_dim": latent_dim}
        self.feature_shape = (CHANNELS, image_size // 8, image_size // 8)
        features = CHANNELS * (image_size // 8) ** 2
        self.encoder = conv_encoder()
        self.to_code = nn.Linear(features, latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        self.decoder = conv_decoder()
        self.latent_dim = latent_dim

    @classmethod
    def from_params(cls, params: Params) -> CodeSizeAE:
        return cls(params.data.image_size, params.vae.latent_dim)

    @property
    def label(self) -> str:
        return f"AE-{self.latent_dim}"

    def code_size(self) -> str:
        side = self.config["image_size"] // 8
        return f"{self.latent_dim} values (deterministic, a linear map of the {CHANNELS} x {side} x {side} features)"

    def encode(self, x: Tensor) -> Tensor:
        return self.to_code(self.encoder(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # The study's AE loss and everything around it, shared with the AE: only the code differs.
    reconstruct = AutoEncoder.reconstruct
    loss = AutoEncoder.loss
    schedule = AutoEncoder.schedule


Model = AutoEncoder | CodeSizeAE | VAE
MODELS: dict[str, type[Model]] = {cls.kind: cls for cls in (AutoEncoder, CodeSizeAE, VAE)}
MODEL_KINDS = tuple(MODELS)


def build_model(kind: str, params: Params) -> Model:
    """The model of `kind`, configured from params.yaml."""
    if kind not in MODELS:
        raise AevaeError(f"unknown model kind {kind!r}; expected one of {', '.join(MODELS)}")
    return MODELS[kind].from_params(params)


MODEL_PARAM_SECTIONS = ("vae",)  # params.yaml sections that only the models listing them read


def training_params(kind: str, params: Params) -> dict[str, object]:
    """The params a model's training stage reads (its dvc.yaml entry lists the same), as logged to MLflow:
    everything but evaluation, report and tracking settings, and of the model sections only what the model
    reads."""
    reads = MODELS[kind].reads_params

    def is_read(key: str) -> bool:
        section = key.split(".")[0]
        if section in ("eval", "report", "tracking"):
            return False
        return section not in MODEL_PARAM_SECTIONS or any(key == r or key.startswith(f"{r}.") for r in reads)

    return {key: value for key, value in params.flat().items() if is_read(key)}


def pick_device(name: str) -> torch.device:
    """train.device: auto is CUDA when present, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise AevaeError("train.device is cuda but no CUDA device is visible; use train.device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return set(next((line for line in lines if line.startswith("flags")), "").partition(":")[2].split())


BF16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # native bf16 matrix/vector units


def cpu_isa() -> str:
    """What the CPU offers torch's kernels: torch's vector capability plus native bf16 units, e.g.
    "AVX512 + AMX-BF16 + AVX512-BF16" or "AVX2"."""
    flags = cpu_flags()
    return " + ".join([torch.backends.cpu.get_cpu_capability(), *(n for f, n in BF16_CPU_FLAGS.items() if f in flags)])


def pick_precision(name: str, device: torch.device) -> str:
    """train.precision: auto is bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU
    with AMX or AVX512-BF16) and fp32 elsewhere: on an AVX2-only CPU bf16 autocast ran 25x slower."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_flags() & set(BF16_CPU_FLAGS) else "fp32"


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, summed over latent dimensions, in nats."""
    # Closed form from Kingma & Welling (2014), appendix B.
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Sum of squared errors per image: the Gaussian decoder's NLL (variance 1/2) up to a constant."""
    return (x_hat - x).pow(2).flatten(1).sum(dim=1)


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across images (Burda et al. 2016, sec. 5.2)."""
    return int((mu.var(dim=0) > threshold).sum())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(path: Path, model: Model, **extra: Any) -> None:
    """Weights plus the model's own config, so that `load_model` rebuilds any kind alike; atomic."""
    checkpoint = {"kind": model.kind, "config": model.config, "state_dict": model.state_dict(), **extra}
    # Serialised in memory first: torch's zip writer reports a failed write (disk full) as an opaque
    # RuntimeError, a plain file write reports it as the OSError it is.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_model(path: Path, image_size: int | None = None) -> tuple[Model, dict[str, Any]]:
    """Rebuild a model from `save_model`'s file. weights_only: a checkpoint is untrusted input."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AevaeError(f"checkpoint {path} not found: run the training stages first (dvc repro)") from None
    except Exception as err:  # torch raises many types for a corrupt or malicious file
        raise AevaeError(f"{path} is not a loadable aevae checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}); re-train with dvc repro --force") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") not in MODELS or "config" not in checkpoint:
        raise AevaeError(f"{path} is not an aevae checkpoint (no model kind and config in it); re-train with dvc repro")
    config = checkpoint["config"]
    if image_size is not None and config.get("image_size") != image_size:
        raise AevaeError(f"{path} was trained on {config.get('image_size')}px images but data.image_size is "
                         f"{image_size}; re-train with dvc repro")
    return model_from_weights(checkpoint["kind"], config, checkpoint["state_dict"], str(path)), checkpoint


def model_from_weights(kind: str, config: dict[str, Any], weights: dict[str, Tensor], source: str) -> Model:
    """The model `kind` built from its `config`, with `weights`, in eval mode; `source` names where they
    came from in the error."""
    try:
        model = MODELS[kind](**config)
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, TypeError) as err:
        raise AevaeError(f"{source} does not match the {kind} architecture "
                         f"({str(err).splitlines()[0]}); re-train with dvc repro --force") from None
    return model.eval()


class Reconstructor(nn.Module):
    """A model as MLflow serves it: images (N, 3, H, W) in [0, 1] -> its deterministic reconstructions."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.model.reconstruct(x)
