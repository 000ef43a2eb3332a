"""ModelEMA: against a per-tensor reference loop for every buffer policy and warm-up, against
timm's ModelEmaV3, exact resume, wrapped models, schedules, and its light import."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ssl_ptx.ema import (
    ModelEMA,
    fifth_place_decay_schedule,
    step_decay_schedule,
    third_place_decay_schedule,
    unwrap_model,
)


def small_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def sgd_steps(model: nn.Module, n: int, seed: int = 1):
    """Yield after each of ``n`` SGD steps on random data (train mode: BN stats move)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    for _ in range(n):
        x = torch.randn(8, 2, 6, 6, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        yield


def reference_decay(t: int, decay: float, warmup: str | None, after: int) -> float:
    s = t - after
    if s <= 0:
        return 0.0
    if warmup == "mean_teacher":
        return min(1 - 1 / (s + 1), decay)
    if warmup == "power":
        return min(1 - (1 + s) ** (-2 / 3), decay)
    return decay


def reference_update(ema: dict, model: nn.Module, d: float, policy: str) -> None:
    """The straightforward per-tensor loop over parameters and buffers."""
    params = dict(model.named_parameters())
    for name, value in model.state_dict().items():
        value = value.detach().clone()
        if name in params or (policy == "average" and value.is_floating_point()):
            ema[name] = d * ema[name] + (1 - d) * value
        elif policy in ("average", "copy"):
            ema[name] = value


@pytest.mark.parametrize("policy", ["average", "copy", "own"])
@pytest.mark.parametrize(
    ("warmup", "after"), [(None, 0), ("mean_teacher", 0), ("power", 0), (None, 3)]
)
def test_update_matches_reference_loop(policy: str, warmup: str | None, after: int) -> None:
    model = small_bn_net()
    ema = ModelEMA(model, decay=0.9, warmup=warmup, buffers=policy, update_after_step=after)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    initial_buffers = {k: v.clone() for k, v in model.named_buffers()}
    for t, _ in enumerate(sgd_steps(model, 6), start=1):
        ema.update(model)
        reference_update(reference, model, reference_decay(t, 0.9, warmup, after), policy)
    averaged = ema.module.state_dict()
    for name, expected in reference.items():
        torch.testing.assert_close(averaged[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    if policy == "own":  # the averaged copy's statistics stayed where they started
        for name, value in ema.module.named_buffers():
            assert torch.equal(value, initial_buffers[name])
    else:
        assert not torch.equal(
            ema.module.state_dict()["1.running_mean"], initial_buffers["1.running_mean"]
        )
    assert ema.num_updates == 6


def test_equals_timm_model_ema_v3() -> None:
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    model = small_bn_net()
    ours = {
        "average": ModelEMA(model, decay=0.8, buffers="average"),
        "copy": ModelEMA(model, decay=0.8, buffers="copy"),
        "power": ModelEMA(model, decay=0.95, warmup="power", update_after_step=1),
    }
    theirs = {
        "average": timm_ema.ModelEmaV3(model, decay=0.8),
        "copy": timm_ema.ModelEmaV3(model, decay=0.8, exclude_buffers=True),
        "power": timm_ema.ModelEmaV3(model, decay=0.95, use_warmup=True),
    }
    for step, _ in enumerate(sgd_steps(model, 5), start=1):
        for key in ours:
            ours[key].update(model)
            theirs[key].update(model, step=step if key == "power" else None)
    for key in ours:
        mine, timm_state = ours[key].module.state_dict(), theirs[key].module.state_dict()
        for name in mine:
            torch.testing.assert_close(mine[name], timm_state[name], rtol=1e-6, atol=1e-7)


def test_averaged_copy_is_frozen_independent_and_in_eval_mode() -> None:
    model = small_bn_net()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ema.module.parameters()))
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(ema(x), ema.module(x))


def test_decay_warmups_and_copy_phase() -> None:
    model = small_bn_net()
    plain = ModelEMA(model, decay=0.99)
    assert plain.decay_at(1) == 0.99
    mt = ModelEMA(model, decay=0.99, warmup="mean_teacher")
    assert [mt.decay_at(t) for t in (1, 2, 3)] == [0.5, pytest.approx(2 / 3), 0.75]
    assert mt.decay_at(10_000) == 0.99
    # counted from 0 as the 5th place / SSL4MIS do: copy first, then 0.5, 2/3, …
    mt0 = ModelEMA(model, decay=0.99, warmup="mean_teacher", update_after_step=1)
    assert [mt0.decay_at(t) for t in (1, 2, 3)] == [0.0, 0.5, pytest.approx(2 / 3)]
    power = ModelEMA(model, decay=0.9999, warmup="power", warmup_power=3 / 4)
    assert power.decay_at(10_000) == pytest.approx(1 - 10_001**-0.75)
    assert 0.998 < power.decay_at(10_000) < 0.9991
    copy3 = ModelEMA(model, decay=0.9, update_after_step=3)
    assert [copy3.decay_at(t) for t in (1, 3, 4)] == [0.0, 0.0, 0.9]


def test_copy_phase_is_an_exact_copy() -> None:
    model = small_bn_net()
    ema = ModelEMA(model, decay=0.9, update_after_step=2)
    for _ in sgd_steps(model, 2):
        ema.update(model)
    for name, value in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], value), name


def test_set_decay_and_validation() -> None:
    model = small_bn_net()
    ema = ModelEMA(model, decay=0.5)
    ema.set_decay(0.0)
    assert ema.decay == 0.0
    ema.decay = 0.25
    assert ema.decay_at(1) == 0.25
    with pytest.raises(ValueError, match="decay must be in"):
        ema.decay = 1.5
    with pytest.raises(ValueError, match="buffers must be one of"):
        ModelEMA(model, buffers="mean")
    with pytest.raises(ValueError, match="warmup must be one of"):
        ModelEMA(model, warmup="linear")


def test_update_refuses_a_different_model() -> None:
    ema = ModelEMA(small_bn_net())
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Linear(4, 3))


def test_state_dict_round_trip_resumes_exactly() -> None:
    kwargs = {"decay": 0.99, "warmup": "mean_teacher", "buffers": "average"}
    model = small_bn_net()
    ema = ModelEMA(model, **kwargs)
    steps = sgd_steps(model, 8)
    for _ in range(3):
        next(steps)
        ema.update(model)
    ema.set_decay(0.95)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed = ModelEMA(small_bn_net(seed=5), **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.num_updates == 3
    assert resumed.decay == 0.95
    for _ in steps:
        ema.update(model)
        resumed.update(model)
    for name, value in ema.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name


def test_unwrap_model_strips_nested_wrappers() -> None:
    model = small_bn_net()
    compiled = torch.compile(model)  # a wrapper with `_orig_mod`; nothing compiles yet
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(compiled)) is model
    assert unwrap_model(model) is model


def test_update_from_a_compiled_model() -> None:
    model = small_bn_net()
    compiled = torch.compile(model, backend="eager")
    ema = ModelEMA(compiled, decay=0.5)
    assert "_orig_mod" not in dict(ema.module.named_modules())
    reference = ModelEMA(model, decay=0.5)
    started = time.perf_counter()
    for _ in sgd_steps(compiled, 2):
        ema.update(compiled)
        reference.update(model)
    assert time.perf_counter() - started < 60
    for name, value in reference.module.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], value), name


def test_update_from_a_ddp_model(tmp_path) -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = small_bn_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = ModelEMA(model, decay=0.5)
        reference = ModelEMA(small_bn_net(), decay=0.5)
        for _ in sgd_steps(ddp, 3):
            ema.update(ddp)
            reference.update(model)
        for name, value in reference.module.state_dict().items():
            assert torch.equal(ema.module.state_dict()[name], value), name
    finally:
        dist.destroy_process_group()


def test_ema_on_another_device_dtype() -> None:
    model = small_bn_net()
    ema = ModelEMA(model, decay=0.5, device="cpu")
    ema.module.double()
    reference = {k: v.double() for k, v in model.state_dict().items()}
    for _ in sgd_steps(model, 2):
        ema.update(model)
        reference_update(reference, model, 0.5, "average")
    for name, value in ema.module.state_dict().items():
        assert value.dtype == reference[name].dtype
        torch.testing.assert_close(value, reference[name].to(value.dtype), rtol=1e-6, atol=1e-6)


def test_schedules() -> None:
    fifth = fifth_place_decay_schedule()
    assert [fifth(e) for e in (0, 4.9, 5, 9, 10, 19, 20, 100)] == [
        0.5, 0.5, 0.9, 0.9, 0.99, 0.99, 0.999, 0.999,
    ]  # fmt: skip
    third = third_place_decay_schedule()
    assert [third(e) for e in range(8)] == [0.0] * 6 + [0.99, 0.99]
    custom = step_decay_schedule({2: 0.1, 1: 0.0}, final=0.5)  # order of keys does not matter
    assert [custom(e) for e in (0, 1, 2)] == [0.0, 0.1, 0.5]
    with pytest.raises(ValueError, match="decay must be in"):
        step_decay_schedule({1: 2.0}, final=0.5)
    assert math.isclose(third_place_decay_schedule(2, 0.9)(2), 0.9)


def test_import_is_light() -> None:
    code = (
        "import sys, ssl_ptx.ema\n"
        "heavy = {'pandas', 'albumentations', 'segmentation_models_pytorch', 'timm', 'pydicom'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
