"""Knowledge distillation: soft targets, feature hints, attention transfer, and the recovery step
of every other technique.

    import slimkit as sk
    small = sk.distill(small, teacher=model, task=task, config=sk.DistillConfig(temperature=4))
    small = sk.distill_model(small, teacher=model, task=task)          # the same verb, by its plain name
    fixed = sk.distill.recover(pruned, model, task, epochs=2)          # recovery helper of other stages

`slimkit.distill` is this package *and* the verb (see `slimkit.core.verbs`); `distill_model` is the
same function under a name that is never shadowed by the package, for readers and type checkers.
"""
from slimkit.distill.apply import build_student, distill, train_student
from slimkit.distill.config import DistillConfig, FeatureLink
from slimkit.distill.losses import attention_loss, attention_map, hint_loss, soft_target_loss
from slimkit.distill.recovery import finetune, recover

distill_model = distill

__all__ = ["distill", "distill_model", "DistillConfig", "FeatureLink", "soft_target_loss", "hint_loss",
           "attention_loss", "attention_map", "recover", "finetune", "train_student", "build_student"]

from slimkit.core.verbs import make_callable  # noqa: E402

make_callable(__name__, "distill")  # `slimkit.distill(student, teacher, task=..., config=...)`
