import numpy as np
import pytest
import torch

from oaq_search import grids
from oaq_search.errors import UserError
from oaq_search.oaq import (DEFAULT_THRESHOLDS, MIDRISE_THRESHOLDS, WeightQuantizer, choose_outlier_settings,
                            dequantize, fake_quantize_weight, int8_offset, normalize, quantize_weight)


def heavy_tailed(shape=(16, 8, 3, 3)):
    """Trained conv weights look like this: a bulk near zero and a few far outliers."""
    return torch.distributions.StudentT(3.0).sample(torch.Size(shape)) * 0.05


@pytest.mark.parametrize("grid", grids.GRIDS)
@pytest.mark.parametrize("bits", range(2, 9))
def test_mid_tread_grids_have_two_to_the_b_minus_one_levels_and_midrise_two_to_the_b(grid, bits):
    levels = grids.levels(grid, bits)
    representable = not (grid == "ipot" and 2 ** (bits - 1) - 2 >= 53)  # 1 - 2^-53 == 1 in float64
    expected = 2**bits if grid == "midrise" else 2**bits - 1
    assert (len(levels.unique()) == expected) == representable
    assert levels[0] == -1 and levels[-1] == 1 and bool((levels == 0).any()) == (grid != "midrise")
    low, high = grids.code_range(grid, bits)
    codes = torch.arange(low, high + 1, dtype=torch.float64)
    assert torch.equal(grids.codes_to_values(codes, grid, bits), levels)  # every code is a level, in order
    assert grids.is_ternary(grid, bits) == (bits == 2 and grid != "midrise")


@pytest.mark.parametrize("grid", grids.GRIDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_is_idempotent_and_lands_on_levels(grid, bits):
    """Q(Q(w)) = Q(w) with the quantizer's parameters fixed: values on the grid stay put."""
    torch.manual_seed(bits)
    x = torch.rand(1000) * 2 - 1
    once = grids.quantize(x, grid, bits)
    assert torch.equal(grids.quantize(once, grid, bits), once)
    quantizer = WeightQuantizer(bits, grid, "oaq", scale_factor=0.3)
    quantized = quantize_weight(heavy_tailed(), quantizer)
    rebuilt = dequantize(quantized, quantizer)
    again = grids.level_index((rebuilt - quantized.offset) / quantized.scale, grid, bits)
    assert torch.equal(again.to(torch.int8), quantized.codes)
    assert quantized.codes.unique().numel() <= len(grids.levels(grid, bits))


def test_ties_round_away_from_zero():
    x = torch.tensor([0.5, -0.5, 0.25, -0.25]) / 1.0
    assert grids.level_index(x, "uniform", 2).tolist() == [1, -1, 0, 0]
    # PoT 3 bits: levels 0, 0.25, 0.5, 1 -> midpoint 0.375 goes up to 0.5
    assert grids.codes_to_values(grids.level_index(torch.tensor([0.375, -0.375]), "pot", 3), "pot", 3).tolist() == [0.5, -0.5]
    # midrise 2 bits: levels -1, -1/3, 1/3, 1; zero goes up, the midpoints 2/3 go outward
    assert grids.codes_to_values(grids.level_index(torch.tensor([0.0, 2 / 3, -2 / 3]), "midrise", 2), "midrise", 2
                                 ).tolist() == pytest.approx([1 / 3, 1.0, -1.0])


def test_scale_factor_one_is_vanilla_max_range():
    torch.manual_seed(0)
    weight = heavy_tailed()
    oaq = fake_quantize_weight(weight, WeightQuantizer(4, method="oaq", scale_factor=1.0, threshold=1.0))
    vanilla = fake_quantize_weight(weight, WeightQuantizer(4, method="vanilla"))
    assert torch.allclose(oaq, vanilla, atol=1e-7)


def test_scale_factor_zero_clips_at_the_threshold():
    torch.manual_seed(0)
    weight = heavy_tailed()
    z, mu, sigma = normalize(weight, per_channel=False)
    z = z + mu / sigma  # a uniform 8-bit grid is centred on zero (int8 holds no offset beside its 255 levels)
    quantized = fake_quantize_weight(weight, WeightQuantizer(8, method="oaq", scale_factor=0.0, threshold=2.0))
    assert float((quantized / sigma).abs().max()) == pytest.approx(2.0, rel=1e-5)
    inside = z.abs() < 1.9
    assert torch.allclose(quantized[inside], weight[inside], atol=float(sigma) * 2 / 127)


def test_error_falls_as_bits_rise():
    torch.manual_seed(0)
    weight = heavy_tailed((64, 32, 3, 3))
    errors = [float(((fake_quantize_weight(weight, WeightQuantizer(b, method="vanilla")) - weight) ** 2).mean())
              for b in range(2, 9)]
    assert errors == sorted(errors, reverse=True)


def test_per_channel_statistics_follow_each_output_channel():
    torch.manual_seed(0)
    weight = heavy_tailed((4, 8, 3, 3)) * torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(4, 1, 1, 1)
    per_tensor = fake_quantize_weight(weight, WeightQuantizer(4, method="vanilla"))
    per_channel = fake_quantize_weight(weight, WeightQuantizer(4, method="vanilla", per_channel=True))
    assert float((per_channel - weight)[0].abs().max()) < float((per_tensor - weight)[0].abs().max())
    assert quantize_weight(weight, WeightQuantizer(4, per_channel=True)).scale.shape == (4,)


def test_uniform_vanilla_matches_torch_fake_quantize():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3)
    # Vanilla uniform on z = (w - mu)/sigma with range R is affine fake quantization with
    # scale sigma*R/m and zero point mu expressed in steps, for integers in [-m, m] (mu as held: on the
    # lattice int8 codes reach, `int8_offset`).
    quantizer = WeightQuantizer(4, method="vanilla")
    z, _, sigma = normalize(weight, per_channel=False)
    mu = quantize_weight(weight, quantizer).offset
    m = 2 ** 3 - 1
    scale = float(sigma * z.abs().max() / m)
    shifted = weight - mu  # torch's zero point must be an integer, so compare on the centred weight
    ours = fake_quantize_weight(weight, quantizer) - mu
    theirs = torch.fake_quantize_per_tensor_affine(shifted, scale, 0, -m, m)
    assert torch.allclose(ours, theirs, atol=1e-6)

    per_channel = WeightQuantizer(4, method="vanilla", per_channel=True)
    z, _, sigma = normalize(weight, per_channel=True)
    mu = quantize_weight(weight, per_channel).offset.reshape(-1, 1, 1, 1)
    scales = (sigma * z.abs().amax(dim=(1, 2, 3), keepdim=True) / m).flatten()
    ours = fake_quantize_weight(weight, per_channel) - mu
    theirs = torch.fake_quantize_per_channel_affine(weight - mu, scales, torch.zeros(8, dtype=torch.int32), 0, -m, m)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_codes_scale_and_offset_rebuild_the_fake_quantized_weight():
    torch.manual_seed(0)
    weight = heavy_tailed()
    for quantizer in (WeightQuantizer(3, "pot", scale_factor=0.2), WeightQuantizer(5, "ipot", per_channel=True)):
        assert torch.allclose(dequantize(quantize_weight(weight, quantizer), quantizer),
                              fake_quantize_weight(weight, quantizer), atol=1e-6)


def test_constant_and_tiny_layers_quantize_exactly():
    for weight in (torch.full((4, 2, 1, 1), 0.3), torch.tensor([[0.7]])):
        assert torch.allclose(fake_quantize_weight(weight, WeightQuantizer(2)), weight)


def test_non_finite_weights_name_the_layer():
    weight = torch.ones(3, 3)
    weight[1, 1] = float("nan")
    with pytest.raises(UserError, match="layer layer3.0.conv1 has NaN"):
        fake_quantize_weight(weight, WeightQuantizer(4), "layer3.0.conv1")


def test_gradient_reaches_the_scale_factor():
    torch.manual_seed(0)
    weight = heavy_tailed()
    s = torch.tensor(0.3, requires_grad=True)
    fake_quantize_weight(weight, WeightQuantizer(3, threshold=1.5), scale_factor=s).pow(2).sum().backward()
    assert s.grad is not None and float(s.grad) != 0


def test_invalid_settings_are_rejected():
    for kwargs, pattern in [({"bits": 9}, "from 2 to 8"), ({"bits": 4, "grid": "log"}, "unknown grid"),
                            ({"bits": 4, "scale_factor": 1.5}, r"in \[0, 1\]"), ({"bits": 4, "method": "x"}, "unknown method")]:
        with pytest.raises(UserError, match=pattern):
            WeightQuantizer(**kwargs)


def test_data_free_choice_is_never_worse_than_vanilla():
    torch.manual_seed(0)
    weight = heavy_tailed((32, 16, 3, 3))
    chosen = choose_outlier_settings(weight, WeightQuantizer(3))
    error = float(((fake_quantize_weight(weight, chosen) - weight) ** 2).sum())
    vanilla = float(((fake_quantize_weight(weight, WeightQuantizer(3, method="vanilla")) - weight) ** 2).sum())
    assert error <= vanilla and chosen.scale_factor < 1.0  # heavy tails: pulling outliers in pays


def test_default_thresholds_are_gaussian_mse_optimal():
    """Re-derive both tables: the clip minimising E[(x - Q(x))^2] for x ~ N(0, 1) on each grid."""
    from scipy import optimize, stats

    x = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    density = stats.norm.pdf(x.numpy())

    def mse(threshold, grid, bits):
        q = threshold * grids.codes_to_values(grids.level_index(x / threshold, grid, bits), grid, bits)
        return np.trapezoid((x - q).numpy() ** 2 * density, x.numpy())

    for grid, table in (("uniform", DEFAULT_THRESHOLDS), ("midrise", MIDRISE_THRESHOLDS)):
        for bits, threshold in table.items():
            best = optimize.minimize_scalar(lambda t: mse(t, grid, bits), bounds=(0.5, 8), method="bounded").x
            assert best == pytest.approx(threshold, abs=0.01), (grid, bits)

def test_the_int8_offset_stays_on_the_weights_device():
    """Reconstruction and QAT run on a GPU when there is one; the meta device stands in for it here."""
    mu, step = torch.randn(8, 1, 1, 1, device="meta"), torch.rand(8, 1, 1, 1, device="meta")
    assert int8_offset(mu, step, "uniform", 4).device.type == "meta"
