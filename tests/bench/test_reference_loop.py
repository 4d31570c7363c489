"""The speed baseline really is the authors' loop, and the benchmark compares like with like."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from bench.adapt_speed import Settings, fit, fresh_net, run_method
from bench.reference_loop import ReferenceConfig, dice_numpy, reference_loss, reference_refine
from sitefit import defaults
from worker.inference import foreground_dice
from worker.nets import NetConfig, SegmentationNet, probabilities, soft_cross_entropy
from worker.weights import to_numpy


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny nets: one thread. On a busy machine two OpenMP threads spend their time waiting
    for each other (a 20x slow-down measured on 32x32 slices), and these nets gain nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(num_outputs: int = 1) -> SegmentationNet:
    torch.manual_seed(0)
    net = SegmentationNet(NetConfig(num_outputs=num_outputs, base_channels=4)).train()
    net.requires_grad_(False)
    net.init_path.requires_grad_(True)
    return net


def _slices(count: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(count, 1, 32, 32)


def _init_grads(net: SegmentationNet) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in net.init_path.parameters() if p.grad is not None]
    net.zero_grad(set_to_none=True)
    return grads


def test_teacher_is_attached_and_backward_runs_through_the_body() -> None:
    for num_outputs in (1, 3):
        net, x = _net(num_outputs), _slices()
        seen: list[torch.Tensor] = []

        def keep_grad(
            _m: torch.nn.Module, _i: object, out: torch.Tensor, seen: list[torch.Tensor] = seen
        ) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: seen.append(g.detach().clone()))

        handle = net.body.register_forward_hook(keep_grad)
        reference_loss(net, x).backward()
        handle.remove()
        assert seen and seen[0].abs().sum() > 0  # gradient reached the teacher's logits
        reference = _init_grads(net)

        # The same loss split in two: the student path alone (sitefit's step) and the
        # teacher path alone; the reference's init-path gradient is their sum.
        features = net.init_path(x)
        teacher = probabilities(net.body(features)).detach()
        soft_cross_entropy(net.early_head(features), teacher).backward()
        student_only = _init_grads(net)
        student = net.early_head(net.init_path(x)).detach()
        soft_cross_entropy(student, probabilities(net(x)[0])).backward()
        teacher_only = _init_grads(net)

        assert len(reference) == len(student_only) == len(list(net.init_path.parameters()))
        for r, s, t in zip(reference, student_only, teacher_only, strict=True):
            torch.testing.assert_close(r, s + t, rtol=1e-4, atol=1e-6)
        assert any(t.abs().sum() > 0 for t in teacher_only)
        assert not all(torch.allclose(r, s) for r, s in zip(reference, student_only, strict=True))
        assert all(p.grad is None for p in net.body.parameters())  # input gradients only


def test_reference_loop_runs_the_authors_passes() -> None:
    net, x = _net(), _slices(10)
    body_before = {k: v.clone() for k, v in net.body.state_dict().items() if "weight" in k}
    head_before = {k: v.clone() for k, v in net.early_head.state_dict().items()}
    init_before = {k: v.clone() for k, v in net.init_path.state_dict().items() if "conv" in k}
    calls = {"init_train": 0, "body_train": 0, "body_grad": 0, "eval": 0}

    def count_init(module: torch.nn.Module, _i: object, _o: object) -> None:
        calls["init_train" if module.training else "eval"] += 1

    def count_body(module: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        if module.training:
            calls["body_train"] += 1
            calls["body_grad"] += int(out.requires_grad)

    net.init_path.register_forward_hook(count_init)
    net.body.register_forward_hook(count_body)
    config = ReferenceConfig(max_epochs=2, batch_size=4, stop_delta=-1.0)
    result = reference_refine(net, x, 2, config)
    assert result.epochs == 2 and result.stopped == "max_epochs"
    steps_per_epoch = 3  # batches of 4, 4, 2 slices
    assert calls["init_train"] == 2 * 2 * steps_per_epoch  # init path twice per step
    assert calls["body_train"] == calls["body_grad"] == 2 * steps_per_epoch  # attached teacher
    # eval passes (batches of 4: 3 per pass): before, after each epoch, and the segmentation
    assert calls["eval"] == (1 + 2 + 1) * 3
    assert result.final.shape == (10, 32, 32) and result.final.dtype == torch.uint8
    for k, v in net.body.state_dict().items():
        if k in body_before:
            assert torch.equal(v, body_before[k]), k
    for k, v in net.early_head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    assert any(
        not torch.equal(v, init_before[k])
        for k, v in net.init_path.state_dict().items()
        if k in init_before
    )
    assert set(result.seconds) == {"initial", "train", "evaluate", "segment"}


def test_reference_dice_is_the_engines_dice() -> None:
    rng = np.random.default_rng(0)
    for classes in (2, 4):
        a = rng.integers(0, classes, (6, 9, 9)).astype(np.uint8)
        b = rng.integers(0, classes, (6, 9, 9)).astype(np.uint8)
        expected = foreground_dice(torch.from_numpy(a), torch.from_numpy(b), classes)
        assert dice_numpy(a, b, classes) == expected
    empty = np.zeros((2, 3, 3), np.uint8)
    assert dice_numpy(empty, empty, 2) == 1.0


def test_both_loops_start_from_the_same_weights_and_batches() -> None:
    tiny = SegmentationNet(NetConfig(num_outputs=1, base_channels=4))
    tensors = to_numpy(tiny)
    x = _slices(12)
    seen: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}

    for method in ("reference", "sitefit"):
        net = fresh_net(tiny.config, tensors, torch.device("cpu"))

        def first_training_forward(
            module: torch.nn.Module,
            inputs: tuple[torch.Tensor, ...],
            method: str = method,
            net: SegmentationNet = net,
        ) -> None:
            if module.training and method not in seen:
                weights = {
                    k: v.detach().clone(memory_format=torch.contiguous_format)
                    for k, v in net.state_dict().items()
                }
                seen[method] = (weights, inputs[0].detach().float().clone())

        net.init_path.register_forward_pre_hook(first_training_forward)
        settings = Settings(max_epochs=1, batch_size=4, stop_delta=-1.0, precision="fp32")
        run_method(method, net, x, 2, settings)

    ref_weights, ref_batch = seen["reference"]
    site_weights, site_batch = seen["sitefit"]
    for key, value in ref_weights.items():
        assert torch.equal(value, site_weights[key]), key
        assert np.array_equal(value.numpy(), tensors[key]), key
    assert torch.equal(ref_batch, site_batch)  # same seeded shuffle: the same first batch


def test_sitefit_run_keeps_the_product_contract() -> None:
    tiny = SegmentationNet(NetConfig(num_outputs=1, base_channels=4))
    net = fresh_net(tiny.config, to_numpy(tiny), torch.device("cpu"))
    before = copy.deepcopy(net.body.state_dict())
    run = run_method("sitefit", net, _slices(12), 2, Settings(2, 4, -1.0, "auto"))
    # the product default: the statistics path's points evaluated stand for epochs
    assert 1 <= run.epochs <= len(defaults.REFINE_STATISTICS_PATH)
    assert run.final.shape == (12, 32, 32)
    momentum = run_method("sitefit", fresh_net(tiny.config, to_numpy(tiny), torch.device("cpu")),
                          _slices(12), 2, Settings(2, 4, -1.0, "auto",
                                                   statistics_average="momentum"))  # fmt: skip
    assert momentum.epochs == 2
    assert {"initial", "train", "evaluate", "guard"} <= set(run.seconds)
    weights = {k: v for k, v in net.body.state_dict().items() if "running" not in k}
    assert all(torch.equal(v, before[k]) for k, v in weights.items() if "num_batches" not in k)


def test_fit_pads_and_crops_about_the_centre() -> None:
    array = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    out, offsets = fit(array, (3, 6, 3), -1.0)
    assert out.shape == (3, 6, 3) and offsets == [1, -1, 0]
    assert np.array_equal(out[:, 1:5, :], array[1:4])
    assert (out[:, 0] == -1).all() and (out[:, 5] == -1).all()
