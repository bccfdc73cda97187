"""The typed configs: TOML round trip, the shipped presets, overrides, clear errors, one declaration
per knob."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from envtune.agents.config import SamplingConfig
from envtune.environments.episode import EpisodeConfig
from envtune.environments.types import FeedbackMode, PromptStyle, RewardKind
from envtune.optim.config import LearnerConfig, LossConfig, WeightLevel, WeightMode
from envtune.runtime.recipe import config_io
from envtune.runtime.recipe.config import (
    CPU_PRESET,
    PAPER_PRESET,
    Config,
    ConfigError,
    EvalConfig,
    ServeConfig,
    dump_config,
    load_config,
)
from envtune.runtime.rollout import RolloutConfig


def test_shipped_paper_preset_is_generated_from_the_dataclasses() -> None:
    # Regenerate with `python -m envtune.runtime.recipe.config --write-default` after changing a default.
    assert PAPER_PRESET.read_text(encoding="utf-8") == dump_config(Config())
    assert load_config(PAPER_PRESET) == Config()


def test_paper_preset_has_the_four_stages_of_the_paper() -> None:
    stages = Config().curriculum.stages
    assert [s.reward for s in stages] == [RewardKind.STAGE1, *[RewardKind.PROGRESS] * 3]
    assert [s.episode.feedback for s in stages] == [
        FeedbackMode.STANDARD,
        FeedbackMode.AUGMENTED,
        FeedbackMode.AUGMENTED,
        FeedbackMode.STANDARD,
    ]
    assert [s.episode.prompt_style for s in stages] == [PromptStyle.BASIC] * 2 + [PromptStyle.RESOURCEFUL] * 2
    assert all(s.episode.max_steps_per_turn == 6 for s in stages)
    assert stages[0].categories == ("base",) and stages[0].max_tasks == 75
    assert stages[1].categories == ("base",)
    assert len(stages[2].categories) == len(stages[3].categories) == 4
    assert all(s.data == "train_minus_validation" for s in stages)
    loss = Config().learner.loss
    assert (loss.clip_low, loss.clip_high, loss.dual_clip, loss.kl_coef, loss.entropy_coef) == (
        0.2,
        0.28,
        10.0,
        0.1,
        0.001,
    )
    assert Config().rollout.group_size == 16 and Config().rollout.groups_per_step == 32


def test_components_take_their_own_sections_unchanged() -> None:
    config = Config()
    assert type(config.sampling) is SamplingConfig
    assert type(config.rollout) is RolloutConfig
    assert type(config.learner) is LearnerConfig
    assert type(config.curriculum.stages[0].episode) is EpisodeConfig
    # One declaration per knob: a section's defaults are its component's defaults.
    assert config.rollout == RolloutConfig() and config.learner == LearnerConfig()
    assert config.sampling == SamplingConfig()


def test_round_trip_of_a_non_default_config() -> None:
    config = config_io.with_overrides(
        Config(),
        [
            "rollout.group_size=3",
            "rollout.max_staleness=none",
            "sampling.max_new_tokens=99",
            "engine.sglang.urls=http://a:1,http://b:2",
            "engine.kind=sglang",
            "model.path=/models/x",
            "learner.betas=[0.8, 0.9]",
            "learner.loss.dual_clip=none",
            "learner.loss.behavior_weight_level=sequence",
            "learner.autocast_dtype=bfloat16",
            "curriculum.stages.*.promotion.max_steps=2",
            "curriculum.stages.2.episode.feedback=standard",
            "curriculum.stages.hard.constrained=true",
            'run.name="quoted name"',
        ],
    )
    assert config.engine.sglang.urls == ("http://a:1", "http://b:2")
    assert config.rollout.max_staleness is None and config.sampling.max_new_tokens == 99
    assert config.learner.betas == (0.8, 0.9) and config.learner.loss.dual_clip is None
    assert config.learner.loss.behavior_weight_level is WeightLevel.SEQUENCE
    assert config.learner.autocast_dtype == "bfloat16"
    assert config.curriculum.stages[1].episode.feedback is FeedbackMode.STANDARD
    assert config.curriculum.stages[2].constrained is True
    assert config.run.name == "quoted name"
    assert all(s.promotion.max_steps == 2 for s in config.curriculum.stages)
    assert config.derived.total_step_budget == 8
    assert config.derived.episodes_per_step == 3 * config.rollout.groups_per_step
    text = dump_config(config)
    assert config_io.from_dict(Config, tomllib.loads(text)) == config


def test_every_loss_option_is_a_config_key() -> None:
    keys = {key for key, _, _ in config_io.describe_keys(Config)}
    for f in dataclasses.fields(LossConfig):
        assert f"learner.loss.{f.name}" in keys
    config = config_io.with_overrides(
        Config(),
        [
            "learner.loss.behavior_correction=false",
            "learner.loss.behavior_weight_cap=3.0",
            "learner.loss.behavior_weight_floor=0.5",
            "learner.loss.behavior_weight_mode=mask",
        ],
    )
    loss = config.learner.loss
    assert not loss.behavior_correction
    assert (loss.behavior_weight_cap, loss.behavior_weight_floor) == (3.0, 0.5)
    assert loss.behavior_weight_mode is WeightMode.MASK


def test_cpu_preset_is_small_and_valid() -> None:
    config = load_config(CPU_PRESET)
    assert config.engine.kind == "embedded" and config.model.path == ""
    assert len(config.curriculum.stages) == 4
    assert config.derived.total_step_budget <= 20  # the 10-minute budget of `make run` on 2 cores
    syntax = config.curriculum.stages[0]
    # The learning stage: its own reward, constrained with masks replayed, zero-variance groups dropped.
    assert (syntax.reward, syntax.constrained, syntax.learner_masks, syntax.zero_variance) == (
        "stage1", True, "replay", "drop"
    )
    assert syntax.promotion.metric == "train/reward" and syntax.selection == "shortest"
    assert config.learner.loss.kl_coef == 0.1  # the paper's KL stays on
    assert config.learner.loss.entropy_coef == 0.001  # and the paper's entropy bonus
    assert config.rollout.group_size * config.rollout.groups_per_step <= 32
    assert config.sampling.max_new_tokens <= 128
    # Cheap, sharp episodes: one-line tool signatures, one reply per stage-1 episode, bounded values.
    assert all(stage.episode.tool_listing == "signatures" for stage in config.curriculum.stages)
    assert syntax.max_replies == 1 and config.sampling.max_replies > 1  # later stages see feedback
    assert config.grammar.max_string_chars and config.grammar.max_number_magnitude
    assert config.learner.lora.target_modules == ("lm_head",)  # why: the preset's header


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.gruop_size=3"], "unknown key 'rollout.gruop_size'; valid keys here: ["),
        (["rollout.group_size=x"], "rollout.group_size: cannot parse 'x' as integer"),
        (["rollout.group_size=1.5"], "rollout.group_size: expected an integer"),
        (["run.progress_bar=maybe"], "run.progress_bar"),
        (["engine.kind=docker"], "engine.kind: expected one of ['embedded', 'sglang', 'launch']"),
        (["curriculum.stages.1.episode.feedback=loud"], "expected one of ['standard', 'augmented']"),
        (["curriculum.stages.9.name=x"], "number 9 out of range 1..4"),
        (["curriculum.stages.nope.max_tasks=1"], "no entry 'nope'"),
        (
            ["curriculum.stages.1.promotion.metric=", "curriculum.stages.1.promotion.max_steps=0"],
            "never ends",
        ),
        (["curriculum.stages.1.data=test"], "curriculum.stages.1.data: expected one of"),
        (["curriculum.stages.1.categories=base,web"], "['web']"),
        (["model=3"], "model is a table"),
        (["rollout.group_size"], "not of the form key=value"),
        (["rollout.group_size=0"], "group_size must be >= 1"),
        (["engine.kind=sglang"], "needs engine.sglang.urls"),
        (["learner.lr=nan"], "learner.lr: expected a number, got nan"),
        (["learner.lr=inf"], "lr must be a finite number > 0"),
        (["learner.betas=[0.9]"], "learner.betas: expected a list of 2"),
        (["sampling.top_p=0.9"], "training needs temperature > 0, top_p = 1 and top_k = -1"),
        (["sampling.temperature=0"], "training needs temperature > 0"),
        (["sampling.top_k=50"], "training needs"),
        (["grammar.max_think_chars=-1"], "max_think_chars must be >= 0 or None"),
        (["grammar.max_calls=0"], "max_calls must be in [1, "),
        (
            [
                "curriculum.stages.1.constrained=true",
                "curriculum.stages.1.learner_masks=unconstrained_target",
            ],
            "grammar-constrained samples cannot teach",
        ),
        (["curriculum.stages.2.promotion.plateau_patience=-1"], "plateau_patience must be >= 0"),
        (["curriculum.stages.4.promotion.plateau_patience=2"], "the plateau rule needs a metric"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_io.with_overrides(Config(), overrides)
    assert message in str(info.value)


def test_bad_toml_files(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[learner]\nlr = 1e-5\nkl = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learner.kl'.*loss"):
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
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[run]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_partial_toml_keeps_defaults_and_overrides_apply_on_top(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[rollout]\ngroup_size = 4\n")
    config = load_config(path, ["rollout.groups_per_step=2"])
    assert config.rollout.group_size == 4 and config.rollout.groups_per_step == 2
    assert config.learner == Config().learner
    assert config.curriculum == Config().curriculum


@pytest.mark.parametrize("cls", [Config, EvalConfig, ServeConfig])
def test_every_key_is_documented_and_defaults_round_trip(cls: type) -> None:
    rows = config_io.describe_keys(cls)
    undocumented = [key for key, _, doc in rows if not doc]
    assert undocumented == []
    default = cls()
    text = config_io.dump_toml(default, "title")
    assert config_io.from_dict(cls, tomllib.loads(text)) == default


def test_run_keys_cover_the_stage_array() -> None:
    keys = {key for key, _, _ in config_io.describe_keys(Config)}
    assert {"rollout.group_size", "curriculum.stages.<n|name|*>.promotion.metric"} <= keys
    assert "curriculum.stages.<n|name|*>.episode.max_steps_per_turn" in keys


def test_eval_config_defaults_are_bfcl_conditions() -> None:
    config = EvalConfig()
    assert config.sampling.temperature == 0.0
    # Evaluation samples nothing to train on: greedy and truncated sampling stay allowed there.
    truncated = config_io.with_overrides(config, ["sampling.top_p=0.9", "sampling.top_k=20"])
    sampling = truncated.sampling
    assert (sampling.top_p, sampling.top_k, sampling.temperature) == (0.9, 20, 0.0)
    assert config.conditions.episode.feedback is FeedbackMode.STANDARD
    assert config.conditions.episode.max_steps_per_turn == 20
    assert config.tasks.split == "test"
    with pytest.raises(ConfigError, match="categories"):
        config_io.with_overrides(config, ["tasks.categories=base,web"])
