"""The DeepSpeed config a run hands to Accelerate: the user's JSON (or `accelerate launch`'s DeepSpeed flags) checked,
then filled from our config.

The JSON holds only what is DeepSpeed's own business (ZeRO stage, buckets, offload); batch sizes, accumulation,
clipping and precision are derived from our config so the two can never disagree, and the optimiser and schedule
are ours (so the backbone group keeps lr*lrp). Whatever cannot work is refused here, as one ConfigError naming the
file and key, before the model is built: DeepSpeed and Accelerate would fail later, in every rank, or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlgcn_dist.config import Config, ConfigError, get_key

LAUNCHER = Path("<accelerate launcher>")  # where the config comes from without a JSON file: `accelerate launch` flags

# `accelerate launch` flags (the environment its children get) that name what the JSON or our config owns. Flags from
# an accelerate config file are refused as a whole (refuse_accelerate_fields_beside_a_deepspeed_json); these come
# from the command line, and Accelerate ignores them next to a JSON without a word.
_ZERO_FLAGS = {  # flag: (environment variable, key under zero_optimization, its value when the JSON omits it)
    "--zero_stage": ("ACCELERATE_DEEPSPEED_ZERO_STAGE", ("stage",), 0),
    "--offload_optimizer_device": ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", ("offload_optimizer", "device"),
                                   "none"),
    "--offload_optimizer_nvme_path": ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH",
                                      ("offload_optimizer", "nvme_path"), None),
}
_OUR_FLAGS = {  # flag: (environment variable, our key, how to read the flag)
    "--gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "train.grad_accum", int),
    "--gradient_clipping": ("ACCELERATE_GRADIENT_CLIPPING", "optim.clip_grad", float),
}

# The fields of an accelerate config file's deepspeed section that Accelerate refuses next to a DeepSpeed JSON
# (DeepSpeedPlugin._deepspeed_config_checks); `accelerate launch` lists the file's fields in
# ACCELERATE_CONFIG_DS_FIELDS.
_FIELDS_A_DEEPSPEED_JSON_OWNS = frozenset({
    "gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
    "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path", "zero3_save_16bit_model",
    "mixed_precision",
})


def launcher_wants_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config for this run: ``train.deepspeed``, else the launcher's DeepSpeed config file, else
    ``accelerate launch``'s ZeRO flags; checked, then filled from our config."""
    ds, path = _read(cfg)
    _check(ds, path)
    _check_launcher_flags(ds, path, cfg)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * world_size
    ds["gradient_clipping"] = cfg.optim.clip_grad
    # "enabled" is ours; the rest of each block (loss-scale window, ...) stays the user's.
    ds["bf16"] = {**_block(ds, "bf16", path), "enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"initial_scale_power": 16, **_block(ds, "fp16", path), "enabled": cfg.train.precision == "fp16"}
    if cfg.train.precision in ("bf16", "fp16"):
        # DeepSpeed runs the model in that dtype outright (no autocast) and casts only its parameters unless told:
        # BatchNorm's running statistics and the GCN's graph must follow, or the first forward mixes dtypes.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", cfg.train.precision)
    # A non-DeepSpeed optimiser (torch SGD with two groups) under ZeRO needs this flag.
    ds["zero_allow_untested_optimizer"] = True
    if _get(ds["zero_optimization"], ("offload_optimizer", "device"), "none") != "none":
        # Else Accelerate replaces our SGD by DeepSpeedCPUAdam (Adam, no momentum) without a word; DeepSpeed runs
        # torch's SGD on the offloaded fp32 partitions as well.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)
    _refuse_auto(ds, path)
    return ds


def refuse_accelerate_fields_beside_a_deepspeed_json() -> None:
    fields = set(os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")) & _FIELDS_A_DEEPSPEED_JSON_OWNS
    if fields:
        raise ConfigError(
            f"the accelerate config file sets {', '.join(sorted(fields))}, which Accelerate refuses next to a "
            "DeepSpeed config: remove them from it (the DeepSpeed JSON sets the stage, train.precision the precision, "
            "train.grad_accum and optim.clip_grad the rest), as configs/accelerate/deepspeed_zero2.yaml does"
        )


def _read(cfg: Config) -> tuple[dict, Path]:
    config_file = cfg.train.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file == "none":
        zero: dict = {"stage": os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")}  # read as text by _check
        offload = {key[-1]: value for key, value in _launcher_zero_flags().values() if key[0] == "offload_optimizer"}
        if offload.get("device", "none") != "none":
            zero["offload_optimizer"] = offload
        return {"zero_optimization": zero}, LAUNCHER
    path = Path(config_file)
    if not path.is_file():
        source = "train.deepspeed" if cfg.train.deepspeed else "the accelerate config's deepspeed_config_file"
        raise ConfigError(f"{source}: DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object (DeepSpeed's config), got {type(ds).__name__}")
    return ds, path


def _check(ds: dict, path: Path) -> None:
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be an object holding the ZeRO stage, e.g. "
                          f'{{"stage": 2}}, got {zero!r}')
    stage = zero.get("stage", 0)
    if isinstance(stage, str) and stage.strip().isdigit():  # DeepSpeed's pydantic config reads "2" as 2
        stage = zero["stage"] = int(stage)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 2:
        # ZeRO-3 partitions the weights themselves: the EMA copy, the finite-weight check and best.pt read whole
        # weights from the module, which then holds empty placeholders between forwards. On a 45M-parameter
        # model it would save ~0.2 GB of fp32 weights per GPU for an all-gather in every forward and backward.
        raise ConfigError(
            f"{path}: zero_optimization.stage must be 0, 1 or 2, got {stage!r}: ZeRO-3 partitions the weights, "
            "which the EMA, the checkpoints' best.pt/last.pt and the finite-weight check read whole; use "
            "configs/deepspeed/zero2.json (optimiser state and gradients partitioned)"
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{path}: remove the '{key}' block: the optimiser and LR schedule are defined by the optim.* config "
                "so that the backbone group keeps lr*lrp"
            )
    # DeepSpeed's own reading of the block, here rather than at prepare (after the model and data are set up).
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        problems = "; ".join(f"zero_optimization.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{path}: {problems}") from err


def _launcher_zero_flags() -> dict[str, tuple[tuple[str, ...], object]]:
    """The ZeRO flags given to `accelerate launch`: flag -> (key under zero_optimization, value)."""
    return {flag: (key, os.environ[env]) for flag, (env, key, _) in _ZERO_FLAGS.items() if env in os.environ}


def _check_launcher_flags(ds: dict, path: Path, cfg: Config) -> None:
    """`accelerate launch` flags that disagree with the JSON or our config are refused: Accelerate would ignore them
    silently (the run would not be the one asked for)."""
    if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() != "none":
        raise ConfigError("accelerate launch --offload_param_device: offloading the weights needs ZeRO-3, which this "
                          "trainer refuses; --offload_optimizer_device (ZeRO-1/2) is supported")
    if path != LAUNCHER:
        for flag, (key, value) in _launcher_zero_flags().items():
            default = _ZERO_FLAGS[flag][2]
            if value != str(_get(ds["zero_optimization"], key, default)):
                raise ConfigError(
                    f"accelerate launch {flag} {value} disagrees with {path} (zero_optimization.{'.'.join(key)}: "
                    f"{_get(ds['zero_optimization'], key, default)}), which wins under Accelerate: drop the flag or "
                    "change the file"
                )
    for flag, (env, ours, read) in _OUR_FLAGS.items():
        if env not in os.environ:
            continue
        configured = get_key(cfg, ours)
        try:
            given = read(os.environ[env])
        except ValueError:
            given = os.environ[env]
        if given != configured:
            raise ConfigError(f"accelerate launch {flag} {os.environ[env]} disagrees with {ours}={configured}, which "
                              f"sets it for DeepSpeed: drop the flag, or set {ours}")


def _block(ds: dict, key: str, path: Path) -> dict:
    block = ds.get(key, {})
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: {key} must be an object (its 'enabled' is set from train.precision), got {block!r}")
    return block


def _get(block: dict, key: tuple[str, ...], default: object) -> object:
    for part in key:
        if not isinstance(block, dict) or part not in block:
            return default
        block = block[part]
    return block


def _refuse_auto(ds: dict, path: Path, where: str = "") -> None:
    """Accelerate fills "auto" values from a transformers model's config (hidden_size), which a CNN has not."""
    for key, value in ds.items():
        if isinstance(value, dict):
            _refuse_auto(value, path, f"{where}{key}.")
        elif value == "auto":
            raise ConfigError(f"{path}: {where}{key} is \"auto\", which Accelerate fills only for transformers "
                              "models: give a number (configs/deepspeed/zero2.json has bucket sizes for this model)")
