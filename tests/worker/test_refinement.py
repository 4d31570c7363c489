"""Refinement invariants (paper §2.2): what changes, what must not, and the teacher."""

import copy
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from worker.batchnorm import is_running_statistic
from worker.inference import SlicePrediction, foreground_dice, predict
from worker.nets import NetConfig, SegmentationNet
from worker.refinement import RefineConfig, refine, scan_statistics
from worker.weights import snapshot


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny nets: one thread (on a busy machine two OpenMP threads mostly wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize(("average", "epochs"), [("cumulative", 3), ("momentum", 2)])
def test_learning_rate_zero_moves_only_batchnorm_statistics(average: str, epochs: int) -> None:
    """The statistics-only variant: every parameter bitwise, every BN layer's statistics move."""
    net, slices = _net(), _slices()
    parameters = {name: p.detach().clone() for name, p in net.named_parameters()}
    means = {n: b.clone() for n, b in net.named_buffers() if n.endswith("running_mean")}
    config = RefineConfig(
        max_epochs=2, batch_size=4, learning_rate=0.0, stop_delta=-1.0,
        statistics_average=average, statistics_path=(0.25, 0.5, 1.0),  # type: ignore[arg-type]
    )  # fmt: skip
    result = refine(net, slices, 2, 0.0, config)
    assert result.epochs == epochs
    for name, parameter in net.named_parameters():
        assert torch.equal(parameter, parameters[name]), name
    for name, buffer in net.named_buffers():
        if name in means:
            assert not torch.equal(buffer, means[name]), name


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


@pytest.mark.parametrize(("min_steps", "epochs"), [(0, 1), (1, 1), (3, 1), (4, 2), (10, 4)])
def test_statistics_only_waits_for_its_minimum_steps(min_steps: int, epochs: int) -> None:
    # 12 slices in batches of 4: 3 steps per epoch; stop_delta 1.0 settles every epoch
    net, slices = _net(), _slices()
    initial = foreground_dice(*_heads(net, slices), 2)
    config = RefineConfig(
        max_epochs=50, learning_rate=0.0, batch_size=4, stop_delta=1.0,
        statistics_average="momentum", min_statistics_steps=min_steps,
    )  # fmt: skip
    result = refine(net, slices, 2, initial, config)
    assert result.stopped == "converged" and result.epochs == epochs


def test_the_cumulative_average_evaluates_its_whole_path() -> None:
    net, slices = _net(), _slices()
    initial = foreground_dice(*_heads(net, slices), 2)
    points: list[int] = []
    config = RefineConfig(
        max_epochs=1, learning_rate=0.0, batch_size=4, stop_delta=1.0, min_statistics_steps=10,
        statistics_path=(0.25, 0.5, 1.0),
    )  # fmt: skip
    assert config.statistics_average == "cumulative"
    result = refine(net, slices, 2, initial, config, lambda point, _: points.append(point))
    # neither the stopping rule, nor the minimum of steps, nor the epoch cap cuts it short
    assert result.epochs == 3 and points == [1, 2, 3] and result.stopped == "converged"


@pytest.mark.parametrize("path", [(), (0.5,), (1.0, 0.5), (0.0, 1.0), (0.5, 0.5, 1.0)])
def test_a_statistics_path_rises_to_the_scans_statistics(path: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="statistics_path"):
        RefineConfig(statistics_path=path)
    with pytest.raises(ValueError, match="statistics_passes"):
        RefineConfig(statistics_passes=0)


def _batch_statistics(
    net: SegmentationNet, batches: list[torch.Tensor]
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each BN layer's input mean and unbiased variance per channel, per batch, in train mode."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, layer in net.named_modules():
        if isinstance(layer, torch.nn.BatchNorm2d):

            def record(_: torch.nn.Module, args: tuple[torch.Tensor], key: str = name) -> None:
                x = args[0].transpose(0, 1).flatten(1)
                seen.setdefault(key, []).append((x.mean(1), x.var(1, unbiased=True)))

            hooks.append(layer.register_forward_pre_hook(record))
    net.train()
    with torch.no_grad():
        for batch in batches:
            net(batch)
    for hook in hooks:
        hook.remove()
    return seen


def test_cumulative_statistics_are_the_mean_of_every_passes_batch_statistics() -> None:
    net, slices = _net(), _slices()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    counts = {n: int(m.num_batches_tracked) for n, m in net.named_modules()
              if isinstance(m, torch.nn.BatchNorm2d)}  # fmt: skip
    config = RefineConfig(
        learning_rate=0.0, batch_size=4, precision="fp32", statistics_path=(0.5, 1.0),
        statistics_passes=2,
    )  # fmt: skip
    result = refine(net, slices, 2, 0.0, config, keep_states=True)
    # the same shuffles as refine's: its generator, seeded with config.seed
    generator = torch.Generator().manual_seed(config.seed)
    orders = [torch.randperm(12, generator=generator) for _ in range(2)]
    batches = [slices[order[i : i + 4]] for order in orders for i in range(0, 12, 4)]
    expected = _batch_statistics(_net(), batches)
    halfway = result.states[0]
    for name, layer in net.named_modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            means, variances = (torch.stack(v).mean(0) for v in zip(*expected[name], strict=True))
            assert layer.running_mean is not None and layer.running_var is not None
            torch.testing.assert_close(layer.running_mean, means)
            torch.testing.assert_close(layer.running_var, variances)
            torch.testing.assert_close(
                halfway[f"{name}.running_mean"], (start[f"{name}.running_mean"] + means) / 2
            )
            torch.testing.assert_close(
                halfway[f"{name}.running_var"], (start[f"{name}.running_var"] + variances) / 2
            )
            assert layer.momentum == 0.1  # given back
            assert int(layer.num_batches_tracked) == counts[name] + 6
    # each point's prediction is that of its statistics
    reference = _net()
    reference.load_state_dict({**start, **halfway})
    torch.testing.assert_close(
        predict(reference, slices, 4, precision="fp32").final, result.predictions[0].final
    )


def test_the_momentum_average_keeps_part_of_the_source_statistics() -> None:
    source, slices = _net(), _slices()
    config = RefineConfig(max_epochs=1, learning_rate=0.0, batch_size=4, stop_delta=-1.0)
    cumulative, momentum = _net(), _net()
    refine(cumulative, slices, 2, 0.0, config)
    refine(momentum, slices, 2, 0.0, replace(config, statistics_average="momentum"))

    def first_mean(net: SegmentationNet) -> torch.Tensor:
        layer = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert layer.running_mean is not None
        return layer.running_mean

    start = first_mean(source)
    moved = {
        "cumulative": first_mean(cumulative) - start,
        "momentum": first_mean(momentum) - start,
    }
    # three steps at momentum 0.1 move the average about 1 - 0.9**3 = 27% of the way
    ratio = moved["momentum"].norm() / moved["cumulative"].norm()
    assert 0.15 < float(ratio) < 0.4


def test_minimum_statistics_steps_leave_the_epoch_cap_and_the_self_training_alone() -> None:
    net, slices = _net(), _slices()
    initial = foreground_dice(*_heads(net, slices), 2)
    capped = RefineConfig(
        max_epochs=2, learning_rate=0.0, batch_size=4, stop_delta=1.0,
        statistics_average="momentum", min_statistics_steps=100,
    )  # fmt: skip
    assert refine(net, slices, 2, initial, capped).epochs == 2
    trained = RefineConfig(max_epochs=50, batch_size=4, stop_delta=1.0, min_statistics_steps=100)
    assert refine(_net(), slices, 2, initial, trained).epochs == 1


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


# --- the fast path (worker.inference execution plans) -----------------------------------


def _original_refine(
    net: SegmentationNet, slices: torch.Tensor, initial: float, config: RefineConfig
) -> tuple[list[float], torch.Tensor]:
    """The loop as it was before the fast path (fp32, NCHW, eval in batches of batch_size)."""
    from worker.nets import labels_from_logits, probabilities, soft_cross_entropy

    generator = torch.Generator().manual_seed(config.seed)
    net.requires_grad_(False)
    net.init_path.requires_grad_(True)
    optimizer = torch.optim.Adam(net.init_path.parameters(), lr=config.learning_rate)
    trace, previous, final = [], initial, torch.empty(0)
    for _ in range(config.max_epochs):
        net.train(config.batchnorm == "train")
        order = torch.randperm(slices.shape[0], generator=generator)
        for start in range(0, slices.shape[0], config.batch_size):
            index = order[start : start + config.batch_size]
            if index.numel() < 2 and config.batchnorm == "train":
                continue
            features = net.init_path(slices[index])
            with torch.no_grad():
                teacher = probabilities(net.body(features))
            loss = soft_cross_entropy(net.early_head(features), teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        finals, earlies = [], []
        with torch.inference_mode():
            for start in range(0, slices.shape[0], config.batch_size):
                f, e = net(slices[start : start + config.batch_size])
                finals.append(labels_from_logits(f))
                earlies.append(labels_from_logits(e))
        final = torch.cat(finals)
        dice = foreground_dice(torch.cat(earlies), final, 2)
        trace.append(dice)
        if abs(dice - previous) < config.stop_delta:
            break
        previous = dice
    net.requires_grad_(False)
    net.eval()
    return trace, final


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_fp32_precision_is_the_original_loop_bitwise(batchnorm: str) -> None:
    import copy

    net, slices = _net(), _slices()
    twin = copy.deepcopy(net)
    config = RefineConfig(max_epochs=3, batch_size=5, batchnorm=batchnorm, stop_delta=-1.0)
    trace, final = _original_refine(twin, slices, 0.0, config)
    fp32 = RefineConfig(**{**config.__dict__, "precision": "fp32"})
    result = refine(net, slices, 2, 0.0, fp32)
    assert result.dice_trace == trace
    assert torch.equal(result.prediction.final, final)
    for (name, value), other in zip(
        net.state_dict().items(), twin.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), name


@pytest.mark.parametrize("num_outputs", [1, 3])
def test_bf16_path_keeps_the_contract_and_is_deterministic(num_outputs: int) -> None:
    import copy

    net, slices = _net(num_outputs), _slices()
    twin = copy.deepcopy(net)
    objects = [id(p) for p in net.parameters()]
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    config = RefineConfig(max_epochs=2, batch_size=4, stop_delta=-1.0, precision="bf16")
    result = refine(net, slices, max(num_outputs, 2), 0.0, config, keep_states=True)
    again = refine(twin, slices, max(num_outputs, 2), 0.0, config)
    assert result.dice_trace == again.dice_trace
    assert torch.equal(result.prediction.final, again.prediction.final)
    for name, parameter in net.named_parameters():
        assert parameter.is_contiguous(), name  # the caller's layout is back
        if not name.startswith("init_path."):
            assert torch.equal(parameter, before[name]), name
    assert [id(p) for p in net.parameters()] == objects
    assert all(v.is_contiguous() for state in result.states for v in state.values())
    assert result.train_seconds > 0 and result.eval_seconds > 0
    assert result.prediction.final.dtype == torch.uint8


def test_bf16_predictions_stay_close_to_fp32() -> None:
    net, slices = _net(3), _slices()
    exact = predict(net, slices, 4, precision="fp32")
    fast = predict(net, slices, 4, precision="bf16")
    assert fast.final.shape == exact.final.shape and fast.final.dtype == torch.uint8
    assert (fast.final != exact.final).float().mean() < 0.02
    assert abs(fast.mean_entropy - exact.mean_entropy) < 0.02 * max(exact.mean_entropy, 1e-3)
    assert all(p.is_contiguous() for p in net.parameters())


def test_eval_batch_does_not_change_the_fp32_prediction() -> None:
    net, slices = _net(), _slices()
    one = predict(net, slices, 1, precision="fp32")
    whole = predict(net, slices, 12, precision="fp32", eval_batch=12)
    assert torch.equal(one.final, whole.final) and torch.equal(one.early, whole.early)


def test_a_region_restricts_labels_and_entropy_to_it() -> None:
    """``region`` (the scan without its padding) crops the labels and takes the mean entropy
    over its pixels only."""
    net, slices = _net(3), _slices()
    rows, columns = slice(3, 29), slice(5, 30)
    whole = predict(net, slices, 4, precision="fp32")
    part = predict(net, slices, 4, precision="fp32", region=(rows, columns))
    assert torch.equal(part.final, whole.final[:, rows, columns])
    assert torch.equal(part.early, whole.early[:, rows, columns])
    with torch.no_grad():
        p = torch.softmax(net(slices)[0][..., rows, columns], dim=1)
    expected = float(-(p * torch.log(p)).sum(dim=1).mean())
    assert part.mean_entropy == pytest.approx(expected, rel=1e-5)
    assert part.mean_entropy != pytest.approx(whole.mean_entropy, rel=1e-4)


@pytest.mark.parametrize("learning_rate", [0.0, 1e-3])
def test_refinement_judges_the_region_only(learning_rate: float) -> None:
    """Every epoch's (or point's) prediction, and so the stopping rule's trace and what the
    guard is shown, is of the region."""
    net, slices = _net(), _slices()
    rows, columns = slice(2, 30), slice(4, 31)
    config = RefineConfig(max_epochs=2, batch_size=4, learning_rate=learning_rate)
    result = refine(net, slices, 2, 0.0, config, keep_states=True, region=(rows, columns))
    assert result.predictions
    for prediction, dice in zip(result.predictions, result.dice_trace, strict=True):
        assert prediction.final.shape == prediction.early.shape == (12, 28, 27)
        assert dice == foreground_dice(prediction.early, prediction.final, 2)


def test_eval_batch_sizes() -> None:
    from worker.inference import Execution, eval_batch_size

    cpu = torch.device("cpu")
    exact, fast = Execution(cpu, None, False), Execution(cpu, torch.bfloat16, True)
    big, small = torch.empty(176, 1, 256, 256), torch.empty(40, 1, 32, 32)
    assert eval_batch_size(big, 20, exact, 16) == 20  # the caller's batch, as before
    assert eval_batch_size(big, 20, fast, 16) == 3  # cache-sized at 256x256
    assert eval_batch_size(small, 20, fast, 16) == 40  # never more than there is


def test_foreground_dice_counts_like_the_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    for classes in (2, 3, 4):
        a = torch.randint(0, classes + 1, (5, 7, 7), generator=generator, dtype=torch.uint8)
        b = torch.randint(0, classes + 1, (5, 7, 7), generator=generator, dtype=torch.uint8)
        scores = []
        for label in range(1, max(classes, 2)):
            total = int((a == label).sum()) + int((b == label).sum())
            if total:
                scores.append(2.0 * int(((a == label) & (b == label)).sum()) / total)
        assert foreground_dice(a, b, classes) == sum(scores) / len(scores)
    empty = torch.zeros(2, 3, 3, dtype=torch.uint8)
    assert foreground_dice(empty, empty, 2) == 1.0
    assert foreground_dice(empty + 5, empty + 5, 2) == 1.0  # out-of-range labels ignored


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_init_path_runs_once_per_step_and_once_per_eval_batch(precision: str) -> None:
    """Student and teacher share one init-path pass; the eval pass is also the segmentation."""
    net, slices = _net(), _slices()
    calls = {"train": 0, "eval": 0, "teacher_grad": 0}

    def count(module: torch.nn.Module, _i: object, _o: object) -> None:
        calls["train" if module.training else "eval"] += 1

    def teacher(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        calls["teacher_grad"] += int(out.requires_grad)

    net.init_path.register_forward_hook(count)
    net.body.register_forward_hook(teacher)
    config = RefineConfig(
        max_epochs=2, batch_size=4, stop_delta=-1.0, precision=precision, eval_batch_size=6
    )
    refine(net, slices, 2, 0.0, config)
    assert calls["train"] == 2 * 3  # 12 slices in batches of 4: 3 steps per epoch
    assert calls["eval"] == 2 * 2  # one eval pass per epoch, batches of 6
    assert calls["teacher_grad"] == 0


@pytest.mark.parametrize(("accepted", "evaluated"), [({3}, [3]), ({2}, [2, 3]), (set(), [1, 2, 3])])
def test_an_acceptance_walks_the_path_back_and_stops_where_it_accepts(
    accepted: set[int], evaluated: list[int]
) -> None:
    """From the scan's statistics back towards the start, up to the first accepted point: the
    points it evaluates are the eager path's, bitwise, so the guard keeps the same one."""
    slices = _slices()
    config = RefineConfig(learning_rate=0.0, batch_size=4, statistics_path=(0.25, 0.5, 1.0))
    eager = refine(_net(), slices, 2, 0.0, config, keep_states=True)
    calls: list[SlicePrediction] = []

    def accept(prediction: SlicePrediction) -> bool:
        calls.append(prediction)
        return 3 - len(calls) + 1 in accepted  # the points come last first: 3, 2, 1

    net = _net()
    lazy = refine(net, slices, 2, 0.0, config, keep_states=True, accept=accept)
    assert len(calls) == len(evaluated)
    assert lazy.epochs == len(evaluated)
    assert lazy.dice_trace == [eager.dice_trace[i - 1] for i in evaluated]
    assert eager.path_points == [0.25, 0.5, 1.0]
    assert lazy.path_points == [eager.path_points[i - 1] for i in evaluated]
    for state, prediction, i in zip(lazy.states, lazy.predictions, evaluated, strict=True):
        for key, value in state.items():
            torch.testing.assert_close(value, eager.states[i - 1][key], rtol=0, atol=0)
        assert torch.equal(prediction.final, eager.predictions[i - 1].final)
        assert prediction.mean_entropy == eager.predictions[i - 1].mean_entropy
    # the net ends at the scan's statistics either way
    for name, buffer in net.named_buffers():
        torch.testing.assert_close(buffer, eager.states[-1][name], rtol=0, atol=0)


def test_scan_statistics_are_the_statistics_paths_last_point_and_leave_the_net_alone() -> None:
    net, slices = _net(), _slices()
    before = snapshot(net)
    statistics = scan_statistics(net, slices, 2, passes=2)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(net).items())
    config = RefineConfig(learning_rate=0.0, statistics_passes=2, statistics_path=(1.0,))
    refined = copy.deepcopy(net)
    refine(refined, slices, 2, 0.0, config)
    expected = {k: v for k, v in snapshot(refined).items() if is_running_statistic(k)}
    assert statistics.keys() == expected.keys() and statistics
    assert all(torch.equal(statistics[k], expected[k]) for k in expected)
    assert any(not torch.equal(statistics[k], before[k]) for k in expected)
