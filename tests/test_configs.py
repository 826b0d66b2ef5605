"""Every accelerate config in configs/ loads with accelerate's own loader and says what its name says.

accelerate engages FSDP and DeepSpeed only on GPUs (docs/offline.md), so these tests stop where a GPU
would be needed: they parse each file as `accelerate launch --config_file` does, build the launcher's
environment from it, and build accelerate's FSDP / DeepSpeed plugin from that environment (which
rejects bad combinations, e.g. a forward_prefetch under FSDP2). DeepSpeed itself is not needed.
"""
import glob
import json
import os
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

# file -> (distributed_type, num_processes, num_machines, ZeRO stage or None)
EXPECTED = {
    "single_gpu.yaml": ("NO", 1, 1, None),
    "ddp_8gpu.yaml": ("MULTI_GPU", 8, 1, None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1, 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1, 3),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", 8, 1, 3),
    "fsdp2.yaml": ("FSDP", 8, 1, None),
    "two_node_fsdp2.yaml": ("FSDP", 16, 2, None),
}


def load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(path)


def launcher_env(path):
    """(args, environment) that `accelerate launch --config_file path sspo.py` would start sspo.py with."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--config_file", path, "sspo.py", "--data", "scored.jsonl"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config.keys())  # as launch_command does
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return args, prepare_multi_gpu_env(args)
    return args, prepare_simple_launcher_cmd_env(args)[1]


def ds_json(config):
    path = config.deepspeed_config["deepspeed_config_file"]
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def test_the_expected_configs_and_no_others():
    assert sorted(os.path.basename(p) for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_its_keys_are_accelerate_launch_flags(path):
    from accelerate.commands.launch import launch_command_parser

    config = load(path)
    kind, processes, machines, _ = EXPECTED[os.path.basename(path)]
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.distributed_type.value == kind
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.mixed_precision == "bf16" and not config.use_cpu
    # accelerate copies fsdp_config / deepspeed_config keys onto launch flags of the same name and
    # ignores any other silently: a misspelt key would be a setting that never takes effect.
    flags = {a.dest for a in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section):
            assert key in flags, f"{os.path.basename(path)}: {section}.{key} is no accelerate launch flag"
    args, _ = launcher_env(path)
    assert args.num_processes == processes and args.mixed_precision == "bf16"


@pytest.mark.parametrize("path", [p for p in CONFIGS if EXPECTED[os.path.basename(p)][0] == "FSDP"], ids=os.path.basename)
def test_fsdp_configs_are_fsdp2_full_shard_with_decoder_layer_wrap(path):
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = load(path).fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # full shard in FSDP2's terms
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]  # the launcher demands both
    assert not fsdp["fsdp_offload_params"]
    _, env = launcher_env(path)
    assert env["FSDP_VERSION"] == "2" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.cpu_ram_efficient_loading


def test_fsdp_wrap_class_is_found_through_sspo_scorer():
    """accelerate looks the layer class up by name inside the module sspo.py prepares (its SequenceScorer)."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    from tiny import make_llama
    from sspo import SequenceScorer

    name = load(os.path.join(ROOT, "configs", "fsdp2.yaml")).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    cls = get_module_class_from_name(SequenceScorer(make_llama()), name)
    assert cls is not None and cls.__name__ == name


@pytest.mark.parametrize("path", [p for p in CONFIGS if EXPECTED[os.path.basename(p)][0] == "DEEPSPEED"], ids=os.path.basename)
def test_deepspeed_configs_work_with_sspo_as_written(path):
    from accelerate.utils import DeepSpeedPlugin

    config = load(path)
    stage = EXPECTED[os.path.basename(path)][3]
    ds = ds_json(config)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    # sspo.py passes no DataLoader to prepare(): "auto" here would stop accelerate with an error.
    assert isinstance(ds["train_micro_batch_size_per_gpu"], int)
    assert ds["gradient_accumulation_steps"] == 1  # sspo.py accumulates --grad_accum itself
    # "auto" bucket sizes need model.config, which sspo.py's SequenceScorer wrapper lacks.
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert zero.get(key, 0) != "auto", key
    assert "optimizer" not in ds and "scheduler" not in ds  # sspo.py builds its own
    offload = "offload" in os.path.basename(path)
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # else get_state_dict cannot gather
        assert config.deepspeed_config["zero3_init_flag"] is True
    assert zero.get("offload_optimizer", {}).get("device", "none") == ("cpu" if offload else "none")
    if offload:
        assert ds["zero_force_ds_cpu_optimizer"] is False  # else RMSprop becomes DeepSpeedCPUAdam
    _, env = launcher_env(path)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage and plugin.zero3_init_flag == (stage == 3)
    assert plugin.offload_optimizer_device == ("cpu" if offload else "none")
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 1


def test_two_node_config_names_a_rendezvous():
    config = load(os.path.join(ROOT, "configs", "two_node_fsdp2.yaml"))
    assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
    assert config.num_processes % config.num_machines == 0


def test_gpu_configs_script_single_device_path_on_cpu(tmp_path):
    """bench/gpu_configs.sh's CPU smoke: sspo.py under configs/single_gpu.yaml trains, reloads and resumes exactly."""
    import subprocess

    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_configs.sh"), "--cpu-smoke", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    row = next(line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if line.startswith("| single_gpu |"))
    assert "| ok | 4 |" in row and "reloads; resumed at step 2, max weight diff vs uninterrupted 0.0e+00" in row
