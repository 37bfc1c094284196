"""The DeepSpeed config a run hands to Accelerate: the user's JSON or `accelerate launch`'s flags, checked and filled
from our config; whatever DeepSpeed or Accelerate would get wrong, or ignore, is one ConfigError naming file and key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlgcn_dist.config import ConfigError, load_config
from mlgcn_dist.deepspeed_config import deepspeed_config, launcher_wants_deepspeed

# What `accelerate launch` puts into its children's environment for DeepSpeed.
LAUNCHER_ENV = ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH",
                "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                "ACCELERATE_GRADIENT_CLIPPING")


def ds_json(tmp_path: Path, **blocks) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **blocks}))
    return path


def filled(path: Path | None, *overrides: str, world_size: int = 1) -> dict:
    given = [f"train.deepspeed={path}"] if path else []
    return deepspeed_config(load_config(None, [*given, *overrides]), world_size=world_size)


@pytest.fixture(autouse=True)
def launcher(monkeypatch):
    """The environment `accelerate launch` would give: none of its DeepSpeed settings unless a test sets them."""
    for key in LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------- filled from our config


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_deepspeed_json_takes_batch_sizes_clipping_and_precision_from_our_config_over_its_own(tmp_path, precision):
    path = ds_json(tmp_path, gradient_clipping=1.0, train_batch_size=1, gradient_accumulation_steps=1,
                   bf16={"enabled": precision != "bf16"})
    ds = filled(path, "data.batch_size=8", "train.grad_accum=3", "optim.clip_grad=5.0", f"train.precision={precision}",
                world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4  # the global batch: per device x accumulation x processes
    assert ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["zero_optimization"] == {"stage": 2}  # DeepSpeed's own business is kept as written


def test_the_rest_of_the_users_fp16_block_is_kept_beside_the_enabled_flag_our_precision_sets(tmp_path):
    ds = filled(ds_json(tmp_path, fp16={"enabled": False, "loss_scale_window": 500, "initial_scale_power": 12}),
                "train.precision=fp16")
    assert ds["fp16"] == {"enabled": True, "loss_scale_window": 500, "initial_scale_power": 12}
    assert filled(ds_json(tmp_path), "train.precision=fp16")["fp16"]["initial_scale_power"] == 16


@pytest.mark.parametrize("force", [None, True])
def test_optimizer_offload_keeps_our_sgd_where_accelerate_would_swap_in_deepspeeds_cpu_adam(tmp_path, force):
    """Accelerate replaces a torch optimiser by DeepSpeedCPUAdam under offload unless zero_force_ds_cpu_optimizer is
    false: found training with Adam's update (no momentum), its loss 0.44 against SGD's 0.69 after 14 steps."""
    extra = {} if force is None else {"zero_force_ds_cpu_optimizer": force}
    path = ds_json(tmp_path, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}, **extra)
    assert filled(path)["zero_force_ds_cpu_optimizer"] is (False if force is None else force)  # asked for: kept
    assert "zero_force_ds_cpu_optimizer" not in filled(ds_json(tmp_path))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_buffers_follow_a_half_precision_and_zero_allows_our_two_group_sgd(tmp_path, precision):
    """DeepSpeed casts only the parameters to bf16/fp16: BatchNorm's running statistics and the graph must
    follow (buffer_dtype), or the first forward mixes dtypes."""
    ds = filled(ds_json(tmp_path), f"train.precision={precision}")
    assert ds.get("data_types") == (None if precision == "fp32" else {"buffer_dtype": precision})
    assert ds["zero_allow_untested_optimizer"] is True and ds["steps_per_print"] == 10**9
    own = filled(ds_json(tmp_path, data_types={"buffer_dtype": "fp32"}, steps_per_print=50),
                 "train.precision=bf16")
    assert (own["data_types"], own["steps_per_print"]) == ({"buffer_dtype": "fp32"}, 50)  # the user's, kept


# ------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize("stage", [3, "3", None, True])
def test_a_deepspeed_json_asking_for_zero3_or_no_stage_number_is_refused_naming_the_file(tmp_path, stage):
    """ZeRO-3 crashed: with EMA at start (copying empty weight placeholders), without it at the first best.pt."""
    path = ds_json(tmp_path, zero_optimization={"stage": stage})
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: zero_optimization.stage must be 0, 1 or 2"):
        filled(path, world_size=2)


@pytest.mark.parametrize("content, message", [
    ([], "expected a JSON object .*got list"),
    ({}, "zero_optimization must be an object holding the ZeRO stage"),  # Accelerate's error named no file
    ({"zero_optimization": 2}, "zero_optimization must be an object holding the ZeRO stage, e.g. .*got 2"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com: Extra inputs"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size is "
                                                                        "\"auto\", which Accelerate fills only"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "remove the 'optimizer' block"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' block"),
    ('{"zero_optimization": {"stage": 2}', "not valid JSON"),  # text: a file cut short
    ({"zero_optimization": {"stage": 2}, "bf16": True}, "bf16 must be an object .*got True"),
])
def test_a_deepspeed_json_deepspeed_would_refuse_late_or_without_naming_it_is_refused_naming_file_and_key(
    tmp_path, content, message
):
    """A misspelt ZeRO key and "auto" bucket sizes failed at prepare, after the model and data were set up."""
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: {message}"):
        filled(path)


def test_a_stage_written_as_text_is_read_as_deepspeed_reads_it(tmp_path):
    assert filled(ds_json(tmp_path, zero_optimization={"stage": "2"}))["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize("stage", [0, 1])
def test_zero_stages_below_2_are_accepted(tmp_path, stage):
    ds = filled(ds_json(tmp_path, zero_optimization={"stage": stage}))
    assert ds["zero_optimization"] == {"stage": stage}


def test_a_deepspeed_json_that_is_not_there_is_refused_naming_where_it_was_given(tmp_path, launcher):
    missing = tmp_path / "nowhere.json"
    not_found = f"DeepSpeed config not found: {re.escape(str(missing))}$"
    with pytest.raises(ConfigError, match=f"^train.deepspeed: {not_found}"):
        filled(missing)
    launcher.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(missing))
    with pytest.raises(ConfigError, match=f"^the accelerate config's deepspeed_config_file: {not_found}"):
        filled(None)


# --------------------------------------------------------------------------------- accelerate launch flags


def test_under_accelerate_launch_without_train_deepspeed_the_launchers_json_is_read(tmp_path, launcher):
    launcher.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json(tmp_path, wall_clock_breakdown=True)))
    ds = filled(None, "data.batch_size=4", world_size=2)
    assert ds["wall_clock_breakdown"] is True and ds["train_batch_size"] == 8


def test_under_accelerate_launch_without_any_json_its_zero_stage_and_optimizer_offload_are_used(launcher):
    assert filled(None)["zero_optimization"] == {"stage": 2}  # no --zero_stage: Accelerate's default
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert filled(None)["zero_optimization"] == {"stage": 1}
    launcher.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")  # it was dropped without a word
    ds = filled(None)
    assert ds["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_accelerate_launch_asking_for_zero3_or_weight_offload_is_refused(launcher):
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="<accelerate launcher>: zero_optimization.stage must be 0, 1 or 2, got 3"):
        filled(None)
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    launcher.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    with pytest.raises(ConfigError, match="--offload_param_device: offloading the weights needs ZeRO-3"):
        filled(None)


@pytest.mark.parametrize("env, value, message", [
    ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", r"--zero_stage 1 disagrees with .*zero_optimization.stage: 2"),
    ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu",
     r"--offload_optimizer_device cpu disagrees with .*zero_optimization.offload_optimizer.device: none"),
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4",
     "--gradient_accumulation_steps 4 disagrees with train.grad_accum=1"),
    ("ACCELERATE_GRADIENT_CLIPPING", "1.0", "--gradient_clipping 1.0 disagrees with optim.clip_grad=10.0"),
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "four", "--gradient_accumulation_steps four disagrees with"),
])
def test_an_accelerate_launch_flag_that_disagrees_with_the_json_or_our_config_is_refused_not_ignored(
    tmp_path, launcher, env, value, message
):
    launcher.setenv(env, value)
    with pytest.raises(ConfigError, match=f"accelerate launch {message}"):
        filled(ds_json(tmp_path), "train.grad_accum=1", "optim.clip_grad=10")


def test_accelerate_launch_flags_that_agree_with_the_json_and_our_config_are_fine(tmp_path, launcher):
    for env, value in (("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"), ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2"),
                       ("ACCELERATE_GRADIENT_CLIPPING", "10.0"),
                       ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")):
        launcher.setenv(env, value)
    assert filled(ds_json(tmp_path), "train.grad_accum=2", "optim.clip_grad=10")["zero_optimization"]["stage"] == 2


def test_a_json_without_a_stage_is_zero_0_for_a_zero_stage_flag_to_agree_with(tmp_path, launcher):
    """DeepSpeed's default stage is 0."""
    path = ds_json(tmp_path, zero_optimization={})
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
    assert filled(path)["zero_optimization"] == {}
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ConfigError, match=r"--zero_stage 2 disagrees with .*zero_optimization.stage: 0\)"):
        filled(path)


@pytest.mark.parametrize(("value", "wanted"),
                         [("true", True), ("True", True), ("false", False), (None, False)])
def test_the_launcher_asks_for_deepspeed_as_accelerate_reads_its_flag(launcher, value, wanted):
    if value is not None:
        launcher.setenv("ACCELERATE_USE_DEEPSPEED", value)
    assert launcher_wants_deepspeed() is wanted
