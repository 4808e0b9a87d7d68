import torch

from bnnprune.core.binary import BinaryConv2d, BinaryLinear, binarize, clip_latent_weights


def test_sign_maps_zero_to_plus_one_and_ste_passes_gradient_inside_unit_interval():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    y = binarize(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_binary_conv_pads_binarised_input_with_plus_one():
    conv = BinaryConv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(0.3)  # all +1
    x = torch.full((1, 1, 4, 4), -0.2)  # all -1
    out = conv(x)
    # corner: 4 real taps (-1) and 5 padded taps (+1)
    assert out[0, 0, 0, 0].item() == 1.0
    assert out[0, 0, 1, 1].item() == -9.0


def test_binary_linear_matches_manual_sign_product_and_clipping():
    lin = BinaryLinear(5, 3)
    with torch.no_grad():
        lin.weight.mul_(10)
    x = torch.randn(4, 5)
    expected = torch.where(x >= 0, 1.0, -1.0) @ torch.where(lin.weight >= 0, 1.0, -1.0).T
    assert torch.equal(lin(x), expected)
    clip_latent_weights(lin)
    assert lin.weight.abs().max().item() <= 1.0
