"""Training loop: chronological validation split, early stopping, deterministic with a seed."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from streamer.config import TrainConfig
from streamer.errors import DataError
from streamer.model.backend import resolve_device
from streamer.model.networks import Architecture, ScoringModel, fit_residual_model
from streamer.model.scaler import Scaler

__all__ = ["TrainResult", "make_windows", "resolve_device", "score_windows", "train_model"]


def make_windows(values: NDArray[np.floating], window: int, stride: int) -> NDArray[np.float32]:
    """All windows ``(n, window, channels)`` of one contiguous segment (a copy)."""
    if values.shape[0] < window:
        return np.empty((0, window, values.shape[1]), dtype=np.float32)
    view = sliding_window_view(values, window, axis=0)[::stride]  # (n, C, W)
    return np.ascontiguousarray(view.transpose(0, 2, 1), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class TrainResult:
    """A trained model with what the checkpoint sidecar records."""

    module: ScoringModel
    scaler: Scaler
    calibration: NDArray[np.float64]
    info: dict[str, Any]


def mean_residuals(
    module: ScoringModel, windows: NDArray[np.float32], batch: int = 1024
) -> NDArray[np.float64]:
    """Each window's mean residual per channel (reconstruction minus input), no gradients."""
    device = next(module.parameters()).device
    out = []
    with torch.inference_mode():
        for lo in range(0, windows.shape[0], batch):
            xb = torch.from_numpy(windows[lo : lo + batch]).to(device)
            out.append(module.residuals(xb).mean(dim=1).double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, module.arch.channels))


def score_windows(
    module: ScoringModel, windows: NDArray[np.float32], batch: int = 1024
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Scores and per-channel errors of windows, in batches, without gradients."""
    device = next(module.parameters()).device
    scores, errors = [], []
    with torch.inference_mode():
        for i in range(0, windows.shape[0], batch):
            s, e = module(torch.from_numpy(windows[i : i + batch]).to(device))
            scores.append(s.double().cpu().numpy())
            errors.append(e.double().cpu().numpy())
    if not scores:
        return np.empty(0), np.empty((0, module.arch.channels))
    return np.concatenate(scores), np.concatenate(errors)


def train_model(
    segments: Sequence[NDArray[np.floating]],
    channels: Sequence[str],
    window: int,
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train on normal data given as contiguous segments ``(rows, channels)``.

    Each segment's last ``validation_fraction`` of rows is held out (chronological,
    so validation never overlaps training windows); the scaler is fitted on the
    training rows only. The model with the best validation loss is kept.
    """
    n_ch = len(channels)
    train_rows, val_rows = _split(segments, n_ch, window, cfg)
    scaler = Scaler.fit(np.concatenate(train_rows), cfg.scaler)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    gen = torch.Generator().manual_seed(cfg.seed)
    arch = Architecture(cfg.preset, window, n_ch, cfg.hidden, cfg.latent, cfg.fft, cfg.score)
    module = ScoringModel(arch, torch.from_numpy(scaler.offset), torch.from_numpy(scaler.scale))
    module.to(device)

    tr = np.concatenate([make_windows(r, window, cfg.train_stride) for r in train_rows])
    va_parts = [make_windows(r, window, 1) for r in val_rows]
    va = np.concatenate(va_parts) if va_parts else np.empty((0, window, n_ch), np.float32)
    if va.shape[0] == 0:
        # Too little data for a separate validation set: validate on the training windows
        # (early stopping still bounds the epochs) and say so in the sidecar.
        va = tr
    x_tr = module.prepare(torch.from_numpy(tr).to(device)).detach()
    x_va = module.prepare(torch.from_numpy(va).to(device)).detach()

    started = time.monotonic()
    best, epochs_run = _fit(module, x_tr, x_va, cfg, gen, progress)
    module.eval()

    all_windows = np.concatenate([tr, va]) if va is not tr else tr
    calib = _calibrate(module, all_windows, cfg)
    info = {
        "rows": int(sum(np.asarray(s).shape[0] for s in segments)),
        "train_windows": int(tr.shape[0]),
        "validation_windows": int(va.shape[0]) if va is not tr else 0,
        "epochs_run": epochs_run,
        "best_validation_loss": best,
        "seconds": round(time.monotonic() - started, 3),
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
    }
    return TrainResult(module, scaler, calib, info)


def _split(
    segments: Sequence[NDArray[np.floating]], n_ch: int, window: int, cfg: TrainConfig
) -> tuple[list[NDArray[np.floating]], list[NDArray[np.floating]]]:
    """Each segment's training rows and its last ``validation_fraction`` (chronological)."""
    train_rows, val_rows = [], []
    for i, seg in enumerate(segments):
        seg = np.asarray(seg, dtype=np.float64)
        if seg.ndim != 2 or seg.shape[1] != n_ch:
            raise DataError(f"segment {i} has shape {seg.shape}; expected (rows, {n_ch})")
        cut = round(seg.shape[0] * (1 - cfg.validation_fraction))
        train_rows.append(seg[:cut])
        val_rows.append(seg[cut:])
    total_train = sum(r.shape[0] for r in train_rows)
    if total_train < window + 1:
        raise DataError(
            f"only {total_train} training rows after the validation split; need more than "
            f"the window ({window})"
        )
    return train_rows, val_rows


def _fit(
    module: ScoringModel,
    x_tr: torch.Tensor,
    x_va: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    progress: bool,
) -> tuple[float, int]:
    """Adam with early stopping; the module ends with the best validation loss's weights.

    Returns that loss and the epochs run.
    """
    device = x_tr.device
    opt = torch.optim.Adam(module.network.parameters(), lr=cfg.learning_rate)
    best = float("inf")
    best_state = copy.deepcopy(module.network.state_dict())
    stale = 0
    bar = None
    if progress:
        bar, task = _progress_bar(cfg)
    # Without a terminal (a log file, journald) or without rich: one line per epoch.
    lines = progress and bar is None
    started = time.monotonic()
    epochs_run = 0
    try:
        for _epoch in range(cfg.epochs):
            module.network.train()
            perm = torch.randperm(x_tr.shape[0], generator=gen).to(device)
            total = 0.0
            for i in range(0, x_tr.shape[0], cfg.batch_size):
                xb = x_tr[perm[i : i + cfg.batch_size]]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(module.reconstruct(xb), xb)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                total += float(loss.detach()) * xb.shape[0]
            train_loss = total / x_tr.shape[0]
            module.network.eval()
            with torch.inference_mode():
                val_loss = float(torch.nn.functional.mse_loss(module.reconstruct(x_va), x_va))
            epochs_run += 1
            if bar is not None:
                bar.update(task, advance=1, loss=train_loss, val=val_loss)
            elif lines:
                _epoch_line(epochs_run, cfg, train_loss, val_loss, time.monotonic() - started)
            if val_loss < best - 1e-7:
                best, stale = val_loss, 0
                best_state = copy.deepcopy(module.network.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    finally:
        if bar is not None:
            bar.stop()
    module.network.load_state_dict(best_state)
    return best, epochs_run


def _calibrate(
    module: ScoringModel, all_windows: NDArray[np.float32], cfg: TrainConfig
) -> NDArray[np.float64]:
    """Fit the per-channel scale and residual model, then the calibration scores."""
    if cfg.channel_scale_quantile is not None:
        # Over training and held-out windows: errors on windows the model never fitted
        # are the honest measure of its error on normal data.
        _, normal_errors = score_windows(module, all_windows)
        scale = np.quantile(normal_errors, cfg.channel_scale_quantile, axis=0)
        # A channel reconstructed perfectly in training must not divide by zero.
        scale = np.maximum(scale, 1e-12 + 1e-6 * float(scale.max()))
        module.channel_scale.copy_(torch.from_numpy(scale).to(module.channel_scale))
    if cfg.score == "mahalanobis":
        fit_residual_model(module, mean_residuals(module, all_windows))
    calib, _ = score_windows(module, all_windows)
    if calib.shape[0] > cfg.calibration_samples:
        pick = np.random.default_rng(cfg.seed).choice(
            calib.shape[0], cfg.calibration_samples, replace=False
        )
        calib = calib[np.sort(pick)]
    return calib


def _epoch_line(epoch: int, cfg: TrainConfig, loss: float, val: float, elapsed: float) -> None:
    """One epoch's progress as a line on stderr, with an estimate of what is left."""
    left = elapsed / epoch * (cfg.epochs - epoch)
    print(
        f"training {cfg.preset}: epoch {epoch}/{cfg.epochs} loss {loss:.5f} val {val:.5f} "
        f"({elapsed:.0f} s, at most {left:.0f} s left; early stopping may end it sooner)",
        file=sys.stderr,
        flush=True,
    )


def _progress_bar(cfg: TrainConfig) -> tuple[Any, Any]:
    """A started rich progress bar and its task; (None, None) without one.

    None when stdout, where rich draws it, is not a terminal (the bar would only leave
    control characters in a log) and without rich, which is in the ``demo`` and ``dev``
    extras, not in a production install.
    """
    if not sys.stdout.isatty():
        return None, None
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return None, None
    bar = Progress(
        TextColumn("[bold]training[/] {task.fields[preset]}"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.5f} val {task.fields[val]:.5f}"),
        TimeElapsedColumn(),
        transient=False,
    )
    bar.start()
    task = bar.add_task(
        "train", total=cfg.epochs, preset=cfg.preset, loss=float("nan"), val=float("nan")
    )
    return bar, task
