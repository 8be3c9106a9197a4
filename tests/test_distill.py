"""Distillation: the losses against hand-computed values, the frozen teacher, the logit cache, feature
links, the verb and the registered stage, typed errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimkit as sk
from slimkit.core.task import tensor_task
from slimkit.distill import (
    DistillConfig,
    FeatureLink,
    attention_loss,
    attention_map,
    distill,
    finetune,
    hint_loss,
    recover,
    soft_target_loss,
)
from slimkit.errors import ConfigError, ModelError, SelectorError


@pytest.fixture(scope="module")
def blobs():
    """A tiny 3-class problem (Gaussian blobs in 6-D): trains in well under a second."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g) * 3
    y = torch.arange(240) % 3
    x = centers[y] + torch.randn(240, 6, generator=g)
    return tensor_task("blobs", x[:160], y[:160], x[160:200], y[160:200], x[200:], y[200:], num_classes=3,
                       batch_size=32)


def mlp(hidden=16, classes=3, inputs=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, classes))


@pytest.fixture(scope="module")
def few_digits(digits_task):
    """A slice of digits (28x28 images) so that LeNet-5 epochs take a few steps."""
    def take(split, n):
        ds = digits_task.split(split)
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack(xs), torch.stack(ys)

    return tensor_task("few-digits", *take("train", 192), *take("val", 96), *take("test", 96), num_classes=10)


@pytest.fixture(scope="module")
def blob_teacher(blobs):
    return sk.train(mlp(32), blobs, epochs=5, lr=1e-2)


# -- losses -------------------------------------------------------------------------------
def test_soft_target_loss_matches_hand_computation():
    zs = torch.tensor([[1.0, 2.0, 0.5]])
    zt = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([1])
    T, alpha = 2.0, 0.75
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.5)]
    pt = [math.exp(v / T) for v in (2.0, 0.0, 1.0)]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    kl = sum(t * math.log(t / s) for t, s in zip(pt, ps))
    ce = -math.log(math.exp(2.0) / sum(math.exp(v) for v in (1.0, 2.0, 0.5)))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert soft_target_loss(zs, zt, y, temperature=T, alpha=alpha).item() == pytest.approx(expected, rel=1e-5)
    # without labels only the soft term remains
    assert soft_target_loss(zs, zt, None, temperature=T).item() == pytest.approx(T * T * kl, rel=1e-5)


def test_temperature_one_alpha_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    assert torch.allclose(soft_target_loss(zs, zt, y, temperature=1.0, alpha=0.0), F.cross_entropy(zs, y))


def test_hint_and_attention_losses():
    a = torch.ones(2, 3, 4, 4)
    assert hint_loss(a, a).item() == 0
    assert hint_loss(a, 2 * a).item() == pytest.approx(1.0)
    q = attention_map(torch.randn(2, 5, 4, 4))
    assert q.shape == (2, 16) and torch.allclose(q.norm(dim=1), torch.ones(2))
    # channel counts may differ; a scaled copy has the same attention, a spatially different one does not
    f = torch.rand(2, 3, 4, 4)
    assert attention_loss(f, 3 * f.repeat(1, 2, 1, 1)).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.zeros(2, 3, 4, 4)
    other[:, :, 0, 0] = 1
    assert attention_loss(f, other).item() > 0.1
    # different spatial sizes are pooled to the teacher's
    assert attention_loss(torch.rand(2, 3, 8, 8), f).shape == ()


# -- the teacher is frozen and untouched ----------------------------------------------------
def test_teacher_gets_no_gradient_and_does_not_change(blobs, blob_teacher):
    teacher = blob_teacher
    teacher.train()  # the caller's mode must survive
    for p in teacher.parameters():
        p.grad = None  # left over from the fixture's own training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    student = mlp(8, seed=1)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    out = recover(student, teacher, blobs, epochs=2, lr=1e-2, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert [p.requires_grad for p in teacher.parameters()] == flags and teacher.training
    assert all(torch.equal(student_before[k], v) for k, v in student.state_dict().items())  # input kept
    assert any(not torch.equal(student_before[k], v) for k, v in out.state_dict().items())  # output trained
    teacher.eval()
    # the same teacher can still be trained afterwards (its requires_grad flags were not switched off)
    sk.train(teacher, blobs, epochs=1)


def test_kd_with_alpha_zero_equals_plain_training(blobs, blob_teacher):
    student = mlp(8, seed=2)
    kd = distill(student, blob_teacher, task=blobs, config=DistillConfig(alpha=0.0, temperature=1.0, epochs=2,
                                                                        lr=1e-2, device="cpu"))
    ft = finetune(student, blobs, epochs=2, lr=1e-2, device="cpu")
    x = blobs.example_input(16)
    assert torch.allclose(kd(x), ft(x), atol=1e-5)


def test_distill_learns_from_teacher(blobs, blob_teacher):
    student = mlp(8, seed=3)
    trained = sk.distill(student, teacher=blob_teacher, task=blobs,
                         config=DistillConfig(epochs=10, lr=1e-2, temperature=2.0, alpha=0.9, device="cpu"))
    logits, targets = sk.evaluate.predict(trained, blobs, "test")
    assert (logits.argmax(1) == targets).float().mean() > 0.9
    assert sk.core.state.stages(trained)[-1]["technique"] == "distill"
    assert any("distilled from" in n for n in trained.slimkit_notes)
    assert sk.distill_model is sk.distill.distill


def test_recover_runs_hooks_every_step_and_epoch(blobs, blob_teacher):
    steps, epochs = [], []
    recover(mlp(8), blob_teacher, blobs, epochs=2, lr=1e-2, device="cpu",
            on_step=lambda m, step: steps.append(step), on_epoch=lambda m, epoch: epochs.append(epoch))
    assert steps == list(range(1, 2 * math.ceil(160 / 32) + 1)) and epochs == [0, 1]


# -- teacher-output cache ------------------------------------------------------------------------
class CountingTeacher(nn.Module):
    calls = []  # class-level: the trainer works on copies

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        CountingTeacher.calls.append(len(x))
        return self.inner(x)


def test_cache_gives_identical_results_with_fewer_teacher_passes(blobs, blob_teacher):
    teacher = CountingTeacher(blob_teacher)
    cfg = dict(epochs=3, lr=1e-2, device="cpu", alpha=0.8, temperature=4.0, patience=None)
    CountingTeacher.calls.clear()
    plain = distill(mlp(8, seed=4), teacher, task=blobs, config=DistillConfig(**cfg))
    uncached_calls = len(CountingTeacher.calls)
    CountingTeacher.calls.clear()
    cached = distill(mlp(8, seed=4), teacher, task=blobs, config=DistillConfig(cache_teacher=True, **cfg))
    cached_calls = len(CountingTeacher.calls)
    x = blobs.example_input(32)
    assert torch.allclose(plain(x), cached(x), atol=1e-6)
    steps = 3 * math.ceil(160 / 32)
    assert uncached_calls == steps + 1  # + the probe pass
    assert cached_calls == steps // 3 + 1  # the teacher only runs in the first epoch
    assert any("served from the cache" in n for n in cached.slimkit_notes)


# -- feature distillation ----------------------------------------------------------------------
def test_hint_and_attention_links_train_with_adapters(few_digits, trained_lenet5):
    from slimkit import zoo

    small = zoo.for_task("lenet5", few_digits, width=0.5)
    cfg = DistillConfig(epochs=1, device="cpu", features=[
        FeatureLink(student="features.3", teacher="features.3"),  # 8 -> 16 channels: 1x1 conv adapter
        FeatureLink(student="classifier.1", teacher="classifier.1"),  # 60 -> 120 units: linear adapter
        FeatureLink(student="features.0", teacher="features.0", kind="attention", weight=10.0),
    ])
    from slimkit.distill import train_student

    trained, info = train_student(small, trained_lenet5, few_digits, cfg)
    assert info["adapters"] == (8 * 16 + 16) + (60 * 120 + 120)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in trained.modules())  # adapters dropped
    assert sum(p.numel() for p in trained.parameters()) == sum(p.numel() for p in small.parameters())
    assert info["history"][-1]["train_loss"] > 0


def test_feature_mapping_errors_name_the_layer(blobs, blob_teacher, few_digits, trained_lenet5):
    with pytest.raises(SelectorError, match="'features.9'"):
        distill(mlp(8), blob_teacher, task=blobs, config=DistillConfig(
            epochs=1, features=[FeatureLink(student="features.9", teacher="0")]))
    with pytest.raises(SelectorError, match=r"teacher pattern 'decoder\.\*'"):
        distill(mlp(8), blob_teacher, task=blobs, config=DistillConfig(
            epochs=1, features=[FeatureLink(student="0", teacher="decoder.*")]))
    with pytest.raises(SelectorError, match="matches 2 layers"):
        distill(mlp(8), blob_teacher, task=blobs, config=DistillConfig(
            epochs=1, features=[FeatureLink(student="[03]", teacher="0")]))
    with pytest.raises(ConfigError, match="attention transfer needs conv feature maps.*'0'"):
        distill(mlp(8), blob_teacher, task=blobs, config=DistillConfig(
            epochs=1, features=[FeatureLink(student="0", teacher="0", kind="attention")]))
    from slimkit import zoo

    with pytest.raises(ConfigError, match="'classifier.1'"):  # a vector cannot be hinted onto a conv map
        distill(zoo.for_task("lenet5", few_digits), trained_lenet5, task=few_digits, config=DistillConfig(
            epochs=1, features=[FeatureLink(student="classifier.1", teacher="features.0")]))


# -- bad input ------------------------------------------------------------------------------------
def test_class_count_mismatch_is_a_typed_error(blobs, blob_teacher):
    with pytest.raises(ModelError, match="3 classes.*5"):
        distill(mlp(8, classes=5), blob_teacher, task=blobs, config=DistillConfig(epochs=1))
    with pytest.raises(ModelError, match="teacher"):
        distill(mlp(8), "teacher.safetensors", task=blobs)
    with pytest.raises(ConfigError, match="task"):
        distill(mlp(8), blob_teacher, task=None)


def test_config_validation():
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="unknown key"):
        DistillConfig(temprature=4)
    with pytest.raises(ConfigError, match="student"):
        DistillConfig(student="lenet5")
    cfg = DistillConfig(temperature=3, features=[{"student": "a.*", "teacher": "b", "kind": "attention"}])
    assert DistillConfig.from_yaml(cfg.to_yaml()) == cfg


# -- as a stage ---------------------------------------------------------------------------------
def test_stage_distills_into_a_narrower_zoo_student_and_reloads(few_digits, trained_lenet5, tmp_path):
    from slimkit.core import registry

    technique = registry.get("distill")
    cfg = technique.demo(trained_lenet5, few_digits)
    assert cfg.student == "zoo:lenet5" and cfg.width == 0.5
    cfg = DistillConfig(**{**cfg.to_dict(), "epochs": 1})
    student = sk.apply(trained_lenet5, cfg, task=few_digits)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in trained_lenet5.parameters())
    assert n_student < 0.4 * n_teacher
    path = sk.save(student, tmp_path / "student.safetensors")
    loaded = sk.load(path)
    x = few_digits.example_input(4)
    assert torch.allclose(loaded(x), student(x))
    with pytest.raises(ConfigError, match="student"):  # the verb already has its student
        distill(student, trained_lenet5, task=few_digits, config=cfg)


def test_package_is_the_verb():
    import importlib

    import slimkit

    assert callable(sk.distill) and sk.distill.recover is recover
    assert importlib.import_module("slimkit.distill") is sk.distill
    # first access in a fresh interpreter goes through slimkit.__getattr__: the package, not the function
    package = slimkit.__dict__.pop("distill")
    try:
        assert slimkit.__getattr__("distill") is package
    finally:
        slimkit.distill = package


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_teacher_and_student_devices(blobs, blob_teacher):
    for device, teacher_device in (("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")):
        out = distill(mlp(8), blob_teacher, task=blobs, config=DistillConfig(
            epochs=1, device=device, teacher_device=teacher_device, cache_teacher=True,
            features=[FeatureLink(student="0", teacher="0")]))
        assert next(out.parameters()).device.type == "cpu"  # returned where it came from


# -- augmentation -------------------------------------------------------------------------------
def test_random_shift_moves_each_image_by_at_most_the_limit():
    from slimkit.distill.augment import random_shift

    x = torch.randn(16, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = random_shift(x, 1)
    assert out.shape == x.shape
    offsets = set()
    for i in range(len(x)):  # every output is the input moved by one offset in [-1, 1]^2 (edges repeated)
        padded = F.pad(x[i:i + 1], (1, 1, 1, 1), mode="replicate")[0]
        match = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(padded[:, dy:dy + 9, dx:dx + 9], out[i])]
        assert match, f"image {i} is not a shift of its input"
        offsets.add(match[0])
    assert len(offsets) > 1  # the offsets are per image, not one for the batch
    torch.manual_seed(1)
    assert torch.equal(random_shift(x, 1), out)  # reproducible under the trainer's seed
    with pytest.raises(ConfigError, match="image batches"):
        random_shift(torch.randn(4, 6), 1)


def test_augment_validation(blobs, blob_teacher):
    with pytest.raises(ConfigError, match="cache_teacher"):
        DistillConfig(augment="shift", cache_teacher=True)
    with pytest.raises(ConfigError, match="image inputs"):
        distill(mlp(8), blob_teacher, task=blobs, config=DistillConfig(augment="shift", epochs=1))


def test_augmented_training_differs_and_low_resolution_student_reloads(few_digits, trained_lenet5, tmp_path):
    plain = finetune(trained_lenet5, few_digits, epochs=1, lr=1e-3)
    shifted = finetune(trained_lenet5, few_digits, epochs=1, lr=1e-3, augment="shift")
    assert not torch.equal(plain.features[0].weight, shifted.features[0].weight)  # the shifted images were used
    cfg = DistillConfig(student="zoo:lenet300_100", width=0.25, student_kwargs={"input_pool": 2}, epochs=10,
                        augment="shift", max_shift=1, lr=1e-2)
    student = sk.apply(trained_lenet5, cfg, task=few_digits)
    assert student[2].in_features == 14 * 14  # 28x28 averaged over 2x2 blocks
    assert any("shifted by up to 1 px" in n for n in student.slimkit_notes)
    from slimkit.core.trainer import accuracy

    assert accuracy(student, few_digits, "val") > 0.5  # it learned from the shifted images
    loaded = sk.load(sk.save(student, tmp_path / "student.safetensors"))
    x = few_digits.example_input(4)
    assert torch.allclose(loaded(x), student(x))


# -- soft targets tuned on validation (temperature / alpha "auto") -------------------------------
def _relabelled(task, fn, name):
    x, y = task.train.tensors
    vx, vy = task.val.tensors
    tx, ty = task.test.tensors
    return tensor_task(name, x, fn(y), vx, vy, tx, ty, num_classes=3, batch_size=32)


def test_auto_falls_back_to_the_labels_when_the_teacher_misleads(blobs):
    wrong = sk.train(mlp(32), _relabelled(blobs, lambda y: (y + 1) % 3, "blobs-shifted-labels"), epochs=5, lr=1e-2)
    trained = distill(mlp(8, seed=3), wrong, task=blobs, config=DistillConfig(epochs=8, lr=1e-2, device="cpu"))
    tuning = sk.core.state.stages(trained)[-1]["structure"]["tuning"]
    assert tuning["alpha"] == 0 and len(tuning["trials"]) == 5  # the five grid points were screened
    assert [r["alpha"] == 0 for r in tuning["final"]] == [False, True]  # then the best and the labels ran in full
    assert any("did not beat the hard labels" in n for n in trained.slimkit_notes)
    assert any("trained on the hard labels only" in n for n in trained.slimkit_notes)
    logits, targets = sk.evaluate.predict(trained, blobs, "test")
    assert (logits.argmax(1) == targets).float().mean() > 0.9


def test_auto_chooses_distillation_when_it_beats_noisy_labels(blobs):
    clean_teacher = sk.train(mlp(32), blobs, epochs=5, lr=1e-2)
    g = torch.Generator().manual_seed(1)

    def corrupt(y):  # most class-0 training labels say 1: label training learns the wrong region
        flip = (y == 0) & (torch.rand(len(y), generator=g) < 0.7)
        return torch.where(flip, torch.ones_like(y), y)

    noisy = _relabelled(blobs, corrupt, "blobs-noisy")
    trained = distill(mlp(8, seed=3), clean_teacher, task=noisy, config=DistillConfig(epochs=8, lr=1e-2, device="cpu"))
    stage = sk.core.state.stages(trained)[-1]["structure"]
    final = {r["alpha"] == 0: r["val_accuracy"] for r in stage["tuning"]["final"]}
    assert stage["alpha"] > 0 and final[False] > final[True]  # KD beat the labels in the full runs
    assert any("chose T=" in n for n in trained.slimkit_notes)
    hard = sk.train(mlp(8, seed=3), noisy, epochs=8, lr=1e-2)
    assert sk.evaluate.topk_accuracy(*sk.evaluate.predict(trained, noisy, "test"))["top1"] > \
        sk.evaluate.topk_accuracy(*sk.evaluate.predict(hard, noisy, "test"))["top1"]


def test_auto_narrows_the_grid_to_what_is_not_fixed_and_says_when_it_cannot_tune(blobs, blob_teacher):
    cfg = DistillConfig(epochs=4, lr=1e-2, device="cpu", temperature=3.0, tune_epochs=1)
    trained = distill(mlp(8, seed=3), blob_teacher, task=blobs, config=cfg)
    tuning = sk.core.state.stages(trained)[-1]["structure"]["tuning"]
    assert [(r["temperature"], r["alpha"]) for r in tuning["trials"]] == [(3.0, 0.5), (3.0, 0.9), (3.0, 1.0)]
    assert [r["temperature"] for r in tuning["final"]] == [3.0, 3.0]
    x, y = blobs.train.tensors
    no_val = tensor_task("blobs-no-val", x, y, num_classes=3, batch_size=32)
    trained = distill(mlp(8, seed=3), blob_teacher, task=no_val, config=DistillConfig(epochs=2, lr=1e-2, device="cpu"))
    assert any("not tuned" in n and "no validation split" in n for n in trained.slimkit_notes)
    assert sk.core.state.stages(trained)[-1]["structure"]["temperature"] == 4.0
    with pytest.raises(ValueError):
        DistillConfig(tune_grid=[(4.0, 0.0)])  # alpha 0 is the labels run, always tried when alpha is auto
    with pytest.raises(ValueError):
        DistillConfig(temperature="hot")
