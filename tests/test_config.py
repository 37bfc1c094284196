"""Configuration: YAML + dotted overrides into typed dataclasses; every mistake names the key."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from mlgcn_dist import engine
from mlgcn_dist.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    flatten_config,
    load_config,
    shaping_keys_that_differ,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["coco_gcn", "voc_gcn", "coco_hgat", "toy"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)


def test_coco_gcn_config_is_the_papers_recipe():
    cfg = load_config(REPO / "configs/coco_gcn.yaml")
    assert (cfg.model.backbone, cfg.data.image_size, cfg.model.head) == ("resnet101", 448, "gcn")
    assert (cfg.graph.t, cfg.graph.p) == (0.4, 0.25)
    assert (cfg.optim.lr, cfg.optim.lrp, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.1, 0.9, 1e-4)
    assert cfg.optim.clip_grad == 10.0 and cfg.optim.schedule == "step"


def test_dotted_overrides_are_typed():
    cfg = load_config(REPO / "configs/toy.yaml", ["optim.lr=0.05", "model.backbone=resnet50", "train.compile=true",
                                                  "optim.epoch_step=[3,6]", "log.tags=a,b", "data.workers=0"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.model.backbone == "resnet50"
    assert cfg.train.compile is True
    assert cfg.optim.epoch_step == [3, 6]
    assert cfg.log.tags == ["a", "b"]
    assert cfg.data.workers == 0


def test_integer_is_accepted_where_a_float_is_expected():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("key", ["optim.learning_rate", "lr", "to_yaml.lr"])  # to_yaml: a method, no section
def test_unknown_key_names_it_and_lists_valid_keys(key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=0.1"])
    assert f"unknown config key '{key}'" in str(err.value) and "optim.lr" in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbone: resnet50\n  depth: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "model.depth" in str(err.value)


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config section 'trainer'"):
        load_config(path)


@pytest.mark.parametrize("override", ["data.batch_size=abc", "train.compile=maybe", "optim.lr=[1]",
                                      "data.batch_size=1.5", "train.epochs=true", "train.compile=1",
                                      "optim.lr=true"])
def test_wrong_type_names_key_and_expected_type(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value) and "expects" in str(err.value)


def test_value_outside_choices_lists_them():
    with pytest.raises(ConfigError, match="train.precision' must be one of auto, fp32, bf16, fp16"):
        load_config(None, ["train.precision=fp8"])


def test_an_unknown_worker_start_is_one_error_naming_the_key_and_the_start_methods(tmp_path):
    with pytest.raises(ConfigError, match="'data.worker_start' must be one of auto, fork, forkserver, spawn; got 'threads'"):
        load_config(None, ["data.worker_start=threads"])
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  worker_start: thread\n")
    with pytest.raises(ConfigError, match=f"{path}: 'data.worker_start' must be one of auto, fork, forkserver, spawn"):
        load_config(path)
    assert [load_config(None, [f"data.worker_start={s}"]).data.worker_start for s in ("forkserver", "spawn")] == [
        "forkserver", "spawn"]


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])


def test_impossible_combinations_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.device=cpu", "train.precision=fp16", "data.format=wds", "train.grad_accum=0"])
    text = str(err.value)
    assert "fp16" in text and "data.shards" in text and "grad_accum" in text


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    cfg = load_config(REPO / "configs/coco_gcn.yaml", ["optim.lr=0.01"])
    assert config_from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_a_checkpoints_config_from_an_earlier_version_loads_without_the_keys_since_removed():
    """Every checkpoint saved while a key existed records it: evaluating that checkpoint must still work."""
    cfg = load_config(REPO / "configs/coco_gcn.yaml")
    saved = cfg.to_dict()
    saved["train"]["compile_cpp_wrapper"] = True
    saved["data"]["gpu_resample"] = "matmul"
    assert config_from_dict(saved) == cfg


@pytest.mark.parametrize("key, value, why", [("train.compile_cpp_wrapper", "true", "run H"),
                                             ("data.gpu_resample", "grouped", "run G")])
def test_a_removed_key_set_by_a_user_is_an_error_saying_it_was_removed_and_why(tmp_path, key, value, why):
    section, name = key.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    for source, call in [(str(path), lambda: load_config(path)), (f"override {key}={value}",
                                                                   lambda: load_config(None, [f"{key}={value}"]))]:
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"{source}: config key '{key}' was removed after bench {why}")
        assert message.endswith("(README, Performance); delete it") and "Valid keys" not in message


def test_an_unquoted_number_for_a_text_key_in_yaml_is_an_error_not_another_text(tmp_path):
    """YAML reads run_name: 1.10 as 1.1: saying so beats running under another name. Digits with a leading zero,
    which YAML 1.1 reads as octal (0123 as 83), stay the text written."""
    path = tmp_path / "cfg.yaml"
    for value in ("1.10", "2.50"):
        path.write_text(f"train:\n  run_name: {value}\n")
        with pytest.raises(ConfigError, match=r"'train.run_name' expects a string, got the number .*quote the value"):
            load_config(path)
    for value in ("007", "0123", "'007'"):
        path.write_text(f"train:\n  run_name: {value}\n")
        assert load_config(path).train.run_name == value.strip("'")
    assert load_config(None, ["train.run_name=007"]).train.run_name == "007"  # command-line text stays text


@pytest.mark.parametrize("value", ["010", "0x10", "1:30", "1_000", "0b11"])
@pytest.mark.parametrize("where", ["override", "yaml", "list"])
def test_an_integer_written_otherwise_than_in_decimal_digits_is_refused_not_read_as_yaml_1_1_does(value, where,
                                                                                                    tmp_path):
    """YAML 1.1 read train.epochs=010 as 8 epochs, 0x10 as 16, 1:30 (base 60) as 90, silently."""
    path = tmp_path / "cfg.yaml"
    key = "optim.epoch_step" if where == "list" else "train.epochs"
    path.write_text(f"train:\n  epochs: {value}\n")
    with pytest.raises(ConfigError, match=rf"'{key}' expects a whole number in decimal digits, got '{value}'"):
        if where == "yaml":
            load_config(path)
        else:
            load_config(None, [f"{key}={f'[{value}]' if where == 'list' else value}"])


def test_decimal_integers_with_a_sign_or_zero_are_read_as_numbers(tmp_path):
    cfg = load_config(None, ["train.epochs=+5", "optim.epoch_step=[0,12]", "train.seed=0"])
    assert (cfg.train.epochs, cfg.optim.epoch_step, cfg.train.seed) == (5, [0, 12], 0)


@pytest.mark.parametrize("head", ["hgat", "hgat_fc"])
def test_a_head_with_batchnorm_refuses_a_batch_of_one_at_load_time(head):
    """Training would fail at the first step ("Expected more than 1 value per channel")."""
    with pytest.raises(ConfigError, match=f"model.head={head} normalises over the batch"):
        load_config(None, [f"model.head={head}", "data.batch_size=1"])
    load_config(None, ["model.head=gcn", "data.batch_size=1"])


def test_an_exponent_without_a_dot_is_a_float_on_the_command_line_and_in_yaml(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as text: a float key still takes it as the number."""
    from_override = load_config(None, ["optim.weight_decay=1e-4"]).optim.weight_decay
    assert from_override == 1e-4 and isinstance(from_override, float)
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  weight_decay: 1e-4\n  lr: 5e-2\n")
    cfg = load_config(path)
    assert (cfg.optim.weight_decay, cfg.optim.lr) == (1e-4, 5e-2)
    assert isinstance(cfg.optim.weight_decay, float)


@pytest.mark.parametrize("milestones", ["[30,30]", "[30,20]"])
def test_learning_rate_milestones_that_repeat_or_go_back_are_refused(milestones):
    """[30, 30] would apply gamma twice at epoch 30 (lr x 0.01) without a word."""
    with pytest.raises(ConfigError, match=r"optim.epoch_step must be increasing"):
        load_config(None, [f"optim.epoch_step={milestones}"])
    assert load_config(None, ["optim.epoch_step=[30,31]"]).optim.epoch_step == [30, 31]


@pytest.mark.parametrize("decay", ["1", "1.0", "-0.1"])
def test_an_ema_decay_outside_zero_to_one_excluded_is_refused(decay):
    """A decay of 1 freezes the EMA model at its random initialisation."""
    with pytest.raises(ConfigError, match=r"train.ema_decay must lie in \[0, 1\)"):
        load_config(None, [f"train.ema_decay={decay}"])
    assert load_config(None, ["train.ema_decay=0.9999"]).train.ema_decay == 0.9999
    assert load_config(None, ["train.ema_decay=0"]).train.ema_decay == 0.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
    (["optim.lrp=-0.1"], "optim.lrp must be >= 0"),
    (["optim.momentum=1"], r"optim.momentum must be in \[0, 1\)"),
    (["optim.weight_decay=-0.0001"], "optim.weight_decay must be >= 0"),
    (["optim.gamma=0"], "optim.gamma must be > 0"),
    (["optim.asl_clip=1"], r"optim.asl_clip must be in \[0, 1\)"),
    (["graph.t=1.01"], r"graph.t must be in \[0, 1\]"),
    (["graph.p=1.5"], r"graph.p must be in \[0, 1\]"),
    (["data.worker_timeout_s=-1"], "data.worker_timeout_s must be >= 0"),
    (["optim.lr=.inf"], "optim.lr must be a finite number, got inf"),
    (["graph.t=.nan"], "graph.t must be a finite number, got nan"),
    (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1, got 0"),
    (["train.dist_timeout_s=0"], "train.dist_timeout_s must be >= 1, got 0"),
    (["data.max_bad_fraction=-0.1"], r"data.max_bad_fraction must lie in \[0, 1\]"),
    (["data.max_bad_fraction=1.1"], r"data.max_bad_fraction must lie in \[0, 1\]"),
    (["data.steps_per_epoch=1", "train.grad_accum=2"], "data.steps_per_epoch=1 micro-batches cannot fill one "
                                                       "optimiser step of train.grad_accum=2"),
])
def test_a_value_just_outside_its_keys_range_is_refused_naming_the_key_and_the_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_values_on_the_edges_of_their_keys_ranges_are_accepted():
    """0 worker timeout waits forever, lrp 0 freezes the backbone, t and p may be 0 or 1, every micro-batch of
    an epoch may go to one optimiser step."""
    edges = ["data.worker_timeout_s=0", "optim.lrp=0", "optim.momentum=0", "optim.clip_grad=0",
             "optim.asl_clip=0", "graph.t=0", "graph.p=1", "data.max_bad_fraction=1", "data.workers=0",
             "data.eval_batch_size=0", "train.max_steps=0", "data.steps_per_epoch=2", "train.grad_accum=2"]
    cfg = load_config(None, edges)
    assert (cfg.data.worker_timeout_s, cfg.optim.lrp, cfg.graph.t, cfg.graph.p) == (0.0, 0.0, 0.0, 1.0)
    assert load_config(None, ["graph.t=1", "graph.p=0"]).graph.t == 1.0


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b"])
def test_a_run_name_that_is_no_plain_directory_name_is_refused(name):
    """runs/<run_name> must be a directory of its own: ".." or "a/b" would write into another one."""
    with pytest.raises(ConfigError, match="train.run_name must be a plain directory name"):
        load_config(None, [f"train.run_name={name}"])


@pytest.mark.parametrize(("text", "message"), [
    ("optim: 0.1\n", "section 'optim' must be a mapping, got 0.1"),
    ("- optim\n- train\n", "expected a mapping of sections"),
])
def test_a_yaml_file_whose_sections_are_not_mappings_is_an_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: {message}"):
        load_config(path)


def test_an_empty_config_file_gives_the_defaults_and_a_binary_one_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set yet\n")
    assert load_config(path) == Config()
    path.write_bytes(b"\xff\xfe\x00optim")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not valid YAML"):
        load_config(path)


def test_an_override_that_is_not_valid_yaml_names_the_key():
    with pytest.raises(ConfigError, match=r"override optim.epoch_step=\[3,6: 'optim.epoch_step' has a value "
                                          r"that is not valid YAML: '\[3,6'"):
        load_config(None, ["optim.epoch_step=[3,6"])


def test_an_empty_list_override_is_an_empty_list():
    """log.tags= clears the tags (not one empty tag)."""
    assert load_config(None, ["log.tags=", "optim.epoch_step=8,"]).log.tags == []
    assert load_config(None, ["optim.epoch_step=8,"]).optim.epoch_step == [8]


def test_the_run_directory_is_runs_slash_run_name_unless_an_output_dir_is_given(tmp_path):
    assert load_config(None, ["train.run_name=gcn_lr01"]).run_dir == Path("runs/gcn_lr01")
    assert load_config(None, [f"train.output_dir={tmp_path / 'x'}"]).run_dir == tmp_path / "x"


def test_flatten_config_joins_every_level_with_dots_and_keeps_lists_as_values():
    """W&B's config nests the runtime record a level deeper (runtime.system.device) than the sections."""
    nested = {"optim": {"lr": 0.1, "epoch_step": [8, 12]}, "runtime": {"system": {"device": "cpu"}}}
    assert flatten_config(nested) == {"optim.lr": 0.1, "optim.epoch_step": [8, 12],
                                      "runtime.system.device": "cpu"}


def test_shaping_keys_that_differ_names_each_changed_key_and_skips_those_the_checkpoint_did_not_record():
    model = dataclasses.asdict(ModelConfig(gcn_hidden=16))
    saved = {**dataclasses.asdict(ModelConfig(gcn_hidden=256)), "pretrained": "imagenet"}
    del saved["hgat_reduce"]  # a checkpoint from before that key existed
    assert shaping_keys_that_differ(model, saved) == ["model.gcn_hidden=16 (checkpoint: 256)"]
    assert shaping_keys_that_differ(model, {**model, "backbone": "resnet50"}) == [
        "model.backbone=resnet101 (checkpoint: resnet50)"]


@pytest.mark.parametrize("recipe", ["coco_gcn", "voc_gcn", "coco_hgat"])
def test_the_gpu_recipes_decode_in_a_process_of_their_own_and_train_with_cpu_decode_as_they_are(recipe):
    """GPU decode in a process of its own beat it in a thread (README Performance, run I); with CPU decode, which
    the README advises on hosts with many cores per GPU, the setting is unused, not an error: the loader's workers
    augment and no process starts."""
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    assert cfg.data.augment_process and cfg.data.decode == "auto"
    cpu = load_config(REPO / "configs" / f"{recipe}.yaml", ["data.decode=cpu"])
    assert cpu.data.augment_process
    assert engine._device_augments(cpu, engine.resolve_decode(cpu, torch.device("cuda")), torch.device("cuda")) == (
        None, None, None)
