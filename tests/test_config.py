import json

import pytest

from slimkit.core.config import Config
from slimkit.core.selector import Selector, select
from slimkit.core.trainer import TrainConfig
from slimkit.errors import ConfigError, SelectorError


def test_defaults_and_validation():
    cfg = TrainConfig()
    assert cfg.epochs == 10 and cfg.optimizer == "adam"
    with pytest.raises(ConfigError, match="TrainConfig.epochs"):
        TrainConfig(epochs=-1)
    with pytest.raises(ConfigError, match="TrainConfig.optimizer"):
        TrainConfig(optimizer="rmsprop")


def test_unknown_key_rejected_with_its_name():
    with pytest.raises(ConfigError, match=r"TrainConfig\.epochz: unknown key"):
        TrainConfig(epochz=3)


def test_round_trip_yaml_and_json(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.01, patience=2)
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "train.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_file(path) == cfg


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*bogus: unknown key"):
        TrainConfig.from_file(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_file(notmap)


def test_selector_include_exclude_types():
    from slimkit import zoo

    model = zoo.lenet5()
    names = [n for n, _ in select(model)]
    assert names == ["features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"]
    assert [n for n, _ in select(model, Selector(types=["Linear"]))] == ["classifier.1", "classifier.3", "classifier.5"]
    assert [n for n, _ in select(model, Selector(include=["classifier.*"], exclude=["classifier.5"]))] == [
        "classifier.1", "classifier.3"]


def test_selector_raises_when_nothing_matches():
    from slimkit import zoo

    with pytest.raises(SelectorError, match="matched no layer"):
        select(zoo.lenet5(), Selector(include=["encoder.*"]))
    with pytest.raises(SelectorError, match="matched no layer"):
        select(zoo.lenet5(), Selector(types=["LSTM"]))


def test_selector_exact_name_must_exist():
    from slimkit import zoo

    with pytest.raises(SelectorError, match="'fc9' does not exist"):
        select(zoo.lenet5(), Selector(include=["classifier.1", "fc9"]))


def test_config_subclass_is_data():
    class Demo(Config):
        sparsity: float = 0.5
        selector: Selector = Selector()

    d = Demo.from_dict({"sparsity": 0.9, "selector": {"include": ["fc*"]}})
    assert d.selector.include == ["fc*"]
    assert Demo.from_yaml(d.to_yaml()) == d
    with pytest.raises(ConfigError, match=r"Demo\.selector\.includ: unknown key"):
        Demo.from_dict({"selector": {"includ": ["x"]}})


def test_every_recovering_stage_takes_one_recovery_config():
    """One `RecoveryConfig` for every stage: the method alone or a partial mapping is completed from the
    stage's own defaults; earlier releases' flat keys (saved files, old recipes) are folded in."""
    from slimkit.arch import SeparableConfig
    from slimkit.core.recovery import RecoveryConfig
    from slimkit.lowrank import LowRankConfig
    from slimkit.prune import HeadPruneConfig, PruneConfig, StructuredPruneConfig

    assert PruneConfig().recovery == RecoveryConfig(method="finetune", epochs=5)
    assert PruneConfig(recovery="distill").recovery == RecoveryConfig(method="distill", epochs=5)
    assert StructuredPruneConfig(recovery={"epochs": 1}).recovery == RecoveryConfig(method="distill", epochs=1)
    assert HeadPruneConfig().recovery.active is False
    assert LowRankConfig(recovery="finetune").recovery == RecoveryConfig(method="finetune", epochs=2)
    assert SeparableConfig(recovery=RecoveryConfig(method="none")).recovery.method == "none"
    old = PruneConfig.from_dict({"sparsity": 0.5, "recovery": "distill", "finetune_epochs": 3, "lr": 2e-3,
                                 "patience": None, "augment": "shift"})
    assert old.recovery == RecoveryConfig(method="distill", epochs=3, lr=2e-3, patience=None, augment="shift")
    assert PruneConfig.from_dict(old.to_dict()) == old  # written back in the new form
    assert LowRankConfig.from_dict({"recovery": "distill", "recovery_epochs": 4, "recovery_lr": 1e-4,
                                    "recovery_patience": 2}).recovery == RecoveryConfig(epochs=4, lr=1e-4, patience=2)
    with pytest.raises(ConfigError, match=r"PruneConfig\.recovery\.epoch: unknown key"):
        PruneConfig(recovery={"epoch": 3})
    with pytest.raises(ConfigError, match=r"PruneConfig\.recovery\.method"):
        PruneConfig(recovery="distil")
    with pytest.raises(ConfigError, match=r"SeparableConfig\.recovery\.patience"):
        SeparableConfig(recovery={"patience": 0})


def test_compact_dict_keeps_only_what_differs_and_rebuilds_the_same_config():
    """`compact_dict` (what a .slim header stores) drops defaults, nested configs included, and rebuilds an
    equal config, also where a stage's default recovery differs from RecoveryConfig's own defaults."""
    from slimkit.lowrank import LowRankConfig
    from slimkit.prune import PackConfig, PruneConfig
    from slimkit.quantize import QuantConfig

    configs = [PruneConfig(), PruneConfig(recovery="distill"), PruneConfig(sparsity=0.8, recovery={"epochs": 2}),
               PackConfig(prune=PruneConfig(sparsity=0.8, recovery={"method": "distill", "epochs": 3}), budget=0.3),
               LowRankConfig(recovery="finetune", selector={"exclude": ["fc"]}), QuantConfig(weights="int4")]
    for config in configs:
        compact = config.compact_dict()
        assert type(config).from_dict(compact) == config, compact
        assert len(json.dumps(compact)) < len(json.dumps(config.to_dict()))
    assert PruneConfig().compact_dict() == {}
    assert PruneConfig(recovery="distill").compact_dict() == {"recovery": {"method": "distill"}}
