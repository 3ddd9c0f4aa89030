"""The benchmark U-Net: parameter count, shapes, Keras parity details, memory formats, config."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_lc.config import from_dict
from dist_lc.model import UNet, UpConv, build_network, count_parameters, spectral_indices
from lc_common.errors import InputError


@pytest.fixture(scope="module")
def unet() -> UNet:
    torch.manual_seed(0)
    return UNet()


def test_benchmark_parameter_count(unet):
    # Keras model.summary() of framework/model.py UNet(num_layers=2), 4 bands, 10 classes.
    assert count_parameters(unet) == 984_234


def test_parameter_count_formula_for_other_depths():
    f, u, bn = 64, 96, lambda c: 2 * c
    conv = lambda cin, cout, k=3: cin * k * k * cout + cout  # noqa: E731
    block = lambda cin, cout: bn(cin) + conv(cin, cout)  # noqa: E731
    for layers in (0, 1, 3):
        expected = (conv(4, f) + 2 * block(f, f) + layers * 3 * block(f, f) + 3 * block(f, f)
                    + layers * (block(2 * f, u) + block(u, f) + block(f, f))
                    + block(2 * f, u) + block(u, f) + conv(f, 10, 1))
        assert count_parameters(UNet(num_layers=layers)) == expected


def test_group_norm_variant_has_same_count_and_no_batchnorm():
    model = UNet(norm="group", groups=8)
    assert count_parameters(model) == 984_234
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 19


@pytest.mark.parametrize("shape", [(2, 4, 32, 32), (1, 4, 16, 40)])
def test_output_shape_is_logits_per_pixel(unet, shape):
    out = unet(torch.rand(shape))
    assert out.shape == (shape[0], 10, *shape[2:])
    assert out.dtype == torch.float32


def test_rejects_sizes_not_divisible_by_the_pooling(unet):
    with pytest.raises(ValueError, match="divisible by 8"):
        unet(torch.rand(1, 4, 20, 32))


def test_keras_batchnorm_defaults(unet):
    bns = [m for m in unet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 19
    assert all(bn.momentum == 0.01 and bn.eps == 1e-3 for bn in bns)


def test_he_normal_init_matches_keras():
    torch.manual_seed(1)
    model = UNet(init="he_normal")
    conv = model.down[0][1][1]  # a 64 -> 64 3x3 convolution, 36,864 weights
    std = math.sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(std, rel=0.03)
    assert conv.weight.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7
    assert torch.count_nonzero(conv.bias) == 0
    limit = math.sqrt(6 / (64 * 9 + 64 * 9))  # glorot_uniform of the transposed convolutions
    up = model.bottom[2][1].conv
    assert up.weight.abs().max().item() <= limit
    assert torch.count_nonzero(up.bias) == 0


def test_upconv_uses_tensorflow_same_alignment():
    # TensorFlow: input pixel (i, j) lands on output rows 2i..2i+2 and columns 2j..2j+2 (cropped to 2H x 2W).
    up = UpConv(1, 1)
    with torch.no_grad():
        up.conv.weight.copy_(torch.arange(1.0, 10.0).view(1, 1, 3, 3))
        up.conv.bias.zero_()
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = 1.0
    out = up(x)[0, 0]
    assert out.shape == (8, 8)
    assert torch.equal(out[2:5, 4:7], torch.arange(1.0, 10.0).view(3, 3))
    assert out.sum() == 45
    corner = torch.zeros(1, 1, 4, 4)
    corner[0, 0, 3, 3] = 1.0  # the last row/column of the kernel falls outside and is cropped
    assert torch.equal(up(corner)[0, 0, 6:, 6:], torch.tensor([[1.0, 2.0], [4.0, 5.0]]))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_upconv_equals_cropped_unpadded_transposed_conv(memory_format):
    # The padded-kernel computation must equal the definition: unpadded ConvTranspose2d cropped to 2H x 2W,
    # in values and in gradients.
    torch.manual_seed(0)
    up = UpConv(6, 5)
    x = torch.randn(2, 6, 8, 12).to(memory_format=memory_format).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out = up(x)
    ref = up.conv(ref_x)[..., :16, :24]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_w = torch.autograd.grad(out.square().sum(), [x, up.conv.weight, up.conv.bias])
    ref_w = torch.autograd.grad(ref.square().sum(), [ref_x, up.conv.weight, up.conv.bias])
    for g, r in zip(grad_w, ref_w):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_channels_last_matches_contiguous(unet):
    unet.eval()
    x = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        ref = unet(x)
        model_cl = UNet()
        model_cl.load_state_dict(unet.state_dict())
        model_cl.eval().to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_train_step_updates_batchnorm_and_gradients_are_finite():
    torch.manual_seed(0)
    model = UNet(num_layers=1)
    bn = model.c1[0]
    before = bn.running_mean.clone()
    out = model(torch.rand(2, 4, 16, 16))
    out.logsumexp(1).mean().backward()
    assert not torch.equal(before, bn.running_mean)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_torch_init_option_differs_from_keras():
    torch.manual_seed(0)
    default = UNet(init="torch")
    assert torch.count_nonzero(default.stem[0].bias) > 0  # PyTorch's default bias init is not zero


def model_config(**keys):
    return from_dict({"model": keys}).model


def test_build_network_from_the_model_section():
    assert count_parameters(build_network(model_config()).unet) == 984_234   # the defaults: the benchmark's
    small = build_network(model_config(num_layers=1, filters=16, upconv_filters=24, norm="group", groups=4))
    assert small(torch.rand(1, 4, 16, 16)).shape == (1, 10, 16, 16)


@pytest.mark.parametrize("keys, message", [
    ({"filter": 64}, "unknown config key 'model.filter' (did you mean 'model.filters'?)"),
    ({"norm": "layer"}, "'model.norm': 'layer' is not one of batch, group"),
    ({"init": "xavier"}, "'model.init': 'xavier' is not one of he_normal, torch"),
    ({"norm": "group", "groups": 7}, "not divisible by model.groups 7"),
    ({"num_layers": 9}, "out of range"),
])
def test_a_bad_model_section_is_refused_by_the_config(keys, message):
    with pytest.raises(InputError) as err:
        model_config(**keys)
    assert message in str(err.value)


def test_spectral_indices_add_two_input_channels_computed_from_raw_bands():
    image = torch.zeros(1, 4, 16, 16)
    image[0, :, 0, 0] = torch.tensor([1000.0, 2000.0, 500.0, 3000.0])   # R, G, B, NIR
    idx = spectral_indices(image)
    assert idx.shape == (1, 2, 16, 16)
    assert idx[0, 0, 0, 0].item() == pytest.approx((3000 - 1000) / 4000)   # NDVI
    assert idx[0, 1, 0, 0].item() == pytest.approx((2000 - 3000) / 5000)   # NDWI
    assert idx[0, :, 1, 1].abs().sum() == 0                                   # empty pixel: 0, not NaN
    cfg = {"num_layers": 1, "filters": 8, "upconv_filters": 8}
    net = build_network(model_config(**cfg, indices=True))
    assert net.unet.stem[0].in_channels == 6
    assert net(image).shape == (1, 10, 16, 16)
    plain = build_network(model_config(**cfg, indices=False))
    assert plain.unet.stem[0].in_channels == 4


def test_training_flops_are_three_forwards_as_counted():
    """The one FLOP count: forward and backward counted by torch agree with the 3 × forward rule
    that MFU figures use (a few % under it: the backward skips the input's gradient, a larger share of
    a network this narrow than of the benchmark's, where it is 0.3 %)."""
    from dist_lc.config import ModelConfig
    from dist_lc.flops import forward_flops, training_flops

    cfg = ModelConfig(filters=8, upconv_filters=8)
    forward = forward_flops(cfg, 64)
    assert forward > 0 and training_flops(cfg, 64) == 3 * forward
    assert 0.97 < training_flops(cfg, 64, counted=True) / (3 * forward) < 1
