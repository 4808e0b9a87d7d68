"""Knowledge distillation in the one training loop (finetune.distill)."""

import pytest
import torch
import torch.nn.functional as F

from bnnprune.models import build_model, model_config
from bnnprune.pipeline.config import ConfigError, DataConfig, Subset, TrainConfig, parse_params
from bnnprune.pipeline.data import load_prepared, normalize, prepare
from bnnprune.pipeline.train import TrainingError, fit, objective


def test_objective_mixes_cross_entropy_and_kl_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ce = F.cross_entropy(s, y)
    p_t = t.softmax(1)
    kl = (p_t * (p_t.log() - s.log_softmax(1))).sum(1).mean()  # KL(teacher || student)
    assert torch.allclose(objective(s, y, None, 0.7), ce)
    assert torch.allclose(objective(s, y, t, 0.0), ce)
    assert torch.allclose(objective(s, y, t, 0.25), 0.75 * ce + 0.25 * kl)
    assert torch.allclose(objective(s, y, t, 1.0), kl)
    assert objective(t, y, t, 1.0).abs() < 1e-6  # the teacher itself: nothing left to learn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(DataConfig(dataset="synthetic", subset=Subset(train=128, val=32, test=32)), out)
    return load_prepared(out)


def kl_to(student, teacher, split, card) -> float:
    x = normalize(split.images, card["mean"], card["std"])
    with torch.no_grad():
        return F.kl_div(student.eval()(x).log_softmax(1), teacher.eval()(x).log_softmax(1),
                        reduction="batchmean", log_target=True).item()


def test_distilling_pulls_the_student_towards_the_teacher(tiny):
    splits, card = tiny
    config = model_config("cnn", 0.25, card["shape"], 10)
    teacher = build_model(config, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, threads=1, distill=1.0)
    student = build_model(config, seed=0)
    before = kl_to(student, teacher, splits["val"], card)
    fit(student, splits["train"], splits["val"], card, cfg, teacher=teacher)
    plain = build_model(config, seed=0)
    fit(plain, splits["train"], splits["val"], card, TrainConfig(**{**cfg.__dict__, "distill": 0}))
    after, without = (kl_to(m, teacher, splits["val"], card) for m in (student, plain))
    assert after < 0.5 * before and after < without
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen, not trained


def test_distill_without_a_teacher_is_an_error(tiny):
    splits, card = tiny
    model = build_model(model_config("cnn", 0.25, card["shape"], 10), seed=0)
    with pytest.raises(TrainingError, match="distill is 0.5 but no teacher"):
        fit(model, splits["train"], splits["val"], card,
            TrainConfig(epochs=1, batch_size=32, threads=1, distill=0.5))


def test_distill_is_checked_in_params():
    assert parse_params({"finetune": {"distill": 1}}).finetune.distill == 1.0
    with pytest.raises(ConfigError, match=r"finetune.distill: 1.5 is out of range; allowed: "
                                          r"\[0.0, 1.0\]"):
        parse_params({"finetune": {"distill": 1.5}})
    with pytest.raises(ConfigError, match="train.distill: 0.5; the baseline has no teacher"):
        parse_params({"train": {"distill": 0.5}})
