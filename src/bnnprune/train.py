"""The one training loop (training and fine-tuning): Adam, LR schedule, flip logging, resume."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bnnprune.binary import clip_latent_weights
from bnnprune.config import TrainConfig
from bnnprune.data import Split, normalize
from bnnprune.files import save_torch
from bnnprune.flips import FlipCounter
from bnnprune.models import BNN, build_model


class TrainingError(RuntimeError):
    pass


@dataclass
class FitResult:
    model: BNN
    flips: FlipCounter
    history: list[dict[str, Any]] = field(default_factory=list)
    flip_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available; "
                            "use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup_torch(cfg: TrainConfig) -> torch.device:
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return pick_device(cfg.device)


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None):
    order = (torch.randperm(len(split), generator=generator) if generator is not None
             else torch.arange(len(split)))
    for i in range(0, len(split), batch_size):
        idx = order[i:i + batch_size]
        yield split.images[idx], split.labels[idx]


@torch.no_grad()
def evaluate(model: BNN, split: Split, card: dict, batch_size: int = 512,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Accuracy, mean loss and predictions of `model` on a prepared split."""
    model.eval()
    losses, preds = [], []
    for images, labels in batches(split, batch_size):
        logits = model(normalize(images, card["mean"], card["std"]).to(device))
        losses.append(F.cross_entropy(logits, labels.to(device), reduction="sum").item())
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds)
    return {"acc": (pred == split.labels).float().mean().item(),
            "loss": sum(losses) / len(split), "pred": pred}


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    if epoch >= cfg.epochs:  # the near-convergence tail
        return cfg.tail_lr
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":  # drop 10x when the flip-logging interval starts
        return cfg.lr * (0.1 if epoch >= cfg.epochs - cfg.flip_window else 1.0)
    t = (epoch * steps_per_epoch + step_in_epoch) / (cfg.epochs * steps_per_epoch)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fit(model: BNN, train: Split, val: Split, card: dict, cfg: TrainConfig,
        resume_path: str | Path | None = None, desc: str = "train") -> FitResult:
    """Train `model` for `cfg.epochs` (+ `cfg.tail_epochs` at `cfg.tail_lr`), counting flips
    in the schedule's last `cfg.flip_window` epochs and, apart, in the tail.

    After every epoch the full state goes to `resume_path`; a later call with the same
    config and starting weights resumes from it, then removes it when training ends.
    """
    device = setup_torch(cfg)
    model.to(device)
    key = fingerprint(asdict(cfg), model.config, card.get("sources"), card.get("sizes"),
                      [float(p.double().sum()) for p in model.state_dict().values()])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    flips = FlipCounter(model, cfg.flip_granularity)
    result = FitResult(model, flips)
    start = 0
    resume_path = Path(resume_path) if resume_path else None
    if resume_path and resume_path.is_file():
        state = torch.load(resume_path, map_location=device, weights_only=False)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            flips.load_state_dict(state["flips"])
            result.history, result.flip_history = state["history"], state["flip_history"]
            start = result.resumed_from_epoch = state["epoch"] + 1
            tqdm.write(f"{desc}: resuming from {resume_path} after epoch {state['epoch'] + 1}")
    steps = math.ceil(len(train) / cfg.batch_size)
    epochs = cfg.epochs + cfg.tail_epochs
    for epoch in range(start, epochs):
        flips.active = cfg.epochs - cfg.flip_window <= epoch < cfg.epochs
        flips.tail = epoch >= cfg.epochs
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(batches(train, cfg.batch_size, g), total=steps, leave=False,
                   desc=f"{desc} epoch {epoch + 1}/{epochs}", mininterval=1.0)
        for step, (images, labels) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch, step, steps)
            x, y = normalize(images, card["mean"], card["std"]).to(device), labels.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise TrainingError(f"{desc}: loss is {loss.item()} at epoch {epoch + 1} step "
                                    f"{step + 1}; stopped (no checkpoint was overwritten). "
                                    f"Try a lower learning rate (lr={cfg.lr}).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clip_latent_weights(model)
            flips.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}",
                            refresh=False)
        ratios = flips.end_epoch()
        val_metrics = evaluate(model, val, card, device=device)
        record = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_acc": correct / seen,
                  "val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"],
                  "lr": optimizer.param_groups[0]["lr"]}
        result.history.append(record)
        result.flip_history.append(
            {"epoch": epoch + 1, **{n.removesuffix(".layer"): r for n, r in ratios.items()}})
        tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: train_loss {record['train_loss']:.4f}"
                   f" train_acc {record['train_acc']:.4f} val_acc {record['val_acc']:.4f}")
        if mlflow.active_run():
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            mlflow.log_metrics({f"flip_ratio/{n}": r for n, r in ratios.items()},
                               step=epoch + 1)
        if resume_path:
            save_torch(resume_path, {"key": key, "epoch": epoch, "model": model.state_dict(),
                                     "optimizer": optimizer.state_dict(),
                                     "flips": flips.state_dict(), "history": result.history,
                                     "flip_history": result.flip_history})
    model.cpu()
    return result


def finish_resume(resume_path: str | Path | None) -> None:
    """Drop the resume state once the stage's outputs are safely written."""
    if resume_path:
        Path(resume_path).unlink(missing_ok=True)


def copy_model(model: BNN) -> BNN:
    clone = build_model(model.config)
    clone.load_state_dict(model.state_dict())
    return clone
