"""The honest peak: convolution FLOPs are counted alike for the peak and for the workloads measured against
it (grouped convolutions' backward included), and the peak keeps every shape it times."""
import pytest
import torch

from diffuseseg import flops


@pytest.mark.parametrize("shape", [(2, 8, 16, 12, 3, 1), (2, 12, 6, 10, 1, 1), (2, 12, 12, 8, 3, 3)])
def test_conv_flops_match_the_counter_that_measures_workloads(shape):
    # the grouped case is the conv heads' 3x3 layers: torch's own formula counts their weight gradient 3 times
    batch, c_in, c_out, side, kernel, groups = shape
    x = torch.randn(batch, c_in, side, side, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, kernel, kernel, requires_grad=True)
    with flops.flop_counter() as forward:
        y = torch.nn.functional.conv2d(x, w, padding=kernel // 2, groups=groups)
    assert forward.get_total_flops() == flops.conv_flops(*shape)
    with flops.flop_counter() as both:
        torch.nn.functional.conv2d(x, w, padding=kernel // 2, groups=groups).sum().backward()
    assert both.get_total_flops() == 3 * flops.conv_flops(*shape)  # what conv_gflops(backward=True) counts


def test_peak_is_the_best_of_every_shape_forward_and_backward(monkeypatch):
    monkeypatch.setattr(flops, "_PEAK_GEMMS", ((64, 64, 64),))
    monkeypatch.setattr(flops, "_PEAK_CONVS", ((2, 8, 8, 16, 3, 1), (2, 12, 12, 8, 3, 3)))
    peak, figures = flops.peak_gflops("cpu", repeats=1, rounds=2)
    assert set(figures) == {"gemm 64x64x64", "conv3x3 2x8->8x16^2 fwd", "conv3x3 2x8->8x16^2 fwd+bwd",
                            "conv3x3 2x12->12x8^2/3 fwd", "conv3x3 2x12->12x8^2/3 fwd+bwd"}
    assert all(v > 0 for v in figures.values()) and peak == max(figures.values())


def test_cpu_attention_is_counted_forward_and_backward():
    # torch's counter knows only the CUDA attention kernels; on a CPU it counted attention as free
    batch, heads, tokens, head_dim = 2, 4, 64, 16
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, requires_grad=True) for _ in range(3))
    with flops.flop_counter() as forward:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert forward.get_total_flops() == 4 * batch * heads * tokens * tokens * head_dim
    with flops.flop_counter() as both:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    assert both.get_total_flops() == flops.attention_flops(batch * heads, tokens, tokens, head_dim) \
        + flops.attention_flops(batch * heads, tokens, tokens, head_dim, backward=True)
    assert out.shape == q.shape
