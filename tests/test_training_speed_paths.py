"""The faster training-step paths give the results of the paths they replace.

* ``RecurrentTextEncoder.encode`` (sorted-batch recurrence with a hand-written backward) against
  ``encode_packed`` (``nn.GRU`` over a packed sequence, the previous implementation): states,
  final states and every gradient, in float64 where only summation order differs;
* padding never reaches a caption's states or gradients;
* DOVE's training loss and gradients through both GRU paths (float32, 1e-5);
* fused Adam (the trainer's optimiser) against the default per-parameter Adam.
"""

from __future__ import annotations

import pytest
import torch

from rsitr.models import create_model
from rsitr.models.layers import RecurrentTextEncoder, reversal_index, take_steps
from rsitr.precision import autocast

LENGTHS = torch.tensor([9, 3, 0, 5, 1, 9, 2])  # unsorted, with a tie, an empty caption and a one-word one


def _grads(states, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(-1, 1, states.outputs.numel(), dtype=states.outputs.dtype).view_as(states.outputs)
    loss = (states.outputs * weights).sum() + states.final.square().sum()
    return torch.autograd.grad(loss, inputs)


def test_reversal_index_reverses_within_length_and_is_its_own_inverse() -> None:
    index = reversal_index(torch.tensor([3, 1, 4]), 4)
    assert index.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]
    x = torch.arange(24.0).view(2, 4, 3)
    rev = reversal_index(torch.tensor([2, 4]), 4)
    assert torch.equal(take_steps(take_steps(x, rev), rev), x)
    assert torch.equal(take_steps(x, rev)[0, :2], x[0, [1, 0]])


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, True), (2, True), (1, False), (2, False)])
def test_sorted_recurrence_matches_packed_gru(layers: int, bidirectional: bool) -> None:
    torch.manual_seed(0)
    gru = RecurrentTextEncoder(6, 5, layers, bidirectional).double()
    x = torch.randn(len(LENGTHS), 9, 6, dtype=torch.double, requires_grad=True)
    new, old = gru.encode(x, LENGTHS), gru.encode_packed(x, LENGTHS)
    torch.testing.assert_close(new.outputs, old.outputs, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.final, old.final, rtol=0, atol=1e-12)
    assert torch.equal(new.mask, old.mask)
    inputs = [x, *gru.parameters()]
    for got, want in zip(_grads(new, inputs), _grads(old, inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_padding_never_reaches_a_caption() -> None:
    torch.manual_seed(1)
    gru = RecurrentTextEncoder(4, 3).double()
    x = torch.randn(len(LENGTHS), 9, 4, dtype=torch.double, requires_grad=True)
    noisy = x.detach().clone()
    pad = ~(torch.arange(9)[None, :] < LENGTHS.clamp(min=1)[:, None])
    noisy[pad] = 1e3
    noisy.requires_grad_(True)
    a, b = gru.encode(x, LENGTHS), gru.encode(noisy, LENGTHS)
    torch.testing.assert_close(a.outputs, b.outputs, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.final, b.final, rtol=0, atol=1e-12)
    assert not a.outputs[pad].any()  # zero past each caption
    (grad,) = _grads(b, [noisy])
    assert not grad[pad].any()


def test_sorted_recurrence_under_bf16_autocast_stays_near_float32() -> None:
    torch.manual_seed(2)
    gru = RecurrentTextEncoder(16, 32)
    x = torch.randn(len(LENGTHS), 9, 16)
    exact = gru.encode(x, LENGTHS)
    with autocast("bf16"):
        low, packed = gru.encode(x, LENGTHS), gru.encode_packed(x, LENGTHS)
    assert low.outputs.dtype == torch.float32  # states are kept in the weights' dtype
    err_new = (low.outputs - exact.outputs).abs().max().item()
    err_old = (packed.outputs.float() - exact.outputs).abs().max().item()
    assert err_new < 0.05
    assert err_new <= 2 * err_old + 1e-3  # no worse than bf16 autocast of nn.GRU itself


def _dove_loss_and_grads(model, packed: bool):
    if packed:
        model.gru.encode = model.gru.encode_packed
    torch.manual_seed(3)
    n = 6
    features = {f"level{i}": torch.randn(n, c) for i, c in enumerate([64, 128, 256, 512], start=1)}
    features["regions"] = torch.randn(n, 5, 512)
    features["region_mask"] = torch.ones(n, 5, dtype=torch.bool)
    lengths = torch.tensor([7, 2, 5, 7, 1, 4])
    tokens = torch.randint(1, 50, (n, 7))
    loss = model.training_loss(features, tokens, lengths, torch.arange(n))["loss"]
    return loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def test_dove_training_loss_and_gradients_unchanged() -> None:
    dims = {"level_channels": [64, 128, 256, 512], "region_channels": 512}
    losses, grads = [], []
    for packed in (False, True):
        torch.manual_seed(0)
        model = create_model("dove-s", dims, 50)
        model.train()
        loss, g = _dove_loss_and_grads(model, packed)
        losses.append(loss)
        grads.append(g)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_adam_matches_default_adam() -> None:
    torch.manual_seed(4)
    params = [torch.randn(7, 5), torch.randn(5)]
    runs = []
    for fused in (False, True):
        ps = [p.clone().requires_grad_(True) for p in params]
        opt = torch.optim.Adam(ps, lr=1e-2, fused=fused)
        for step in range(3):
            for p in ps:
                p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        assert not torch.equal(a, params[0] if a.dim() == 2 else params[1])  # the update moved them
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
