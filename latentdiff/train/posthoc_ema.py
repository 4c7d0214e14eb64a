"""Post-hoc EMA, Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).

During training, two power-function EMAs of the weights are kept, and snapshots of them are saved every
K steps. A power-function EMA with exponent gamma averages the weights theta_tau of steps tau <= t with
the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),     0 <= tau <= t,

realised step by step as  ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma + 1).
Its length is measured by sigma_rel, the profile's standard deviation relative to t:

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

Any snapshot is a linear function of the training trajectory; so is the EMA we would like to have had
(a target profile). Afterwards the snapshot weights are combined with the coefficients x that best
match the target profile in L2 over tau: minimize || sum_i x_i p_i - p_target ||^2, i.e. solve
G x = b with G_ij = <p_i, p_j> and b_i = <p_i, p_target>, where for two power profiles

    <p_a, p_b> = (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from latentdiff.io import write_safetensors

SNAPSHOT_DIR = "posthoc_ema"
_NAME = re.compile(r"^ema_(\d+\.\d+)_(\d{7})\.safetensors$")


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of a power profile with exponent ``gamma``."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has relative standard deviation ``sigma_rel`` (the cubic's positive root)."""
    if not 0 < sigma_rel < gamma_to_sigma_rel(0.0):
        raise ValueError(f"sigma_rel must lie in (0, {gamma_to_sigma_rel(0.0):.4f}) (gamma > 0), got {sigma_rel}")
    # sigma^2 (gamma + 2)^2 (gamma + 3) = gamma + 1  <=>  gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, s = 1/sigma^2
    s = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0))


def profile_inner(t_a, g_a, t_b, g_b) -> np.ndarray:
    """<p_a, p_b> = integral over tau of the two power profiles' product (broadcasting numpy arrays)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    lo = np.minimum(t_a, t_b)
    # Written with ratios to stay finite for long runs and large exponents.
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (lo / t_a) ** (g_a + 1) * (lo / t_b) ** (g_b + 1) / lo


def solve_coefficients(ts, gammas, t_target: float, gamma_target: float) -> np.ndarray:
    """Least-squares weights x (one per snapshot) with sum_i x_i p_i closest to the target profile."""
    ts, gammas = np.asarray(ts, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_inner(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])  # (n, n)
    rhs = profile_inner(ts, gammas, t_target, gamma_target)  # (n,)
    x, *_ = np.linalg.lstsq(gram, rhs, rcond=None)  # the Gram matrix can be near singular
    return x


class PowerEMA:
    """A power-function EMA of a module's weights: ``update(module, t)`` after optimizer step t = 1, 2, ..."""

    def __init__(self, module: nn.Module, sigma_rel: float):
        self.sigma_rel = sigma_rel
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, t: int) -> None:
        beta = (1.0 - 1.0 / t) ** (self.gamma + 1)  # 0 at t = 1: the first average is the weights themselves
        ema = list(self.module.state_dict().values())
        live = list(module.state_dict().values())
        floats = [(e, p) for e, p in zip(ema, live) if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - beta)
        for e, p in zip(ema, live):
            if not e.dtype.is_floating_point:
                e.copy_(p)


def snapshot_path(run_dir: Path, sigma_rel: float, t: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"ema_{sigma_rel:.4f}_{t:07d}.safetensors"


def save_snapshot(run_dir: Path, ema: PowerEMA, t: int, state: dict[str, Tensor] | None = None) -> Path:
    """Write one snapshot (atomically) with its sigma_rel, gamma and step in the metadata."""
    path = snapshot_path(run_dir, ema.sigma_rel, t)
    write_safetensors(path, state if state is not None else ema.module.state_dict(),
                      metadata={"sigma_rel": repr(ema.sigma_rel), "gamma": repr(ema.gamma), "t": str(t)})
    return path


@dataclass
class Snapshot:
    path: Path
    sigma_rel: float
    gamma: float
    t: int


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The snapshots of a run, ordered by step, with a clear error when there are none."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for path in sorted(folder.glob("ema_*.safetensors")) if folder.is_dir() else []:
        if not _NAME.match(path.name):
            continue
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        found.append(Snapshot(path, float(meta["sigma_rel"]), float(meta["gamma"]), int(meta["t"])))
    if not found:
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots in {folder}: train with posthoc_every > 0 (e.g. --set posthoc_every=500)")
    return sorted(found, key=lambda s: (s.t, s.sigma_rel))


def reconstruct(snapshots: list[Snapshot], sigma_rel: float, t: int | None = None
                ) -> tuple[dict[str, Tensor], np.ndarray]:
    """The weights of a power EMA with ``sigma_rel`` at step ``t`` (default: the last snapshot's step)."""
    t = t if t is not None else max(s.t for s in snapshots)
    usable = [s for s in snapshots if s.t <= t]
    if not usable:
        raise ValueError(f"no snapshot at or before step {t}; the first is at step {snapshots[0].t}")
    x = solve_coefficients([s.t for s in usable], [s.gamma for s in usable], t, sigma_rel_to_gamma(sigma_rel))
    out: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coef, snap in zip(x, usable):
        with safe_open(str(snap.path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                v = f.get_tensor(key)
                dtypes[key] = v.dtype
                if not v.dtype.is_floating_point:
                    out[key] = v  # integer buffers: the latest value
                    continue
                out.setdefault(key, torch.zeros(v.shape, dtype=torch.float64)).add_(v.double(), alpha=float(coef))
    return {k: v.to(dtypes[k]) for k, v in out.items()}, x


def export(run_dir: str | Path, sigma_rel: float, out: str | Path, step: int | None = None,
           template: str | Path | None = None) -> Path:
    """``latentdiff posthoc-ema``: write a loadable folder with the reconstructed EMA weights.

    A denoiser run gives a model folder (the autoencoder and text encoder come from ``template``,
    default ``RUN/model``); an autoencoder run gives an autoencoder folder (``template`` default
    ``RUN/autoencoder``, whose latent scale and shift are kept).
    """
    from latentdiff.components import (
        load_autoencoder,
        read_model_folder,
        save_autoencoder,
        write_model_folder,
    )
    from latentdiff.io import atomic_folder, load_state_strict, write_json

    run_dir, out = Path(run_dir), Path(out)
    snapshots = list_snapshots(run_dir)
    state, coefs = reconstruct(snapshots, sigma_rel, step)
    used = [s for s in snapshots if s.t <= (step if step is not None else snapshots[-1].t)]
    is_denoiser = any(k.startswith("network.") for k in state)
    template = Path(template) if template is not None else run_dir / ("model" if is_denoiser else "autoencoder")
    if not template.is_dir():
        raise FileNotFoundError(f"no template folder {template}: finish the run, or pass --template DIR "
                                "(a folder of the same model configuration)")
    if is_denoiser:
        from latentdiff.train.denoiser import Trainable

        model = read_model_folder(template)  # its index (sample size, labels, hints) and components
        joint = any(k.startswith("text_encoder.") for k in state)
        load_state_strict(Trainable(model.denoiser.network, model.text_encoder if joint else None), state,
                          "post-hoc EMA")
        write_model_folder(out, model)
    else:
        autoencoder = load_autoencoder(template)
        load_state_strict(autoencoder, state, "post-hoc EMA")
        with atomic_folder(out) as tmp:
            save_autoencoder(tmp, autoencoder)
    write_json(out / "posthoc_ema.json", {
        "sigma_rel": sigma_rel, "gamma": sigma_rel_to_gamma(sigma_rel), "step": used[-1].t if step is None else step,
        "snapshots": [{"file": s.path.name, "sigma_rel": s.sigma_rel, "t": s.t, "coefficient": float(c)}
                      for s, c in zip(used, coefs)],
    })
    return out
