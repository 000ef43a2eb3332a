"""Mean Teacher: ramp functions on edge values, consistency losses, the teacher's gradients and
BatchNorm policies, schedules, resume, and a run on a small real data set (scikit-image's
``lfw_subset``: 100 face / 100 non-face 25×25 crops from Labeled Faces in the Wild)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_ptx.ema import fifth_place_decay_schedule
from ssl_ptx.mean_teacher import (
    MeanTeacher,
    cosine_rampdown,
    fifth_place_consistency_weight,
    flip_back,
    linear_rampup,
    sigmoid_kl,
    sigmoid_mse,
    sigmoid_rampup,
    softmax_kl,
    softmax_mse,
)


def test_sigmoid_rampup_edges() -> None:
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(25, 10) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0
    with pytest.raises(ValueError):
        sigmoid_rampup(1, -1)


def test_linear_rampup_edges() -> None:
    assert linear_rampup(0, 10) == 0.0
    assert linear_rampup(2.5, 10) == 0.25
    assert linear_rampup(10, 10) == 1.0
    assert linear_rampup(12, 10) == 1.0
    assert linear_rampup(0, 0) == 1.0
    with pytest.raises(ValueError):
        linear_rampup(-1, 10)


def test_cosine_rampdown_edges() -> None:
    assert cosine_rampdown(0, 10) == 1.0
    assert cosine_rampdown(5, 10) == pytest.approx(0.5)
    assert cosine_rampdown(10, 10) == pytest.approx(0.0, abs=1e-12)
    for current, length in ((11, 10), (-1, 10), (0, 0)):
        with pytest.raises(ValueError):
            cosine_rampdown(current, length)


def test_fifth_place_consistency_weight() -> None:
    assert fifth_place_consistency_weight(0) == 0.001
    assert fifth_place_consistency_weight(4.99) == 0.001
    assert fifth_place_consistency_weight(5) == pytest.approx(0.0621, abs=1e-4)
    assert fifth_place_consistency_weight(20) == pytest.approx(2 * math.exp(-5 / 9))
    assert fifth_place_consistency_weight(30) == 2.0
    assert fifth_place_consistency_weight(90) == 2.0


def test_consistency_losses_against_direct_formulas() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    mse = ((torch.sigmoid(s) - torch.sigmoid(t)) ** 2).mean()
    torch.testing.assert_close(sigmoid_mse(s, t), mse)
    mse = ((s.softmax(1) - t.softmax(1)) ** 2).mean()
    torch.testing.assert_close(softmax_mse(s, t), mse)
    kl = F.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="sum") / 75
    torch.testing.assert_close(softmax_kl(s, t), kl)
    p, q = torch.sigmoid(t), torch.sigmoid(s)
    binary = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
    torch.testing.assert_close(sigmoid_kl(s, t), binary)
    for loss in (sigmoid_mse, softmax_mse, softmax_kl, sigmoid_kl):
        assert loss(s, s).abs().item() < 1e-6
        assert loss(s.half(), t.half()).dtype == torch.float32
    assert torch.isfinite(sigmoid_kl(torch.tensor([80.0]), torch.tensor([-80.0])))
    with pytest.raises(ValueError, match="differ in shape"):
        sigmoid_mse(s, t[:2])


def bn_net(seed: int = 0, presence: bool = False) -> nn.Module:
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.mask = nn.Conv2d(4, 1, 1)
            self.presence = nn.Linear(4, 1)

        def forward(self, x):
            features = self.body(x)
            mask = self.mask(features)
            return (mask, self.presence(features.mean((2, 3)))) if presence else mask

    return Net()


def bce(output, y):
    mask = output[0] if isinstance(output, tuple) else output
    return F.binary_cross_entropy_with_logits(mask, y)


def test_consistency_is_zero_for_equal_models_and_reaches_only_the_student() -> None:
    student = bn_net().eval()  # same BN behaviour as the eval-mode teacher
    mt = MeanTeacher(student, rampup_length=0, buffers="copy", teacher_bn="eval")
    x, y = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8).round()
    unlabelled = torch.randn(3, 1, 8, 8)
    loss, parts = mt.training_loss(x, y, unlabelled, unlabelled, bce)
    assert parts["consistency"].item() == 0.0
    assert parts["weight"] == 1.0
    torch.testing.assert_close(loss, parts["supervised"])
    # a different teacher view: the consistency gradient reaches the student only
    zero_supervised = lambda out, target: out.sum() * 0.0  # noqa: E731
    loss, parts = mt.training_loss(x, y, unlabelled, unlabelled + 0.5, zero_supervised)
    assert parts["consistency"].item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.body.parameters())
    assert all(p.grad is None and not p.requires_grad for p in mt.teacher.parameters())


def test_presence_output_adds_its_weighted_consistency() -> None:
    mt = MeanTeacher(bn_net(presence=True), rampup_length=0, presence_weight=0.25)
    student_out = (torch.randn(2, 1, 4, 4), torch.randn(2, 1))
    teacher_out = (torch.randn(2, 1, 4, 4), torch.randn(2, 1))
    expected = sigmoid_mse(student_out[0], teacher_out[0]) + 0.25 * sigmoid_mse(
        student_out[1], teacher_out[1]
    )
    torch.testing.assert_close(mt.consistency(student_out, teacher_out), expected)
    x, y = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8).round()
    loss, parts = mt.training_loss(x, y, torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), bce)
    assert torch.isfinite(loss) and parts["consistency"] > 0


def test_flip_back_undoes_a_flipped_student_view() -> None:
    torch.manual_seed(0)
    student = nn.Conv2d(1, 1, 1)  # a 1×1 convolution commutes with flips
    nn.init.constant_(student.weight, 4.0)
    mt = MeanTeacher(student, rampup_length=0, buffers="copy", teacher_bn="eval")
    teacher_view = torch.randn(4, 1, 6, 6)
    flipped = torch.tensor([True, False, True, False])
    student_view = torch.where(flipped.view(-1, 1, 1, 1), teacher_view.flip(-1), teacher_view)
    student_out, teacher_out = student(student_view), mt.teacher_outputs(teacher_view)
    assert mt.consistency(student_out, teacher_out) > 1e-3
    assert mt.consistency(student_out, teacher_out, flip_back(flipped)) < 1e-12
    with pytest.raises(ValueError, match="flags"):
        flip_back(flipped[:3])(student_out)


def test_joint_and_separate_student_forwards_agree_without_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    x, y = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8).round()
    u_s, u_t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    losses = []
    for joint in (True, False):
        mt = MeanTeacher(
            model, rampup_length=0, buffers="copy", teacher_bn="eval", joint_forward=joint
        )
        losses.append(mt.training_loss(x, y, u_s, u_t, bce)[0])
    torch.testing.assert_close(losses[0], losses[1])
    with pytest.raises(ValueError, match="one size"):
        mt = MeanTeacher(model, rampup_length=0, buffers="copy", teacher_bn="eval")
        mt.training_loss(x, y, torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), bce)


def running_mean(mt: MeanTeacher) -> torch.Tensor:
    return mt.teacher.module.body[1].running_mean.clone()


def training_step(mt: MeanTeacher, optimizer: torch.optim.Optimizer) -> None:
    x, y = torch.randn(2, 1, 8, 8) + 3.0, torch.rand(2, 1, 8, 8).round()
    loss, _ = mt.training_loss(x, y, torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), bce)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    mt.update_teacher()


@pytest.mark.parametrize(
    ("buffers", "teacher_bn"), [("own", "refresh"), ("own", "train"), ("average", "eval")]
)
def test_teacher_batchnorm_policies(buffers: str, teacher_bn: str) -> None:
    student = bn_net()
    mt = MeanTeacher(student, rampup_length=0, buffers=buffers, teacher_bn=teacher_bn)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    before = running_mean(mt)
    x = torch.randn(3, 1, 8, 8)
    mt.teacher_outputs(x)
    if teacher_bn == "train":  # targets in train mode move the teacher's own statistics
        assert not torch.equal(running_mean(mt), before)
    else:
        assert torch.equal(running_mean(mt), before)
    training_step(mt, optimizer)
    assert not torch.equal(running_mean(mt), before)
    assert not mt.teacher.module.training
    if buffers == "own":  # statistics are the teacher's own, not the student's
        assert not torch.equal(running_mean(mt), student.body[1].running_mean)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        MeanTeacher(bn_net(), rampup_length=0, buffers="own", teacher_bn="eval")
    with pytest.raises(ValueError, match="does not fit"):
        MeanTeacher(bn_net(), rampup_length=0, buffers="average", teacher_bn="refresh")
    with pytest.raises(ValueError, match="rampup_length"):
        MeanTeacher(bn_net())
    with pytest.raises(ValueError, match="consistency must be"):
        MeanTeacher(bn_net(), rampup_length=0, consistency="l1")


def test_weight_rampup_schedules_and_resume() -> None:
    student = bn_net()
    mt = MeanTeacher(student, consistency_weight=2.0, rampup_length=4, ema_decay=0.9)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    weights = []
    for _ in range(5):
        weights.append(mt.consistency_weight_now)
        training_step(mt, optimizer)
    assert weights == pytest.approx([2.0 * sigmoid_rampup(t, 4) for t in range(5)])
    assert weights[0] == pytest.approx(2.0 * math.exp(-5)) and weights[4] == 2.0

    by_epoch = MeanTeacher(
        bn_net(),
        rampup_unit="epochs",
        weight_schedule=fifth_place_consistency_weight,
        decay_schedule=fifth_place_decay_schedule(),
    )
    assert by_epoch.teacher.decay == 0.5 and by_epoch.consistency_weight_now == 0.001
    by_epoch.set_epoch(20)
    assert by_epoch.teacher.decay == 0.999
    assert by_epoch.consistency_weight_now == pytest.approx(fifth_place_consistency_weight(20))

    state = mt.state_dict()
    resumed = MeanTeacher(bn_net(seed=3), consistency_weight=2.0, rampup_length=4, ema_decay=0.9)
    resumed.load_state_dict(state)
    resumed.student.load_state_dict(student.state_dict())
    assert resumed.teacher.num_updates == 5
    assert resumed.consistency_weight_now == mt.consistency_weight_now
    for name, value in mt.teacher.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.teacher.state_dict()[name], value), name
    resumed.student = student  # both now step the same student
    mt.update_teacher()
    resumed.update_teacher()
    for name, value in mt.teacher.module.state_dict().items():
        assert torch.equal(resumed.teacher.module.state_dict()[name], value), name


# --- a small real data set: faces vs non-faces with 10 labels -------------------------------


def faces_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(16 * 36, 2),
    )  # fmt: skip


def noisy_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise (σ 0.15) and a random shift of up to 2 pixels."""
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    noise = 0.15 * torch.randn(images.shape, generator=generator)
    return torch.roll(images + noise, shift, dims=(2, 3))


def faces_accuracy(seed: int, mean_teacher: bool, steps: int = 300) -> float:
    """Test accuracy (80 held-out images) after training on 10 labelled images (5 per class),
    with the other 110 training images unlabelled when ``mean_teacher``; MT is scored with
    its teacher."""
    skimage_data = pytest.importorskip("skimage.data")
    images = torch.tensor(skimage_data.lfw_subset(), dtype=torch.float32)[:, None]
    labels = torch.cat([torch.ones(100), torch.zeros(100)]).long()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(200, generator=generator)
    test, train = order[:80], order[80:]
    labelled = torch.cat([train[labels[train] == c][:5] for c in (0, 1)])
    torch.manual_seed(seed)
    model = faces_net()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    mt = MeanTeacher(
        model,
        ema_decay=0.9,
        consistency_weight=3.0,
        rampup_length=100,
        activation="softmax",
        buffers="average",
        teacher_bn="eval",
    )
    model.train()
    for _ in range(steps):
        x = noisy_view(images[labelled], generator)
        if mean_teacher:
            batch = train[torch.randint(0, len(train), (64,), generator=generator)]
            loss, _ = mt.training_loss(
                x,
                labels[labelled],
                noisy_view(images[batch], generator),
                noisy_view(images[batch], generator),
                F.cross_entropy,
            )
        else:
            loss = F.cross_entropy(model(x), labels[labelled])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if mean_teacher:
            mt.update_teacher()
    scored = mt.teacher.module if mean_teacher else model.eval()
    with torch.no_grad():
        return (scored(images[test]).argmax(1) == labels[test]).float().mean().item()


@pytest.mark.slow
def test_mean_teacher_beats_labels_alone_on_faces() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        supervised = [faces_accuracy(seed, mean_teacher=False) for seed in range(3)]
        with_mt = [faces_accuracy(seed, mean_teacher=True) for seed in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert sum(with_mt) / 3 > sum(supervised) / 3 + 0.02, (supervised, with_mt)
