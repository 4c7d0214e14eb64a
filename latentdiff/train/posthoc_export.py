"""``latentdiff posthoc-ema``: a run's power-EMA snapshots (``train.posthoc_ema``) reconstructed at any EMA length
and written as a loadable folder: a model folder for a denoiser run, an autoencoder folder for an autoencoder run.

Apart from ``train.posthoc_ema`` because it writes what the training loops write (``train.denoiser``'s model
folder), and those loops stand on the run engine, which keeps the snapshots.
"""

from __future__ import annotations

from pathlib import Path

from latentdiff.components import load_autoencoder, read_model_folder, save_autoencoder, write_model_folder
from latentdiff.io import atomic_folder, load_state_strict, write_json
from latentdiff.train.common import Trainable
from latentdiff.train.posthoc_ema import list_snapshots, reconstruct, sigma_rel_to_gamma


def export(run_dir: str | Path, sigma_rel: float, out: str | Path, step: int | None = None,
           template: str | Path | None = None) -> Path:
    """``latentdiff posthoc-ema``: write a loadable folder with the reconstructed EMA weights.

    A denoiser run gives a model folder (the autoencoder and text encoder come from ``template``,
    default ``RUN/model``); an autoencoder run gives an autoencoder folder (``template`` default
    ``RUN/autoencoder``, whose latent scale and shift are kept).
    """
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


def export_checkpoint(checkpoint: str | Path, out: str | Path, template: str | Path | None = None) -> Path:
    """``latentdiff export-checkpoint``: a denoiser checkpoint's EMA weights as a loadable model folder (a
    train-controlnet checkpoint's: a ControlNet folder).

    ``checkpoint`` is a ``step_XXXXXXX`` folder (or a run folder: its latest checkpoint). The configs come from
    the run config the checkpoint holds (its cache and autoencoder must still be in place), or, with
    ``template``, from a model folder of the same configuration. It works while the run still trains; an early
    checkpoint of a run is the weak guide that autoguidance needs.
    """
    from safetensors.torch import load_file

    from latentdiff.train.common import find_checkpoint
    from latentdiff.train.denoiser import model_from_checkpoint

    folder = find_checkpoint(Path(checkpoint))
    state = load_file(folder / "ema.safetensors")
    if any(k.startswith("controlnet_cond_embedding.") for k in state):  # a train-controlnet run
        from latentdiff.train.controlnet import export_controlnet_checkpoint

        return export_controlnet_checkpoint(folder, state, out)
    if not any(k.startswith("network.") for k in state):
        raise ValueError(f"{folder} is not a denoiser checkpoint (its EMA has no network.* tensors)")
    if template is None:
        return write_model_folder(out, model_from_checkpoint(folder))
    if not (Path(template) / "model_index.json").is_file():
        raise FileNotFoundError(f"no model folder {template} to take the configs from: pass a model folder of the "
                                "same configuration, or no --template (the checkpoint's own run config)")
    model = read_model_folder(template)
    joint = any(k.startswith("text_encoder.") for k in state)
    load_state_strict(Trainable(model.denoiser.network, model.text_encoder if joint else None), state,
                      f"{folder.name} EMA")
    return write_model_folder(out, model)
