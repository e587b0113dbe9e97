import math

import torch
import torch.nn.functional as F

from rsitr_train.profiling import best_rates, count_flops, matmul_rates


def test_count_flops_matmul_is_two_mkn():
    m, k, n = 7, 13, 5
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert count_flops(lambda: a @ b) == 2 * m * k * n


def test_count_flops_conv2d_matches_hand_formula():
    batch, c_in, c_out, kh, kw, size = 2, 3, 4, 3, 2, 9
    x = torch.randn(batch, c_in, size, size)
    w = torch.randn(c_out, c_in, kh, kw)
    h_out = (size + 2 * 1 - kh) // 2 + 1
    w_out = (size + 2 * 1 - kw) // 2 + 1
    assert count_flops(lambda: F.conv2d(x, w, stride=2, padding=1)) == 2 * c_out * c_in * kh * kw * h_out * w_out * batch


def test_matmul_rates_gives_four_positive_finite_rates():
    rates = matmul_rates(seconds=0.05, n=128)
    assert set(rates) == {"mm_fp32", "mm_bf16", "onednn_fp32", "onednn_bf16"}
    assert all(math.isfinite(r) and r > 0 for r in rates.values())


def test_best_rates_keeps_the_higher_per_key():
    assert best_rates({"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 2.0}) == {"a": 3.0, "b": 5.0}


def test_format_rates_names_each_rate() -> None:
    from rsitr_train.profiling import format_rates

    line = format_rates({"mm_fp32": 221.4, "mm_bf16": 931.0, "onednn_fp32": 483.0, "onednn_bf16": 985.6}, "same run")
    assert line == "matmul rate (GFLOP/s, same run): torch.mm fp32 221, torch.mm bf16 931, oneDNN fp32 483, oneDNN bf16 986"
