"""Every model the pipeline runs, built from a config saved in each checkpoint.

    {"arch": "cnn", "width": 1.0, "in_shape": [1, 28, 28], "num_classes": 10,
     "channels": [32, 32, 64, ...]}                        # built in: cnn | nin | alexnet
    {"arch": "birealnet", ..., "channels": [32, 64, 128],   # built in, residual
     "head": "pool_flatten"}                               # or "gap"
    {"arch": "package.module:factory", "kwargs": {...},      # a user's module
     "binary": ["package.module:ClassName", ...], "in_shape": ..., "num_classes": ...}

`channels` holds the prunable widths of a built-in model; pruning changes only them. A user's
model is built by calling `factory(**kwargs)`; its binary layers are the classes in `binary`
(default: the project's binary layers). Its checkpoints hold the whole pruned module.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnprune.core.binary import binary_layers
from bnnprune.core.errors import UserError
from bnnprune.core.files import save_torch
from bnnprune.models import birealnet, chain

BUILTIN = (*chain.ARCHS, "birealnet")


class ModelError(UserError, ValueError):
    """A model config that cannot be built; the message names the value and what is allowed."""


class CheckpointError(UserError, ValueError):
    pass


def is_user_arch(arch: str) -> bool:
    return ":" in arch


def unknown_arch(arch: str) -> ModelError:
    return ModelError(f"model.arch: {arch!r} is not allowed; allowed: {', '.join(BUILTIN)} or "
                      f"'package.module:factory'")


def import_object(spec: str, what: str) -> Any:
    """`package.module:name` -> the object."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"{what}: {spec!r} is not allowed; allowed: 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ModelError(f"{what}: {spec!r}: module {module_name!r} cannot be imported "
                         f"({type(e).__name__}: {e}); allowed: a package the stages import: "
                         f"under src/ (dvc.yaml runs them with PYTHONPATH=src) or installed "
                         f"in the environment") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ModelError(f"{what}: {spec!r}: module {module_name!r} has no {attr!r}") from e


def binary_classes(config: dict[str, Any]) -> list[type[nn.Module]] | None:
    specs = config.get("binary")
    if not specs:
        return None
    classes = [import_object(s, "model.binary") for s in specs]
    for s, c in zip(specs, classes, strict=True):
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise ModelError(f"model.binary: {s!r} is {c!r}, not an nn.Module class; allowed: "
                             f"'package.module:ClassName' of a module class")
    return classes


def model_config(arch: str, width: float, in_shape: list[int], num_classes: int,
                 kwargs: dict[str, Any] | None = None, binary: list[str] | None = None) -> dict:
    config = {"arch": arch, "width": width, "in_shape": list(in_shape),
              "num_classes": num_classes}
    if arch in chain.ARCHS:
        specs, _ = chain.ARCHS[arch](width)
        return {**config, "channels": [s.out for s in specs]}
    if arch == "birealnet":
        return {**config, "channels": birealnet.default_channels(width), "head": "pool_flatten"}
    if is_user_arch(arch):
        return {**config, "kwargs": dict(kwargs or {}), "binary": list(binary or [])}
    raise unknown_arch(arch)


def build_model(config: dict[str, Any], seed: int | None = None) -> nn.Module:
    """Rebuild a model from its config; `seed` makes fresh initial weights reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    arch = config["arch"]
    if arch in chain.ARCHS:
        return chain.BNN(config)
    if arch == "birealnet":
        return birealnet.BiRealNet(config)
    if not is_user_arch(arch):
        raise unknown_arch(arch)
    factory = import_object(arch, "model.arch")
    if not callable(factory):
        raise ModelError(f"model.arch: {arch!r} is a {type(factory).__name__}, not callable; "
                         f"allowed: a function or class returning an nn.Module")
    model = factory(**config.get("kwargs", {}))
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.arch: {arch!r} returned a {type(model).__name__}, not an "
                         f"nn.Module")
    model.config = dict(config)
    model.bnnprune_binary = binary_classes(config)
    binary_layers(model)  # no binary layer, or one with a weight not 2-D / 4-D: a clear error
    return model


def save_checkpoint(path: str | Path, model: nn.Module, **meta: Any) -> Path:
    """Weights + the config that rebuilds the model + free-form metadata, written atomically
    (a user's model: the whole module, since its pruned shapes cannot be rebuilt)."""
    ckpt = {"config": model.config, "state_dict": model.state_dict(), "meta": meta}
    if is_user_arch(model.config["arch"]):
        ckpt["module"] = model
    return save_torch(path, ckpt)


def load_checkpoint(path: str | Path, arch: str | None = None) -> tuple[nn.Module, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        config = ckpt["config"]
        state = ckpt["state_dict"]
    except Exception as e:
        raise CheckpointError(f"{path}: not a bnnprune checkpoint ({type(e).__name__}: {e})") \
            from e
    if arch is not None and config.get("arch") != arch:
        raise CheckpointError(f"{path}: checkpoint of architecture {config.get('arch')!r}, "
                              f"but model.arch is {arch!r}")
    model = ckpt["module"] if "module" in ckpt else build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({e})") from e
    return model, ckpt
