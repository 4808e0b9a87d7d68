"""Built-in architectures (chain CNNs, a residual Bi-Real-style BNN) and users' own modules."""

from bnnprune.models.registry import (
    BUILTIN,
    CheckpointError,
    ModelError,
    build_model,
    load_checkpoint,
    model_config,
    save_checkpoint,
)

__all__ = ["BUILTIN", "CheckpointError", "ModelError", "build_model", "load_checkpoint",
           "model_config", "save_checkpoint"]
