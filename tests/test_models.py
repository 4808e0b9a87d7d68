import pytest
import torch

from bnnprune.core.binary import BinaryConv2d, binary_layers
from bnnprune.models import (
    CheckpointError,
    build_model,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from bnnprune.models.chain import ARCHS


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_arch_runs_on_both_input_shapes_with_float_first_and_last(arch, shape):
    model = build_model(model_config(arch, 0.25, list(shape), 10), seed=0)
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 10)
    first = model.blocks[0].layer
    assert type(first) is torch.nn.Conv2d  # full precision
    assert len(binary_layers(model)) == len(model.blocks) - 1
    loss = model(x).sum()
    loss.backward()  # STE lets gradient reach every latent weight
    assert all(m.weight.grad is not None for m in binary_layers(model).values())


def test_nin_has_seven_binary_layers_between_float_first_and_last():
    model = build_model(model_config("nin", 1.0, [3, 32, 32], 10))
    assert len(binary_layers(model)) == 7
    assert all(isinstance(m, BinaryConv2d) for m in binary_layers(model).values())


def test_checkpoint_roundtrip_rebuilds_from_file_alone(tmp_path):
    model = build_model({**model_config("cnn", 0.25, [1, 28, 28], 10), "channels":
                         [8, 5, 16, 7, 32, 9]}, seed=1)
    model.eval()
    path = save_checkpoint(tmp_path / "m.pt", model, note="x")
    loaded, ckpt = load_checkpoint(path, arch="cnn")
    loaded.eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert ckpt["meta"]["note"] == "x"
    with pytest.raises(CheckpointError, match="architecture 'cnn', but model.arch is 'nin'"):
        load_checkpoint(path, arch="nin")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a bnnprune checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_a_checkpoint_saved_twice_is_byte_identical(tmp_path):
    """DVC hashes checkpoints: the same model saved again (re-run stage) must not change them."""
    model = build_model(model_config("cnn", 0.25, [1, 28, 28], 10), seed=0)
    first = save_checkpoint(tmp_path / "a" / "baseline.pt", model).read_bytes()
    assert save_checkpoint(tmp_path / "b" / "baseline.pt", model).read_bytes() == first


def test_birealnet_heads_and_pruning_its_last_stage_prunes_the_flatten_columns():
    """birealnet's head is AvgPool(2) + flatten + linear (7x7 -> 3x3 on 28x28), or Bi-Real's
    global average pool on request; pruning the last stage keeps, per kept channel, exactly its
    9 classifier columns in torch's (C, H, W) flatten order."""
    import bnnprune

    config = model_config("birealnet", 0.25, [1, 28, 28], 10)
    model = build_model(config, seed=0)
    assert type(model.head.pool) is torch.nn.AvgPool2d
    assert model.head.classifier.in_features == 32 * 3 * 3
    gap = build_model({**config, "head": "gap"}, seed=0)
    assert gap.head.classifier.in_features == 32
    with pytest.raises(ValueError, match="'mean' is not allowed; allowed: pool_flatten, gap"):
        build_model({**config, "head": "mean"})
    x = torch.randn(2, 1, 28, 28)
    counts = {n: torch.zeros_like(m.weight, dtype=torch.int32)
              for n, m in binary_layers(model).items()}
    last = model.blocks[4].bn.weight
    with torch.no_grad():
        last.copy_(torch.arange(32.0))  # the last stage's channels told apart by their BN
    pruned, report = bnnprune.prune(model, x, counts, method="uniform",
                                    target_bop_reduction=0.3, round_to=8, min_channels=8)
    kept = pruned.blocks[4].bn.weight.detach().long().tolist()
    assert 8 <= len(kept) < 32 and kept == sorted(kept)
    columns = model.head.classifier.weight.detach().view(10, 32, 3, 3)[:, kept].reshape(10, -1)
    assert torch.equal(pruned.head.classifier.weight, columns)
    assert pruned(x).shape == (2, 10) and pruned.config["channels"][2] == len(kept)
