"""The typed config: TOML round trip, the shipped presets, overrides, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from envtune.environments.types import FeedbackMode, PromptStyle
from envtune.runtime.config import (
    CPU_CONFIG_PATH,
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    RewardKind,
    describe_keys,
    dump_toml,
    from_dict,
    load_config,
    with_overrides,
)


def test_shipped_default_is_generated_from_the_dataclasses() -> None:
    # Regenerate with `python -m envtune.runtime.config --write-default` after changing a default.
    assert DEFAULT_CONFIG_PATH.read_text(encoding="utf-8") == dump_toml(Config())
    assert load_config(DEFAULT_CONFIG_PATH) == Config()


def test_paper_preset_has_the_four_stages_of_the_paper() -> None:
    stages = Config().curriculum.stages
    assert [s.reward for s in stages] == [RewardKind.STAGE1, *[RewardKind.PROGRESS] * 3]
    assert [s.feedback for s in stages] == [
        FeedbackMode.STANDARD,
        FeedbackMode.AUGMENTED,
        FeedbackMode.AUGMENTED,
        FeedbackMode.STANDARD,
    ]
    assert [s.prompt_style for s in stages] == [PromptStyle.BASIC] * 2 + [PromptStyle.RESOURCEFUL] * 2
    assert stages[0].categories == ("base",) and stages[0].max_tasks == 75
    assert stages[1].categories == ("base",)
    assert len(stages[2].categories) == len(stages[3].categories) == 4
    assert all(s.data == "train_minus_validation" for s in stages)
    learner = Config().learner
    assert (learner.clip_low, learner.clip_high, learner.kl_coef, learner.entropy_coef) == (
        0.2,
        0.28,
        0.1,
        0.001,
    )
    assert Config().rollout.group_size == 16


def test_round_trip_of_a_non_default_config() -> None:
    config = with_overrides(
        Config(),
        [
            "rollout.group_size=3",
            "rollout.sampling.temperature=0.5",
            "engine.sglang_urls=http://a:1,http://b:2",
            "engine.kind=sglang",
            "model.path=/models/x",
            "curriculum.stages.*.promotion.max_steps=2",
            "curriculum.stages.2.feedback=standard",
            "curriculum.stages.hard.constrained=true",
            'run.name="quoted name"',
        ],
    )
    assert config.engine.sglang_urls == ("http://a:1", "http://b:2")
    assert config.curriculum.stages[1].feedback is FeedbackMode.STANDARD
    assert config.curriculum.stages[2].constrained is True
    assert config.run.name == "quoted name"
    assert all(s.promotion.max_steps == 2 for s in config.curriculum.stages)
    assert config.derived.total_step_budget == 8
    assert config.derived.episodes_per_step == 3 * config.rollout.groups_per_step
    text = dump_toml(config)
    assert from_dict(tomllib.loads(text)) == config


def test_cpu_preset_is_small_and_valid() -> None:
    config = load_config(CPU_CONFIG_PATH)
    assert config.engine.kind == "embedded" and config.model.path == ""
    assert len(config.curriculum.stages) == 4
    assert all(0 < s.promotion.max_steps <= 5 for s in config.curriculum.stages)
    assert config.rollout.group_size <= 4
    assert config.rollout.sampling.max_new_tokens <= 128


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.gruop_size=3"], "unknown key 'rollout.gruop_size'; valid keys here: ['group_size'"),
        (["rollout.group_size=x"], "rollout.group_size: cannot parse 'x' as int"),
        (["rollout.group_size=1.5"], "rollout.group_size: expected an integer"),
        (["run.progress_bar=maybe"], "run.progress_bar"),
        (["engine.kind=docker"], "engine.kind: expected one of ['embedded', 'sglang', 'launch']"),
        (["curriculum.stages.1.feedback=loud"], "expected one of ['standard', 'augmented']"),
        (["curriculum.stages.9.name=x"], "stage number 9 out of range 1..4"),
        (["curriculum.stages.nope.max_tasks=1"], "no stage 'nope'"),
        (
            ["curriculum.stages.1.promotion.metric=", "curriculum.stages.1.promotion.max_steps=0"],
            "never ends",
        ),
        (["curriculum.stages.1.data=test"], "curriculum.stages.1.data: expected one of"),
        (["curriculum.stages.1.categories=base,web"], "['web']"),
        (["model=3"], "model is a table"),
        (["rollout.group_size"], "not of the form key=value"),
        (["rollout.group_size=0"], "rollout.group_size must be >= 1"),
        (["engine.kind=sglang"], "needs engine.sglang_urls"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), overrides)
    assert message in str(info.value)


def test_bad_toml_files(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[learner]\nlr = 1e-5\nkl = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learner.kl'.*kl_coef"):
        load_config(bad_key)
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text('[learner]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"learner\.lr: expected a number"):
        load_config(bad_type)
    bad_stage = tmp_path / "bad_stage.toml"
    bad_stage.write_text(
        '[[curriculum.stages]]\nreward = "progress"\n[curriculum.stages.promotion]\nmax_steps = 1\n'
    )
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(bad_stage)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_partial_toml_keeps_defaults_and_overrides_apply_on_top(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[rollout]\ngroup_size = 4\n")
    config = load_config(path, ["rollout.groups_per_step=2"])
    assert config.rollout.group_size == 4 and config.rollout.groups_per_step == 2
    assert config.learner == Config().learner
    assert config.curriculum == Config().curriculum


def test_every_key_is_documented() -> None:
    rows = describe_keys()
    assert {key for key, _, _ in rows} >= {
        "rollout.group_size",
        "curriculum.stages.<n|name|*>.promotion.metric",
    }
    undocumented = [key for key, _, doc in rows if not doc]
    assert undocumented == []


def test_negative_think_bound_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_think_chars"):
        load_config(None, ["rollout.sampling.max_think_chars=-1"])
