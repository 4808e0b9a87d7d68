"""The one training loop (training and fine-tuning): Adam, LR schedule, flip logging, resume.

Distributed: with `nproc > 1` the train/finetune stages re-run themselves under torchrun
(`launch`), one process per rank; `fit` then wraps the model in DistributedDataParallel (gloo on
CPU, NCCL on CUDA). Every rank draws the same seeded permutation and takes every world-th image
of each global batch of `batch_size`, so the global batch is the configured one and the loss
scaling makes the averaged gradient the global batch's mean. Weights are identical on every
rank after each step, so flip counts are too: a checksum all-reduce asserts it at every epoch
end. Rank 0 alone evaluates, writes the resume state, logs to MLflow and writes the outputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bnnprune.core.binary import clip_latent_weights
from bnnprune.core.errors import UserError
from bnnprune.core.files import save_torch
from bnnprune.core.flips import FlipCounter
from bnnprune.models.chain import BNN
from bnnprune.pipeline.config import TrainConfig
from bnnprune.pipeline.data import Split, normalize
from bnnprune.pipeline.tracking import layer_segment, project_path


class TrainingError(UserError, RuntimeError):
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
    device = pick_device(cfg.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun worker
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launch(nproc: int, script: str, group: str = "train") -> None:
    """With nproc > 1, outside torchrun: run `script` under torchrun (`nproc` local processes)
    and exit with its status. Inside a torchrun worker or with nproc 1: return at once."""
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    if not dist.is_available():
        raise TrainingError(f"{group}.nproc is {nproc} but this torch has no torch.distributed; "
                            f"set {group}.nproc: 1")
    # the script as the project names it: the workers' argv[0] is their runs' source tag
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", project_path(script)]
    print(f"{group}: {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    sys.exit(subprocess.run(cmd).returncode)


def init_distributed(cfg: TrainConfig) -> int:
    """Inside a torchrun worker: join the process group (NCCL on CUDA, else gloo); the rank."""
    if "LOCAL_RANK" not in os.environ:
        return 0
    backend = "nccl" if setup_torch(cfg).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if dist.get_world_size() != cfg.nproc:
        raise TrainingError(f"torchrun started {dist.get_world_size()} processes but nproc is "
                            f"{cfg.nproc}; run the stage without torchrun, it launches itself")
    return dist.get_rank()


def finish_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None,
            rank: int = 0, world_size: int = 1):
    """Batches of `batch_size` in a seeded random (else the stored) order; under DDP each rank
    gets its share (every world_size-th image) of every global batch."""
    order = (torch.randperm(len(split), generator=generator) if generator is not None
             else torch.arange(len(split)))
    for i in range(0, len(split), batch_size):
        idx = order[i:i + batch_size][rank::world_size]
        yield split.images[idx], split.labels[idx]


def check_flips_agree(flips: FlipCounter, ratios: dict[str, float], epoch: int, desc: str,
                      device: torch.device) -> int:
    """All-reduce a checksum of every layer's flip counts (window and tail) and of the epoch's
    flip ratios; TrainingError if any rank differs. Returns the checksum."""
    sums = []
    for name in flips.layers:
        for counts in (flips.counts[name], flips.tail_counts[name]):
            c = counts.flatten().long().cpu()
            sums += [c.sum(), (c * (torch.arange(c.numel()) % 65521 + 1)).sum()]
    local = torch.stack(sums)
    values = torch.cat([local.double(), torch.tensor([ratios[n] for n in sorted(ratios)],
                                                     dtype=torch.float64)]).to(device)
    low, high = values.clone(), values.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN)
    dist.all_reduce(high, dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise TrainingError(f"{desc}: flip counts differ across the {world()[1]} ranks after "
                            f"epoch {epoch + 1}; the replicas diverged")
    return int(local.sum())


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


def objective(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
              distill: float) -> torch.Tensor:
    """Cross-entropy, mixed with KL(teacher || student) at weight `distill` when a teacher's
    logits are given (ReActNet's distribution loss at distill 1)."""
    loss = F.cross_entropy(logits, y)
    if teacher_logits is None or not distill:
        return loss
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1),
                  reduction="batchmean", log_target=True)
    return (1 - distill) * loss + distill * kl


def fit(model: BNN, train: Split, val: Split, card: dict, cfg: TrainConfig,
        resume_path: str | Path | None = None, desc: str = "train",
        teacher: nn.Module | None = None) -> FitResult:
    """Train `model` for `cfg.epochs` (+ `cfg.tail_epochs` at `cfg.tail_lr`), counting flips
    in the schedule's last `cfg.flip_window` epochs and, apart, in the tail. With
    `cfg.distill > 0`, `teacher` (frozen, eval mode) supplies the soft targets.

    After every epoch the full state goes to `resume_path`; a later call with the same
    config and starting weights resumes from it, then removes it when training ends.
    """
    device = setup_torch(cfg)
    rank, world_size = world()
    if cfg.batch_size % world_size:
        raise TrainingError(f"{desc}: batch_size {cfg.batch_size} is not a multiple of the "
                            f"{world_size} processes (nproc); the global batch is split evenly")
    if 0 < len(train) % cfg.batch_size < world_size:
        raise TrainingError(f"{desc}: the last batch of {len(train) % cfg.batch_size} images "
                            f"cannot be split over {world_size} processes; change batch_size")
    if cfg.distill and teacher is None:
        raise TrainingError(f"{desc}: distill is {cfg.distill} but no teacher model was given")
    if cfg.distill:
        teacher = teacher.to(device).eval().requires_grad_(False)
    model.to(device)
    key = fingerprint(asdict(cfg), model.config, card.get("sources"), card.get("sizes"),
                      [float(p.double().sum()) for p in model.state_dict().values()])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    flips = FlipCounter(model, granularity=cfg.flip_granularity)
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
    net = model if world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start, epochs):
        flips.active = cfg.epochs - cfg.flip_window <= epoch < cfg.epochs
        flips.tail = epoch >= cfg.epochs
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(batches(train, cfg.batch_size, g, rank, world_size), total=steps,
                   leave=False, desc=f"{desc} epoch {epoch + 1}/{epochs}", mininterval=1.0,
                   disable=rank != 0)
        for step, (images, labels) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch, step, steps)
            x, y = normalize(images, card["mean"], card["std"]).to(device), labels.to(device)
            logits = net(x)
            with torch.no_grad():
                soft = teacher(x) if cfg.distill else None
            loss = objective(logits, y, soft, cfg.distill)
            if not torch.isfinite(loss):
                raise TrainingError(f"{desc}: loss is {loss.item()} at epoch {epoch + 1} step "
                                    f"{step + 1}; stopped (no checkpoint was overwritten). "
                                    f"Try a lower learning rate (lr={cfg.lr}).")
            optimizer.zero_grad(set_to_none=True)
            if world_size > 1:  # DDP averages the ranks' gradients: weigh each by its share
                global_batch = min(cfg.batch_size, len(train) - step * cfg.batch_size)
                (loss * (len(y) * world_size / global_batch)).backward()
            else:
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
        if world_size > 1:
            totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            total_loss, correct, seen = totals.tolist()
            checksum = check_flips_agree(flips, ratios, epoch, desc, device)
            if rank != 0:
                continue
            tqdm.write(f"{desc} epoch {epoch + 1}: flip counts identical on {world_size} ranks "
                       f"(checksum {checksum})")
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
            mlflow.log_metrics({f"flip_ratio/{layer_segment(n)}": r for n, r in ratios.items()},
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
