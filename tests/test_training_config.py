"""Training config: YAML + preset + `--set` layering, validation errors, and the saved-config round trip."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from pipeline.training.config import (
    DEFAULT_CONFIG,
    QUICK_PRESET,
    Config,
    ConfigError,
    dump_config,
    load_config,
    parse_override,
    replace_in,
)


def test_default_yaml_loads_and_sets_every_section():
    config = load_config(DEFAULT_CONFIG)
    assert isinstance(config, Config)
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert set(raw) == {f.name for f in dataclasses.fields(Config)}
    assert config.classifier.finetune_lr < config.classifier.head_lr
    budget = config.training.budget_minutes
    assert budget.classifier_head + budget.classifier_finetune + budget.segmenter <= 85


def test_quick_preset_is_tiny_and_needs_no_imagenet_weights():
    config = load_config(DEFAULT_CONFIG, [QUICK_PRESET])
    assert 32 <= config.classifier.image_size <= 64
    assert config.classifier.weights == "none"
    assert config.classifier.head_epochs <= 2 and config.classifier.finetune_epochs <= 2
    # untouched keys keep the base value
    assert config.segmenter.loss.name == load_config(DEFAULT_CONFIG).segmenter.loss.name


def test_overrides_are_parsed_as_yaml_and_win_over_preset():
    config = load_config(
        DEFAULT_CONFIG,
        [QUICK_PRESET],
        [
            "classifier.image_size=48",
            "classifier.head_lr=1e-4",
            "classifier.finetune_mode=all",
            "segmenter.loss.name=focal_tversky",
            "segmenter.loss.kwargs={gamma: 1.0}",
            "data.fractions=[0.6, 0.2, 0.2]",
            "classifier.steps_per_epoch=null",
            "training.lr_schedule=cosine",
        ],
    )
    assert config.classifier.image_size == 48
    assert config.classifier.head_lr == pytest.approx(1e-4)
    assert config.classifier.finetune_mode == "all"
    assert config.segmenter.loss.kwargs == {"gamma": 1.0}
    assert config.data.fractions == (0.6, 0.2, 0.2)
    assert config.classifier.steps_per_epoch is None
    assert config.training.lr_schedule == "cosine"


def test_parse_override_splits_key_and_value():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b.c=x=y") == (["a", "b", "c"], "x=y")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no_equals_sign")
    with pytest.raises(ConfigError, match="dotted"):
        parse_override("image_size=3")


@pytest.mark.parametrize(
    "override, message",
    [
        ("classifier.imagesize=64", r"unknown config key 'classifier.imagesize'.*valid keys: image_size"),
        ("nonsense.key=1", r"unknown config key 'nonsense'.*valid keys: data, classifier"),
        ("training.budget_minutes.total=3", r"'training.budget_minutes.total'.*classifier_head"),
        (
            "training.strategy=tpu",
            r"training.strategy: 'tpu' is not one of auto, default, mirrored, multi_worker",
        ),
        ("training.lr_schedule=step", r"not one of plateau, cosine"),
        ("segmenter.train_on=some", r"not one of mix, tumor, all"),
        ("classifier.batch_size=big", r"classifier.batch_size: expected an integer"),
        ("classifier.batch_size=0", r"classifier.batch_size: must be positive"),
        ("classifier.finetune_mode=most", r"classifier.finetune_mode"),
        ("data.fractions=[0.5, 0.5]", r"data.fractions: expected 3 values"),
        ("data.fractions=[0.9, 0.0, 0.1]", r"validation share"),
        ("segmenter.augment.params.p_flipz=1", r"segmenter.augment.params.p_flipz.*p_hflip"),
        ("calibration.thresholds=[0.0, 0.5]", r"calibration.thresholds"),
    ],
)
def test_bad_overrides_name_the_key_and_the_valid_choices(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(DEFAULT_CONFIG, [], [override])
    assert f"--set {override}" in str(info.value)  # the error names where the bad value came from


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("classifier:\n  image_sise: 64\n")
    with pytest.raises(ConfigError, match="image_sise") as info:
        load_config(DEFAULT_CONFIG, [bad])
    assert str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "presets, overrides",
    [
        ([], []),
        (
            [QUICK_PRESET],
            [
                "segmenter.loss.kwargs={alpha: 0.7, beta: 0.3}",
                "classifier.finetune_mode=all",
                "data.data_dir=/some/where",
                "segmenter.augment.params={scale_range: [0.8, 1.2]}",
            ],
        ),
    ],
)
def test_saved_config_round_trips(tmp_path, presets, overrides):
    config = load_config(DEFAULT_CONFIG, presets, overrides)
    path = dump_config(config, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == config


def test_cli_flags_resolve_and_an_existing_run_reuses_its_config(tmp_path):
    from pipeline.commands import train as train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    args = parser.parse_args(
        [
            "--quick",
            "--set",
            "classifier.image_size=40",
            "--data-dir",
            str(tmp_path / "d"),
            "--set",
            f"output.runs_dir={tmp_path / 'runs'}",
        ]
    )
    config, run_dir = train_cmd.resolve_config(args)
    assert config.classifier.image_size == 40 and config.classifier.weights == "none"
    assert config.data.data_dir == str(tmp_path / "d")
    assert run_dir.parent == tmp_path / "runs"

    saved = tmp_path / "run"
    saved.mkdir()
    dump_config(replace_in(config, "segmenter.epochs", 9), saved / "config.yaml")
    args = parser.parse_args(["--run-dir", str(saved), "--set", "training.patience=3"])
    resumed, same_dir = train_cmd.resolve_config(args)
    assert same_dir == saved
    assert resumed.segmenter.epochs == 9 and resumed.training.patience == 3
    assert resumed.classifier.image_size == 40  # from the saved config, not configs/default.yaml


def test_the_dataclass_defaults_are_the_default_yaml():
    """One config source: building from the dataclasses alone gives what configs/default.yaml says,
    so the benchmarks and the Python API build the same "default" models as `make train`."""
    from pipeline.training.config import DEFAULT_CONFIG, config_to_dict

    from_yaml = config_to_dict(load_config(DEFAULT_CONFIG))
    from_code = config_to_dict(load_config(None))
    assert from_code == from_yaml


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["segmenter.validate_every=0"], r"segmenter.validate_every: must be >= 1"),
        (["segmenter.validate_every=2", "segmenter.train_on=tumor", "segmenter.monitor=val_dice"],
         r"validate_every > 1 needs the pipeline selection"),
    ],
)
def test_validate_every_below_one_or_without_the_pipeline_selection_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, [], overrides)
    assert load_config(DEFAULT_CONFIG, [], ["segmenter.validate_every=10"]).segmenter.validate_every == 10
