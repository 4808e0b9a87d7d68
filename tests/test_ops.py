import pytest
import torch
from torch import nn

from bnnprune.core.binary import BINARY_LAYERS, BinaryLinear
from bnnprune.core.ops import count_ops, example_input, reduction_pct
from bnnprune.models import build_model, model_config
from bnnprune.models.chain import ARCHS

CNN = model_config("cnn", 0.25, [1, 28, 28], 10)  # channels [8, 8, 16, 16, 32, 32]


def test_small_cnn_counts_equal_hand_computed_values():
    ops = count_ops(build_model(CNN)).to_dict()
    rows = {r["name"]: r for r in ops["layers"]}
    # float stem 1 -> 8, 3x3, pad 1, 28x28 out: 28*28 * 8 * 1*9 MACs
    assert rows["blocks.0.layer"]["flops"] == 28 * 28 * 8 * 9 == 56448
    assert rows["blocks.0.layer"]["bops"] == 0
    # binary 8 -> 8 at 28x28 (max-pool after: counted before pooling)
    assert rows["blocks.1.layer"]["bops"] == 28 * 28 * 8 * 8 * 9 == 451584
    assert rows["blocks.2.layer"]["bops"] == 14 * 14 * 16 * 8 * 9 == 225792
    assert rows["blocks.3.layer"]["bops"] == 14 * 14 * 16 * 16 * 9 == 451584
    assert rows["blocks.4.layer"]["bops"] == 7 * 7 * 32 * 16 * 9 == 225792
    assert rows["blocks.5.layer"]["bops"] == 7 * 7 * 32 * 32 * 9 == 451584
    # classifier: flatten 32 x 3 x 3 -> 10, bias not counted as MACs
    assert rows["classifier"]["flops"] == 32 * 3 * 3 * 10 == 2880
    assert rows["classifier"]["in_channels"] == 288
    total = ops["total"]
    assert total["bops"] == 451584 * 3 + 225792 * 2 == 1806336
    assert total["flops"] == 56448 + 2880
    assert total["ops"] == 1806336 / 64 + 56448 + 2880
    binary_weights = 8 * 8 * 9 + 16 * 8 * 9 + 16 * 16 * 9 + 32 * 16 * 9 + 32 * 32 * 9
    bn = 2 * (8 + 8 + 16 + 16 + 32 + 32)
    float_params = 8 * 9 + bn + 288 * 10 + 10
    assert total["binary_params"] == binary_weights == 17856
    assert total["float_params"] == float_params == 3186
    assert total["size_bits"] == 17856 + 32 * 3186
    assert total["size_bytes"] == total["size_bits"] / 8


def test_pruned_config_is_counted_with_its_channels():
    ops = count_ops(build_model({**CNN, "channels": [8, 5, 16, 7, 32, 9]})).to_dict()
    bops = [r["bops"] for r in ops["layers"]]
    assert bops == [0, 28 * 28 * 5 * 8 * 9, 14 * 14 * 16 * 5 * 9, 14 * 14 * 7 * 16 * 9,
                    7 * 7 * 32 * 7 * 9, 7 * 7 * 9 * 32 * 9, 0]
    assert ops["layers"][-1]["flops"] == 9 * 3 * 3 * 10


def hooked_macs(model: nn.Module, in_shape) -> tuple[int, int]:
    """An independent count: run the model once and read every conv/linear's real shapes."""
    counts = {"bops": 0, "flops": 0}

    def hook(module, inputs, output):
        per_output = module.weight[0].numel()  # C_in * k * k (or in_features)
        key = "bops" if isinstance(module, BINARY_LAYERS) else "flops"
        counts[key] += output[0].numel() * per_output  # one image

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *in_shape))
    for h in handles:
        h.remove()
    return counts["bops"], counts["flops"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_counts_match_the_shapes_the_model_really_computes(arch, shape):
    config = model_config(arch, 0.125, list(shape), 10)
    # prune a few channels of every binary layer
    config["channels"] = [c if i == 0 else max(1, c - 1 - i % 3)
                          for i, c in enumerate(config["channels"])]
    model = build_model(config, seed=0)
    ops = count_ops(model).to_dict()
    assert (ops["total"]["bops"], ops["total"]["flops"]) == hooked_macs(model, shape)
    n_binary = sum(p.numel() for m in model.modules() if isinstance(m, BINARY_LAYERS)
                   for p in m.parameters())
    assert ops["total"]["binary_params"] == n_binary
    assert ops["total"]["binary_params"] + ops["total"]["float_params"] == sum(
        p.numel() for p in model.parameters())


def test_reduction_pct():
    assert reduction_pct(200, 150) == 25.0
    assert reduction_pct(0, 0) == 0.0


def test_rows_by_name_and_the_default_input():
    model = build_model(CNN)
    ops = count_ops(model)
    assert ops.row("blocks.2.layer")["out_channels"] == 16
    assert ops.to_dict() == {"layers": ops.layers, "total": ops.total}
    with pytest.raises(KeyError, match=r'^"no counted layer' r" 'blocks.9.layer'; layers: "
                                       r"\['blocks.0.layer', 'blocks.1.layer'"):
        ops.row("blocks.9.layer")
    x = example_input(model)
    assert x.shape == (1, 1, 28, 28) and not x.any()
    with pytest.raises(ValueError, match=r"^Linear: pass example_inputs \(a batch the model "
                                         r"takes\); only models with a config 'in_shape'"):
        example_input(nn.Linear(2, 2))
    plain = nn.Linear(2, 2)
    plain.config = {"width": 1}  # a config without in_shape
    with pytest.raises(ValueError, match="only models with a config 'in_shape' have a default"):
        example_input(plain)


def test_reduction_pct_in_percent():
    assert reduction_pct(8, 2) == 75.0
    assert reduction_pct(4, 5) == -25.0
    assert reduction_pct(0, 5) == 0.0
    assert reduction_pct(3, 3) == 0.0


def test_every_field_of_every_row_by_hand():
    rows = count_ops(build_model(CNN), (torch.zeros(3, 1, 28, 28),)).to_dict()["layers"]

    def row(name, kind, module, cin, cout, macs, weights, floats):
        binary = module.startswith("Binary")
        return {"name": name, "kind": kind, "binary": binary, "module": module,
                "in_channels": cin, "out_channels": cout, "bops": macs if binary else 0,
                "flops": 0 if binary else macs, "binary_params": weights if binary else 0,
                "float_params": floats, "ops": macs / 64 if binary else float(macs),
                "size_bits": weights if binary else 32 * floats}

    expected = [row("blocks.0.layer", "conv", "Conv2d", 1, 8, 28 * 28 * 8 * 9, 72, 72)]
    shapes = [(8, 8, 28), (8, 16, 14), (16, 16, 14), (16, 32, 7), (32, 32, 7)]
    for i, (cin, cout, hw) in enumerate(shapes, start=1):
        expected.append(row(f"blocks.{i}.layer", "conv", "BinaryConv2d", cin, cout,
                            hw * hw * cout * cin * 9, cout * cin * 9, 0))
    expected.append(row("classifier", "linear", "Linear", 288, 10, 2880, 2880, 2890))
    assert rows == expected
    for r in rows:  # counts are whole numbers: a float here is a division that should not be
        assert all(type(r[k]) is int for k in ("bops", "flops", "binary_params", "float_params"))


class Gate(nn.Module):
    """A user's binary layer holding a float submodule: the submodule is part of the binary
    layer, not a float layer of its own."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 6))
        self.mix = nn.Linear(4, 4)

    def forward(self, x):
        return self.mix(torch.sign(x) @ torch.sign(self.weight).t())


def test_a_float_module_inside_a_binary_layer_is_not_counted_apart():
    model = nn.Sequential(Gate(), nn.Linear(4, 2))
    rows = count_ops(model, torch.zeros(2, 6), binary=[Gate]).layers
    assert [(r["name"], r["bops"], r["flops"]) for r in rows] == [("0", 24, 0), ("1", 0, 8)]


def test_a_layer_that_runs_twice_is_refused_by_name():
    fc = BinaryLinear(3, 3)
    model = nn.Sequential(fc, nn.ReLU(), fc)
    with pytest.raises(ValueError, match=r"^layer '0' ran twice in one forward pass; count_ops "
                                         r"counts each layer once: shared layers are not "
                                         r"supported$"):
        count_ops(model, torch.zeros(1, 3))
