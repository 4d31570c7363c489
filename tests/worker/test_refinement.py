"""Refinement invariants (paper §2.2): what changes, what must not, and the teacher."""

import pytest
import torch

from worker.inference import foreground_dice, predict
from worker.nets import NetConfig, SegmentationNet
from worker.refinement import RefineConfig, refine, snapshot


def _net(num_outputs: int = 1) -> SegmentationNet:
    torch.manual_seed(0)
    return SegmentationNet(NetConfig(num_outputs=num_outputs, base_channels=4)).eval()


def _slices() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(12, 1, 32, 32)


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
@pytest.mark.parametrize("num_outputs", [1, 3])
def test_only_init_path_parameters_change(batchnorm: str, num_outputs: int) -> None:
    net, slices = _net(num_outputs), _slices()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    config = RefineConfig(max_epochs=2, batch_size=4, batchnorm=batchnorm, stop_delta=-1.0)
    result = refine(net, slices, max(num_outputs, 2), 0.0, config)
    assert result.epochs == 2 and result.stopped == "max_epochs"
    changed_init = False
    for name, parameter in net.named_parameters():
        if name.startswith("init_path."):
            changed_init |= not torch.equal(parameter, before[name])
        else:  # body and early head: bitwise equal
            assert torch.equal(parameter, before[name]), name
    assert changed_init
    assert not any(p.requires_grad for p in net.parameters())


def test_frozen_batchnorm_keeps_every_buffer() -> None:
    net, slices = _net(), _slices()
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    refine(net, slices, 2, 0.0, RefineConfig(max_epochs=1, batch_size=4, batchnorm="frozen"))
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_train_batchnorm_moves_running_statistics_past_the_init_path() -> None:
    net, slices = _net(), _slices()
    mean = net.body.down[0].bn.running_mean.clone()
    refine(net, slices, 2, 0.0, RefineConfig(max_epochs=1, batch_size=4, batchnorm="train"))
    assert not torch.equal(net.body.down[0].bn.running_mean, mean)


def test_teacher_gets_no_gradient() -> None:
    """Gradients reach the init path only through the early head, never via the teacher."""
    net, slices = _net(), _slices()
    calls: list[bool] = []
    net.body.register_forward_hook(lambda _m, _i, out: calls.append(out.requires_grad))
    refine(net, slices, 2, 0.0, RefineConfig(max_epochs=1, batch_size=4, batchnorm="frozen"))
    assert calls and not any(calls)

    # The same step with the teacher attached would give a different init-path gradient:
    # make sure ours equals the student-only gradient.
    from worker.nets import probabilities, soft_cross_entropy

    net.init_path.requires_grad_(True)
    features = net.init_path(slices[:4])
    with torch.no_grad():
        teacher = probabilities(net.body(features))
    soft_cross_entropy(net.early_head(features), teacher).backward()
    student_only = [p.grad.clone() for p in net.init_path.parameters()]
    assert all(g is not None for g in student_only)
    assert all(p.grad is None for p in net.body.parameters())


def test_stops_when_self_consistency_settles() -> None:
    net, slices = _net(), _slices()
    initial = foreground_dice(*_heads(net, slices), 2)
    config = RefineConfig(max_epochs=50, batch_size=4, batchnorm="frozen", stop_delta=1.0)
    result = refine(net, slices, 2, initial, config)
    assert result.stopped == "converged" and result.epochs == 1
    assert len(result.dice_trace) == 1


def test_epoch_callback_and_kept_states() -> None:
    net, slices = _net(), _slices()
    seen: list[tuple[int, float]] = []
    config = RefineConfig(max_epochs=3, batch_size=4, stop_delta=-1.0)
    result = refine(net, slices, 2, 0.0, config, lambda e, d: seen.append((e, d)), keep_states=True)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert [d for _, d in seen] == result.dice_trace
    assert len(result.states) == len(result.predictions) == 3
    current = snapshot(net)
    assert all(torch.equal(current[k], v) for k, v in result.states[-1].items())
    assert not any(
        k.startswith(("body.", "early_head.")) and k.endswith("weight") for k in result.states[0]
    )


def _heads(net: SegmentationNet, slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prediction = predict(net, slices, 4)
    return prediction.early, prediction.final
