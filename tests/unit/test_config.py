"""The config tree: YAML storage, strict typing, dotted overrides, validation rules, helpers."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

import pytest
import yaml

from mm1_moe.config import (
    Config,
    ConfigError,
    DecoderConfig,
    MoEConfig,
    VisionConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    data_parallel_size,
    dump_config,
    load_config,
    read_yaml,
    validate,
    validate_layout,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))
TINY_DENSE = str(CONFIG_DIR / "tiny-dense.yaml")
TINY_MOE = str(CONFIG_DIR / "tiny-moe.yaml")


def raises(text: str):
    """``pytest.raises(ConfigError)`` whose message contains ``text`` literally."""
    return pytest.raises(ConfigError, match=re.escape(text))


def tiny_moe(*overrides: str) -> Config:
    """tiny-moe.yaml with overrides applied, built but not validated."""
    return config_from_dict(apply_overrides(read_yaml(TINY_MOE), overrides))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- shipped configs


def test_configs_dir_is_not_empty():
    names = {p.name for p in CONFIG_FILES}
    assert {"default.yaml", "tiny-dense.yaml", "tiny-moe.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_loads_validates_and_round_trips(path, tmp_path):
    config = load_config(str(path))
    assert isinstance(config, Config)
    assert validate(config) is config
    assert config.model.name == read_yaml(str(path))["model"]["name"]

    out = tmp_path / "nested" / "dir" / "resolved.yaml"  # dump_config creates the folders
    text = dump_config(config, str(out))
    assert out.read_text(encoding="utf-8") == text
    assert yaml.safe_load(text) == config_to_dict(config)
    again = load_config(str(out))
    assert again == config
    assert dump_config(again) == text  # stable: a second round trip changes nothing


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_fits_its_smallest_world(path):
    config = load_config(str(path))
    par = config.parallel
    etp = par.expert_tensor_parallel or par.tensor_parallel
    model_parallel = par.tensor_parallel * par.pipeline_parallel
    world = math.lcm(model_parallel, par.expert_parallel * etp * par.pipeline_parallel)
    assert validate_layout(config, world) == world // model_parallel


def test_moe_configs_place_experts_on_the_expected_layers():
    moe3 = load_config(str(CONFIG_DIR / "mm1-3b-moe.yaml")).model.decoder
    moe7 = load_config(str(CONFIG_DIR / "mm1-7b-moe.yaml")).model.decoder
    dense = load_config(str(CONFIG_DIR / "mm1-7b.yaml")).model.decoder
    assert [i for i in range(moe3.num_layers) if moe3.is_moe_layer(i)] == list(range(1, 32, 2))
    assert [i for i in range(moe7.num_layers) if moe7.is_moe_layer(i)] == list(range(3, 32, 4))
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_layers))


def test_defaults_are_a_valid_config():
    assert load_config() == Config()
    assert validate(Config()) == Config()
    assert config_from_dict(None) == Config() == config_from_dict({})


def test_dump_config_without_path_only_returns_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = dump_config(load_config(TINY_MOE))
    assert list(tmp_path.iterdir()) == []
    assert config_from_dict(yaml.safe_load(text)) == load_config(TINY_MOE)


# --------------------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modle": {}}, "modle: unknown key (did you mean model?)"),
        ({"trian": {"steps": 1}}, "trian: unknown key (did you mean train?)"),
        ({"model": {"decoder": {"num_layer": 4}}},
         "model.decoder.num_layer: unknown key (did you mean num_layers?)"),
        ({"model": {"decoder": {"moe": {"top_kk": 2}}}},
         "model.decoder.moe.top_kk: unknown key (did you mean top_k?)"),
        ({"model": {"decoder": {"moe": {"num_expert": 2}}}},
         "model.decoder.moe.num_expert: unknown key (did you mean num_experts?)"),
        ({"parallel": {"tensor_paralel": 2}},
         "parallel.tensor_paralel: unknown key (did you mean tensor_parallel?)"),
        ({"model": {"decoder": {"moe": {"xyzzy": 1}}}},
         "model.decoder.moe.xyzzy: unknown key (known: num_experts, top_k, layer_freq,"),
    ],
    ids=["top", "top2", "decoder", "moe", "moe2", "parallel", "no-near-key"],
)
def test_unknown_keys_name_the_dotted_path_and_the_near_key(data, message):
    with raises(message):
        config_from_dict(data)


def test_unknown_key_in_a_file_and_in_an_override(tmp_path):
    path = write(tmp_path, "model:\n  decoder:\n    moe: {num_experts: 4, topk: 2}\n")
    with raises("model.decoder.moe.topk: unknown key (did you mean top_k?)"):
        load_config(path)
    with raises("model.decoder.num_layer: unknown key (did you mean num_layers?)"):
        load_config(TINY_DENSE, ["model.decoder.num_layer=4"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"decoder": {"num_layers": "4"}}},
         "model.decoder.num_layers: expected int, got '4'"),
        ({"model": {"vision": {"freeze": 1}}}, "model.vision.freeze: expected bool, got 1"),
        ({"model": {"decoder": {"num_layers": True}}},
         "model.decoder.num_layers: expected int, got True"),
        ({"model": {"decoder": {"num_layers": 4.0}}},
         "model.decoder.num_layers: expected int, got 4.0"),
        ({"model": {"decoder": {"num_layers": None}}},
         "model.decoder.num_layers: expected int, got None"),
        ({"model": {"vision": {"activation": "relu"}}},
         "model.vision.activation: expected one of 'gelu' | 'quick_gelu', got 'relu'"),
        ({"model": {"connector": {"type": "mlp"}}},
         "model.connector.type: expected one of 'c_abstractor' | 'avg_pool' | 'attn_pool', "
         "got 'mlp'"),
        ({"train": {"dtype": "fp16"}}, "train.dtype: expected one of 'fp32' | 'bf16', got 'fp16'"),
        ({"kernels": {"attention": True}}, "kernels.attention: expected one of 'auto' | 'triton' | 'sdpa' | 'flash_attn' | 'local', got True"),
        ({"model": {"decoder": [1, 2]}},
         "model.decoder: expected a mapping of DecoderConfig fields, got [1, 2]"),
        ({"model": {"decoder": {"moe": [4, 2]}}},
         "model.decoder.moe: expected a mapping of MoEConfig fields, got [4, 2]"),
        ({"model": None}, "model: expected a mapping of ModelConfig fields, got None"),
        ({"parallel": 8}, "parallel: expected a mapping of ParallelConfig fields, got 8"),
        ({"model": {"decoder": {"num_layers": {"a": 1}}}},
         "model.decoder.num_layers: expected int, got {'a': 1}"),
        ({"model": {"name": {"first": "x"}}}, "model.name: expected str, got {'first': 'x'}"),
        ({"model": {"name": 5}}, "model.name: expected str, got 5"),
        ({"model": {"decoder": {"num_query_groups": "two"}}},
         "model.decoder.num_query_groups: expected int | null, got 'two'"),
        ({"model": {"decoder": {"moe": {"layer_freq": "every"}}}},
         "model.decoder.moe.layer_freq: expected int | list[int], got 'every'"),
        ({"model": {"decoder": {"moe": {"layer_freq": [1, True]}}}},
         "model.decoder.moe.layer_freq: expected int | list[int], got [1, True]"),
        ({"train": {"lr": True}}, "train.lr: expected float | null, got True"),
        ({"train": {"adam_eps": "small"}}, "train.adam_eps: expected float, got 'small'"),
        ({"train": {"grad_clip": False}}, "train.grad_clip: expected float, got False"),
        ({"train": {"grad_clip": [1.0]}}, "train.grad_clip: expected float, got [1.0]"),
    ],
    ids=["str-for-int", "int-for-bool", "bool-for-int", "float-for-int", "null-for-int",
         "literal", "literal2", "literal3", "bool-for-literal", "list-for-section",
         "list-for-moe", "null-for-section", "int-for-section", "mapping-for-int",
         "mapping-for-str", "int-for-str", "optional-int", "int-or-list", "bool-in-list",
         "bool-for-optional-float", "str-for-float", "bool-for-float", "list-for-float"],
)
def test_wrong_types_name_the_dotted_path_and_the_value(data, message):
    with raises(message):
        config_from_dict(data)


def test_ints_are_accepted_for_floats():
    config = config_from_dict({
        "model": {"decoder": {"rope_theta": 500000, "moe": {"capacity_factor": 2}}},
        "train": {"lr": 1, "grad_clip": 0, "min_lr_ratio": 1},
    })
    for value, expected in ((config.model.decoder.rope_theta, 500000.0),
                            (config.model.decoder.moe.capacity_factor, 2.0),
                            (config.train.lr, 1.0), (config.train.grad_clip, 0.0),
                            (config.train.min_lr_ratio, 1.0)):
        assert type(value) is float and value == expected


def test_optional_fields_accept_null_and_values():
    config = config_from_dict({"model": {"decoder": {"num_query_groups": None,
                                                     "moe": {"expert_ffn_hidden_size": 64}}},
                               "train": {"lr": None}})
    assert config.model.decoder.num_query_groups is None
    assert config.model.decoder.moe.expert_ffn_hidden_size == 64
    assert config.train.lr is None


def test_missing_keys_take_their_defaults():
    config = config_from_dict({"model": {"decoder": {"num_layers": 2}}})
    assert config.model.decoder.num_layers == 2
    assert config.model.decoder.hidden_size == DecoderConfig().hidden_size
    assert config.model.decoder.moe == MoEConfig()
    assert config.model.vision == VisionConfig()


def test_yaml_exponent_without_dot_is_a_float_in_files(tmp_path):
    path = write(tmp_path, (
        "model:\n"
        "  name: nan\n"
        "  decoder: {norm_eps: 1E-6, moe: {num_experts: 4, capacity_factor: 1e0}}\n"
        "train: {lr: 1e-4, adam_eps: 1e-8, weight_decay: +1e-2, output_dir: runs/1e-4}\n"
    ))
    raw = read_yaml(path)
    assert raw["train"]["lr"] == 1e-4 and isinstance(raw["train"]["lr"], float)
    config = load_config(path)
    assert config.train.lr == 1e-4
    assert config.train.adam_eps == 1e-8
    assert config.train.weight_decay == 0.01
    assert config.model.decoder.norm_eps == 1e-6
    assert config.model.decoder.moe.capacity_factor == 1.0
    assert config.train.output_dir == "runs/1e-4"  # only whole float-looking strings
    assert config.model.name == "nan"  # words that float() accepts are left alone


def test_yaml_exponent_inside_lists_in_files_is_a_float(tmp_path):
    assert read_yaml(write(tmp_path, "a: [1e-4, {b: 2e3}]\n")) == {"a": [1e-4, {"b": 2000.0}]}


def test_yaml_exponent_without_dot_is_a_float_in_overrides():
    config = load_config(TINY_MOE, ["train.lr=1e-4", "model.decoder.moe.aux_loss_coeff=1E-3"])
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.model.decoder.moe.aux_loss_coeff == 1e-3


def test_yaml_exponent_inside_a_nested_override_value_is_a_float():
    config = load_config(TINY_MOE, ["train={lr: 1e-4, steps: 3}"])
    assert config.train.lr == 1e-4 and config.train.steps == 3


# --------------------------------------------------------------------------- overrides


def test_override_a_nested_key():
    assert load_config(None, ["model.decoder.num_layers=4"]).model.decoder.num_layers == 4
    config = load_config(TINY_DENSE, ["model.decoder.num_layers=8", "parallel.pipeline_parallel=2"])
    assert config.model.decoder.num_layers == 8 and config.parallel.pipeline_parallel == 2


def test_override_creates_missing_sections_and_keeps_siblings():
    assert apply_overrides({}, ["model.decoder.moe.num_experts=4"]) == {
        "model": {"decoder": {"moe": {"num_experts": 4}}}}
    data = {"model": {"name": "x", "decoder": {"num_layers": 2}}}
    apply_overrides(data, ["model.decoder.hidden_size=32"])
    assert data == {"model": {"name": "x", "decoder": {"num_layers": 2, "hidden_size": 32}}}


def test_override_with_a_mapping_value_replaces_the_section():
    data = apply_overrides(read_yaml(TINY_MOE), ["model.decoder.moe={num_experts: 8, top_k: 1}"])
    assert data["model"]["decoder"]["moe"] == {"num_experts": 8, "top_k": 1}
    moe = config_from_dict(data).model.decoder.moe
    assert (moe.num_experts, moe.top_k, moe.layer_freq) == (8, 1, 1)


def test_override_with_a_list():
    config = load_config(TINY_MOE, ["model.decoder.moe.layer_freq=[1,0,1,0]"])
    assert config.model.decoder.moe.layer_freq == [1, 0, 1, 0]
    assert [config.model.decoder.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    spaced = load_config(TINY_MOE, ["model.decoder.moe.layer_freq = [0, 0, 0, 1]"])
    assert spaced.model.decoder.moe.layer_freq == [0, 0, 0, 1]


@pytest.mark.parametrize("item", ["train.lr=null", "train.lr=", "train.lr=~"])
def test_override_with_null(item):
    assert load_config(TINY_MOE, [item]).train.lr is None


def test_override_values_are_yaml_scalars():
    data = apply_overrides({}, ["a=4", "b=true", "c=1.5", "d=text", "e='4'", "f=x=y"])
    assert data == {"a": 4, "b": True, "c": 1.5, "d": "text", "e": "4", "f": "x=y"}
    with raises("model.decoder.num_layers: expected int, got '4'"):
        load_config(TINY_MOE, ["model.decoder.num_layers='4'"])
    with raises("parallel.sequence_parallel: expected bool, got 1"):
        load_config(TINY_MOE, ["parallel.sequence_parallel=1"])


def test_later_overrides_win():
    config = load_config(TINY_MOE, ["train.steps=5", "train.steps=7"])
    assert config.train.steps == 7


def test_override_without_equals_is_an_error():
    with raises("override 'model.decoder.num_layers': expected dotted.key=value"):
        load_config(TINY_MOE, ["model.decoder.num_layers"])


@pytest.mark.parametrize(
    "item, message",
    [
        ("model.name.first=x", "model.name: is a value, not a section"),
        ("model.decoder.num_layers.x.y=1", "model.decoder.num_layers: is a value, not a section"),
        ("train.steps.value=1", "train.steps: is a value, not a section"),
    ],
)
def test_override_into_a_value_as_if_it_were_a_section(item, message):
    with raises(message):
        apply_overrides(read_yaml(TINY_MOE), [item])
    with raises(message):
        load_config(TINY_MOE, [item])


def test_override_into_a_default_value_is_a_type_error():
    # The key is absent from the data, so the override makes a section; the schema rejects it.
    with raises("model.name: expected str, got {'first': 'x'}"):
        load_config(None, ["model.name.first=x"])


def test_overrides_apply_before_validation():
    with raises("model.decoder.moe.top_k (5) must be between 1"):
        load_config(TINY_MOE, ["model.decoder.moe.top_k=5"])
    # An override can also repair a config that would not validate on its own.
    assert load_config(TINY_MOE, ["model.decoder.moe.top_k=5",
                                  "model.decoder.moe.num_experts=8"]).model.decoder.moe.top_k == 5


# --------------------------------------------------------------------------- validation rules

# tiny-moe: 4 layers, hidden 64, 4 heads, 2 query groups, ffn 128, vocab 256 (pad 128), 128
# positions; 4 experts top-2 every 2nd layer; ViT 56/14 (16 patches), width 32, 2 heads;
# connector 4 tokens; seq 64; micro batch 4, global batch 8.
RULES = [
    # parallel
    ("tp>=1", ["parallel.tensor_parallel=0"], "parallel.tensor_parallel (0) must be >= 1"),
    ("pp>=1", ["parallel.pipeline_parallel=0"], "parallel.pipeline_parallel (0) must be >= 1"),
    ("ep>=1", ["parallel.expert_parallel=0"], "parallel.expert_parallel (0) must be >= 1"),
    ("vp>=1", ["parallel.virtual_pipeline=0"], "parallel.virtual_pipeline (0) must be >= 1"),
    ("vp-needs-pp", ["parallel.virtual_pipeline=2"],
     "parallel.virtual_pipeline (2) needs parallel.pipeline_parallel > 1 (is 1)"),
    ("sp-needs-tp", ["parallel.sequence_parallel=true"],
     "parallel.sequence_parallel needs parallel.tensor_parallel > 1"),
    ("etp==1", ["parallel.expert_tensor_parallel=2"],
     "parallel.expert_tensor_parallel (2) must be 1: the MoE layer keeps whole experts"),
    # decoder sizes
    *[(f"{name}>=1", [f"model.decoder.{name}=0"], f"model.decoder.{name} (0) must be >= 1")
      for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                   "vocab_size", "vocab_pad_multiple", "max_position_embeddings")],
    ("hidden%heads", ["model.decoder.hidden_size=66"],
     "model.decoder.hidden_size (66) is not divisible by model.decoder.num_attention_heads (4)"),
    ("heads%groups", ["model.decoder.num_query_groups=3"],
     "model.decoder.num_attention_heads (4) is not divisible by model.decoder.num_query_groups "
     "(3)"),
    ("groups>=1", ["model.decoder.num_query_groups=0"],
     "model.decoder.num_query_groups (0) must be >= 1"),
    *[(f"{name}>0", [f"model.decoder.{name}=0"], f"model.decoder.{name} (0.0) must be > 0")
      for name in ("rope_theta", "norm_eps", "init_std")],
    ("heads%tp", ["parallel.tensor_parallel=4", "model.decoder.num_attention_heads=2",
                  "model.decoder.num_query_groups=null"],
     "model.decoder.num_attention_heads (2) is not divisible by parallel.tensor_parallel (4)"),
    ("ffn%tp", ["parallel.tensor_parallel=2", "model.decoder.ffn_hidden_size=129"],
     "model.decoder.ffn_hidden_size (129) is not divisible by parallel.tensor_parallel (2)"),
    ("pad%tp", ["parallel.tensor_parallel=2", "model.decoder.vocab_pad_multiple=129"],
     "model.decoder.vocab_pad_multiple (129) is not divisible by parallel.tensor_parallel (2)"),
    ("groups%tp", ["parallel.tensor_parallel=4", "model.decoder.num_attention_heads=8"],
     "model.decoder.num_query_groups (2) is not divisible by parallel.tensor_parallel (4)"),
    ("layers%pp", ["parallel.pipeline_parallel=3"],
     "model.decoder.num_layers (4) is not divisible by parallel.pipeline_parallel (3) x "
     "parallel.virtual_pipeline (1)"),
    ("layers%pp*vp", ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=4"],
     "model.decoder.num_layers (4) is not divisible by parallel.pipeline_parallel (2) x "
     "parallel.virtual_pipeline (4)"),
    ("seq<=positions", ["data.seq_length=256"],
     "data.seq_length (256) exceeds model.decoder.max_position_embeddings (128)"),
    # moe
    ("experts>=0", ["model.decoder.moe.num_experts=-1"],
     "model.decoder.moe.num_experts (-1) must be >= 0 (0 means dense)"),
    ("ep-needs-moe", ["model.decoder.moe.num_experts=0", "parallel.expert_parallel=2"],
     "parallel.expert_parallel (2) needs MoE layers, but model.decoder.moe.num_experts is 0"),
    ("experts%ep", ["model.decoder.moe.num_experts=63", "parallel.expert_parallel=8"],
     "model.decoder.moe.num_experts (63) is not divisible by parallel.expert_parallel (8)"),
    ("top_k>experts", ["model.decoder.moe.top_k=5"],
     "model.decoder.moe.top_k (5) must be between 1 and model.decoder.moe.num_experts (4)"),
    ("top_k>=1", ["model.decoder.moe.top_k=0"], "model.decoder.moe.top_k (0) must be >= 1"),
    ("dense-top_k>=1", ["model.decoder.moe.num_experts=0", "model.decoder.moe.top_k=-1"],
     "model.decoder.moe.top_k (-1) must be >= 1"),
    ("capacity=0", ["model.decoder.moe.capacity_factor=0"],
     "model.decoder.moe.capacity_factor (0.0) must be > 0, or null for dropless routing"),
    ("capacity<0", ["model.decoder.moe.capacity_factor=-1.5"],
     "model.decoder.moe.capacity_factor (-1.5) must be > 0, or null for dropless routing"),
    ("expert_ffn>=1", ["model.decoder.moe.expert_ffn_hidden_size=0"],
     "model.decoder.moe.expert_ffn_hidden_size (0) must be >= 1"),
    *[(f"{name}>=0", [f"model.decoder.moe.{name}=-0.5"],
       f"model.decoder.moe.{name} (-0.5) must be >= 0")
      for name in ("aux_loss_coeff", "z_loss_coeff")],
    ("jitter>=0", ["model.decoder.moe.router_jitter=-0.5"],
     "model.decoder.moe.router_jitter (-0.5) must be >= 0 and < 1 (0 disables)"),
    ("jitter<1", ["model.decoder.moe.router_jitter=1"],
     "model.decoder.moe.router_jitter (1.0) must be >= 0 and < 1 (0 disables)"),
    ("freq-list-short", ["model.decoder.moe.layer_freq=[1,0,1]"],
     "model.decoder.moe.layer_freq has 3 entries but model.decoder.num_layers is 4"),
    ("freq-list-long", ["model.decoder.moe.layer_freq=[1,0,1,0,1]"],
     "model.decoder.moe.layer_freq has 5 entries but model.decoder.num_layers is 4"),
    ("freq-list-0/1", ["model.decoder.moe.layer_freq=[1,0,2,0]"],
     "model.decoder.moe.layer_freq ([1, 0, 2, 0]) must contain only 0 and 1"),
    ("freq=0", ["model.decoder.moe.layer_freq=0"],
     "model.decoder.moe.layer_freq (0) must be between 1 and model.decoder.num_layers (4)"),
    ("freq>layers", ["model.decoder.moe.layer_freq=5"],
     "model.decoder.moe.layer_freq (5) must be between 1 and model.decoder.num_layers (4)"),
    # vision and connector
    ("image%patch", ["model.vision.patch_size=15"],
     "model.vision.image_size (56) is not divisible by model.vision.patch_size (15)"),
    ("patch>=1", ["model.vision.patch_size=0"], "model.vision.patch_size (0) must be >= 1"),
    *[(f"vit-{name}>=1", [f"model.vision.{name}=0"], f"model.vision.{name} (0) must be >= 1")
      for name in ("image_size", "width", "depth", "mlp_dim")],
    ("vit-eps>0", ["model.vision.layernorm_eps=0"], "model.vision.layernorm_eps (0.0) must be > 0"),
    ("width%heads", ["model.vision.num_heads=3"],
     "model.vision.width (32) is not divisible by model.vision.num_heads (3)"),
    ("vit-heads>=1", ["model.vision.num_heads=0"], "model.vision.num_heads (0) must be >= 1"),
    ("tokens-square", ["model.connector.num_tokens=5"],
     "model.connector.num_tokens (5) must be a square (e.g. 64 or 144): the connector pools to "
     "a square grid"),
    ("tokens>=1", ["model.connector.num_tokens=0"],
     "model.connector.num_tokens (0) must be a square"),
    ("tokens<=patches", ["model.connector.num_tokens=25"],
     "model.connector.num_tokens (25) exceeds the encoder's patches (16 = "
     "(model.vision.image_size / patch_size)^2)"),
    ("connector-depth", ["model.connector.depth=0"], "model.connector.depth (0) must be >= 1"),
    ("connector-hidden", ["model.connector.hidden_size=-1"],
     "model.connector.hidden_size (-1) must be >= 1"),
    # train and data
    ("steps>=1", ["train.steps=0"], "train.steps (0) must be >= 1"),
    ("micro>=1", ["train.micro_batch_size=0"], "train.micro_batch_size (0) must be >= 1"),
    ("global>=1", ["train.global_batch_size=0"], "train.global_batch_size (0) must be >= 1"),
    ("log_interval>=1", ["train.log_interval=0"], "train.log_interval (0) must be >= 1"),
    ("save_interval>=0", ["train.save_interval=-1"],
     "train.save_interval (-1) must be >= 0 (0: final only)"),
    ("global%micro", ["train.global_batch_size=10"],
     "train.global_batch_size (10) is not divisible by train.micro_batch_size (4)"),
    ("lr>0", ["train.lr=0"], "train.lr (0.0) must be > 0, or null for MM1's law"),
    ("lr<0", ["train.lr=-1e-3"], "train.lr (-0.001) must be > 0, or null for MM1's law"),
    ("min_lr>1", ["train.min_lr_ratio=1.5"], "train.min_lr_ratio (1.5) must be within [0, 1]"),
    ("min_lr<0", ["train.min_lr_ratio=-0.1"], "train.min_lr_ratio (-0.1) must be within [0, 1]"),
    ("warmup>=0", ["train.warmup_steps=-1"], "train.warmup_steps (-1) must be >= 0"),
    ("wd>=0", ["train.weight_decay=-0.1"],
     "train.weight_decay (-0.1) must be >= 0, or null for 0.1 x the peak lr"),
    *[(f"{name}<1", [f"train.{name}=1"], f"train.{name} (1.0) must be within [0, 1)")
      for name in ("adam_beta1", "adam_beta2")],
    ("beta1>=0", ["train.adam_beta1=-0.1"], "train.adam_beta1 (-0.1) must be within [0, 1)"),
    ("adam_eps>0", ["train.adam_eps=0"], "train.adam_eps (0.0) must be > 0"),
    ("peak_tflops>0", ["train.peak_tflops=0"], "train.peak_tflops (0.0) must be > 0, or null"),
    ("grad_clip>=0", ["train.grad_clip=-1"], "train.grad_clip (-1.0) must be >= 0 (0 disables)"),
    ("recompute_num_layers>=1", ["train.recompute_num_layers=0"],
     "train.recompute_num_layers (0) must be >= 1"),
    ("recompute-group-divides-stage", ["train.recompute=full", "parallel.pipeline_parallel=2",
                                       "train.recompute_num_layers=4"],
     "train.recompute_num_layers (4) does not divide the 2 decoder layers of each pipeline stage "
     "(model.decoder.num_layers (4) / 2 stages) under train.recompute=full"),
    ("seq>=2", ["data.seq_length=1"], "data.seq_length (1) must be >= 2"),
    ("images>=1", ["data.max_images_per_sequence=0"],
     "data.max_images_per_sequence (0) must be >= 1"),
    ("pack_window>=1", ["data.pack_window=0"], "data.pack_window (0) must be >= 1"),
    ("weights", ["data.weights=[0.5,0.5]"], "data.weights ([0.5, 0.5]) must be 3 non-negative"),
    ("weights-sum", ["data.weights=[0,0,0]"], "data.weights ([0.0, 0.0, 0.0]) must be 3"),
]


@pytest.mark.parametrize("overrides, message", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_validation_rule(overrides, message):
    config = tiny_moe(*overrides)
    with raises(message) as info:
        validate(config)
    assert str(info.value).startswith("invalid config:\n  ")
    with raises(message):  # load_config validates too
        load_config(TINY_MOE, overrides)


def test_validation_rule_ids_are_unique():
    assert len({r[0] for r in RULES}) == len(RULES)


def test_a_single_failure_is_reported_alone():
    with pytest.raises(ConfigError) as info:
        validate(tiny_moe("model.decoder.moe.num_experts=63", "parallel.expert_parallel=8"))
    assert str(info.value) == ("invalid config:\n  model.decoder.moe.num_experts (63) is not "
                               "divisible by parallel.expert_parallel (8)")


@pytest.mark.parametrize("overrides", [
    [],
    ["model.decoder.moe.top_k=4"],  # top_k == num_experts
    ["model.decoder.moe.top_k=1"],
    ["model.decoder.moe.layer_freq=4"],  # == num_layers
    ["model.decoder.moe.layer_freq=[0,0,0,0]"],
    ["model.decoder.moe.capacity_factor=null"],
    ["model.decoder.moe.capacity_factor=1e-3"],
    ["model.decoder.moe.num_experts=0"],
    ["model.decoder.moe.num_experts=0", "model.decoder.moe.layer_freq=[1,1]"],  # dense: unused
    ["model.decoder.moe.num_experts=8", "parallel.expert_parallel=8"],
    ["parallel.virtual_pipeline=1"],
    ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"],
    ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    ["model.decoder.num_query_groups=null"],
    ["model.decoder.num_query_groups=4"],
    ["data.seq_length=128"],  # == max_position_embeddings
    ["data.seq_length=2"],
    ["model.connector.num_tokens=16"],  # == patches
    ["model.connector.num_tokens=1"],
    ["train.min_lr_ratio=0", "train.min_lr_ratio=1"],
    ["train.grad_clip=0", "train.warmup_steps=0", "train.lr=null"],
    ["train.micro_batch_size=8", "train.global_batch_size=8"],
    ["train.recompute=full", "train.recompute_num_layers=4"],  # one group: the whole stage
    ["train.recompute=selective", "train.recompute_num_layers=3"],  # read by full only
])
def test_boundaries_are_accepted(overrides):
    config = tiny_moe(*overrides)
    assert validate(config) is config


# --------------------------------------------------------------------------- every number, walked

# Integer fields where 0 or -1 is a meaningful setting; every other (field, value) in {0, -1}
# must be a ConfigError naming the field's dotted path and the value.
ZERO_OR_NEGATIVE_OK = {
    "model.decoder.moe.num_experts": {0},  # 0: a dense decoder (no MoE layers)
    "model.image_token_id": {0},  # a token id: 0 is the vocabulary's first entry
    "train.seed": {0, -1},  # any int: random/torch take negatives, numpy gets seed % 2**32
    "data.seed": {0, -1},  # any int: string-seeded random.Random and torch.Generator
    "train.warmup_steps": {0},  # no warmup
    "train.save_interval": {0},  # only the final checkpoint
}
# Float fields where 0 is a meaningful setting; -1 is meaningful for none.
FLOAT_ZERO_OK = {
    "model.decoder.moe.aux_loss_coeff",  # no load-balancing loss
    "model.decoder.moe.z_loss_coeff",  # no router z-loss
    "model.decoder.moe.router_jitter",  # no jitter
    "model.decoder.moe.bias_update_rate",  # a bias that stays where it is
    "train.min_lr_ratio",  # decay to 0
    "train.weight_decay",  # no decay
    "train.adam_beta1", "train.adam_beta2",  # no averaging: torch's Adam accepts [0, 1)
    "train.grad_clip",  # no clipping
}
DEFAULT_YAML = str(CONFIG_DIR / "default.yaml")


def _leaves(cls, prefix: str = ""):
    """(dotted path, type) of every non-dataclass field under ``cls``, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{path}.")
        else:
            yield path, tp


def _admits(tp, scalar: type) -> bool:
    """``tp`` is ``scalar``, or a Union with it (Optional[int], Union[int, List[int]]); not a
    list of it (data.weights has its own rules)."""
    return tp is scalar or typing.get_origin(tp) is typing.Union and scalar in typing.get_args(tp)


INT_FIELDS = [p for p, tp in _leaves(Config) if _admits(tp, int)]
FLOAT_FIELDS = [p for p, tp in _leaves(Config) if _admits(tp, float)]


def _default_with(path: str, value) -> Config:
    return config_from_dict(apply_overrides(read_yaml(DEFAULT_YAML), [f"{path}={value}"]))


def test_the_walk_sees_every_section():
    sections = {p.rsplit(".", 1)[0] for p in INT_FIELDS + FLOAT_FIELDS}
    assert sections == {"model", "model.vision", "model.connector", "model.decoder",
                        "model.decoder.moe", "parallel", "data", "train"}
    assert len(INT_FIELDS) == 39 and len(FLOAT_FIELDS) == 17  # a new field joins the walk
    assert set(ZERO_OR_NEGATIVE_OK) <= set(INT_FIELDS) and FLOAT_ZERO_OK <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("path", INT_FIELDS)
def test_every_integer_field_rejects_zero_and_negative_by_name(path, value):
    config = _default_with(path, value)
    if value in ZERO_OR_NEGATIVE_OK.get(path, ()):
        assert validate(config) is config
        return
    with raises(f"{path} ({value})"):
        validate(config)


@pytest.mark.parametrize("value", [0.0, -1.0])
@pytest.mark.parametrize("path", FLOAT_FIELDS)
def test_every_float_field_rejects_zero_and_negative_by_name(path, value):
    config = _default_with(path, value)
    if value == 0.0 and path in FLOAT_ZERO_OK:
        assert validate(config) is config
        return
    with raises(f"{path} ({value})"):
        validate(config)


def test_all_errors_of_one_config_are_reported_together():
    overrides = [
        "model.decoder.hidden_size=66",
        "model.decoder.moe.num_experts=3",
        "model.decoder.moe.top_k=4",
        "model.decoder.moe.capacity_factor=0",
        "model.decoder.moe.layer_freq=[1,0]",
        "model.vision.num_heads=3",
        "model.connector.num_tokens=25",
        "train.global_batch_size=10",
        "train.min_lr_ratio=2",
        "data.seq_length=256",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(TINY_MOE, overrides)
    lines = str(info.value).split("\n  ")
    assert lines[0] == "invalid config:"
    expected = [
        "model.decoder.hidden_size (66) is not divisible by model.decoder.num_attention_heads (4)",
        "data.seq_length (256) exceeds model.decoder.max_position_embeddings (128)",
        "model.decoder.moe.top_k (4) must be between 1 and model.decoder.moe.num_experts (3)",
        "model.decoder.moe.capacity_factor (0.0) must be > 0",
        "model.decoder.moe.layer_freq has 2 entries but model.decoder.num_layers is 4",
        "model.vision.width (32) is not divisible by model.vision.num_heads (3)",
        "model.connector.num_tokens (25) exceeds the encoder's patches (16",
        "train.global_batch_size (10) is not divisible by train.micro_batch_size (4)",
        "train.min_lr_ratio (2.0) must be within [0, 1]",
    ]
    assert len(lines) == 1 + len(expected)
    for part in expected:
        assert sum(part in line for line in lines) == 1, part


def test_connector_patch_rule_is_independent_of_other_sections():
    # An error elsewhere must not hide that the connector asks for more tokens than patches.
    with pytest.raises(ConfigError) as info:
        validate(tiny_moe("train.steps=0", "model.connector.num_tokens=25"))
    assert "train.steps (0) must be >= 1" in str(info.value)
    assert "model.connector.num_tokens (25) exceeds the encoder's patches" in str(info.value)
    with pytest.raises(ConfigError) as info:  # nor one about the ViT's attention heads
        validate(tiny_moe("model.vision.num_heads=3", "model.connector.num_tokens=25"))
    assert "model.connector.num_tokens (25) exceeds the encoder's patches" in str(info.value)
    # ... but a broken patch grid skips it (its patch count means nothing; no ZeroDivisionError).
    for patch in (0, 15):
        with pytest.raises(ConfigError) as info:
            validate(tiny_moe(f"model.vision.patch_size={patch}", "model.connector.num_tokens=25"))
        assert "exceeds" not in str(info.value)


def test_parallel_errors_do_not_crash_the_divisibility_rules():
    # Zero sizes would divide by zero in the decoder and MoE rules: those are skipped.
    with pytest.raises(ConfigError) as info:
        validate(tiny_moe("parallel.tensor_parallel=0", "parallel.expert_parallel=0",
                          "parallel.pipeline_parallel=0", "train.steps=0"))
    message = str(info.value)
    for part in ("parallel.tensor_parallel (0)", "parallel.pipeline_parallel (0)",
                 "parallel.expert_parallel (0)", "train.steps (0)"):
        assert part in message


# --------------------------------------------------------------------------- layout


def test_validate_layout_returns_the_data_parallel_size():
    config = tiny_moe("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    validate(config)
    assert validate_layout(config, 8) == 2
    assert data_parallel_size(config, 8) == 2
    assert validate_layout(tiny_moe(), 1) == 1
    assert validate_layout(tiny_moe(), 2) == 2


def test_world_size_not_divisible_by_tp_times_pp():
    config = tiny_moe("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    message = ("world size (6) is not divisible by parallel.tensor_parallel (2) x "
               "parallel.pipeline_parallel (2)")
    with raises(message):
        validate_layout(config, 6)
    with raises(message):
        data_parallel_size(config, 6)


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    with raises("invalid layout:\n  train.global_batch_size (8) is not divisible by "
                "train.micro_batch_size (4) x data-parallel size (4)"):
        validate_layout(tiny_moe(), 4)
    config = load_config(str(CONFIG_DIR / "mm1-7b.yaml"))  # tp 2, global batch 512
    assert validate_layout(config, 1024) == 512
    with raises("train.global_batch_size (512) is not divisible by train.micro_batch_size (1) "
                "x data-parallel size (1024)"):
        validate_layout(config, 2048)


def test_expert_ranks_must_divide_the_world_at_tp1():
    config = tiny_moe("parallel.expert_parallel=4")
    with raises("world size (2) is not divisible by parallel.expert_parallel (4) x "
                "expert tensor parallel (1) x parallel.pipeline_parallel (1)"):
        validate_layout(config, 2)
    assert validate_layout(tiny_moe("parallel.expert_parallel=4", "train.micro_batch_size=1"),
                           4) == 4


def test_expert_ranks_must_divide_the_world_at_tp2():
    base = ["parallel.tensor_parallel=2", "parallel.expert_parallel=4",
            "train.micro_batch_size=1"]
    assert validate_layout(tiny_moe(*base), 4) == 2
    with raises("world size (2) is not divisible by parallel.expert_parallel (4) x "
                "expert tensor parallel (1) x parallel.pipeline_parallel (1)"):
        validate_layout(tiny_moe(*base), 2)


def test_layout_errors_are_reported_together():
    config = tiny_moe("parallel.expert_parallel=4")
    with pytest.raises(ConfigError) as info:
        validate_layout(config, 6)
    lines = str(info.value).split("\n  ")
    assert lines[0] == "invalid layout:"
    assert len(lines) == 3
    assert lines[1].startswith("world size (6) is not divisible by parallel.expert_parallel (4)")
    assert lines[2].startswith("train.global_batch_size (8) is not divisible by")


# --------------------------------------------------------------------------- read_yaml


def test_read_yaml_missing_file(tmp_path):
    path = str(tmp_path / "missing.yaml")
    with raises(f"config file {path!r} does not exist"):
        read_yaml(path)
    with raises(f"config file {path!r} does not exist"):
        load_config(path)


def test_read_yaml_directory_is_missing_file(tmp_path):
    with raises(f"config file {str(tmp_path)!r} does not exist"):
        read_yaml(str(tmp_path))


def test_read_yaml_invalid_yaml(tmp_path):
    path = write(tmp_path, "model: [1, 2\n  decoder: {\n")
    with raises(f"config file {path!r} is not valid YAML:"):
        read_yaml(path)


def test_read_yaml_top_level_list(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    with raises(f"config file {path!r}: top level must be a mapping, got [1, 2]"):
        read_yaml(path)


def test_read_yaml_top_level_scalar(tmp_path):
    path = write(tmp_path, "just text\n")
    with raises(f"config file {path!r}: top level must be a mapping, got 'just text'"):
        read_yaml(path)


def test_read_yaml_empty_file_is_the_defaults(tmp_path):
    path = write(tmp_path, "# nothing here\n")
    assert read_yaml(path) == {}
    assert load_config(path) == Config()


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("vocab, multiple, padded", [
    (32000, 128, 32000), (256, 128, 256), (257, 128, 384), (1, 64, 64), (50257, 128, 50304),
    (100, 1, 100),
])
def test_padded_vocab_size(vocab, multiple, padded):
    assert DecoderConfig(vocab_size=vocab, vocab_pad_multiple=multiple).padded_vocab_size == padded


def test_head_dim_and_kv_heads():
    assert DecoderConfig().head_dim == 128
    assert DecoderConfig().kv_heads == 32
    dec = DecoderConfig(hidden_size=7168, num_attention_heads=56, num_query_groups=8)
    assert (dec.head_dim, dec.kv_heads) == (128, 8)
    tiny = load_config(TINY_DENSE).model.decoder
    assert (tiny.head_dim, tiny.kv_heads) == (16, 2)


def moe_layers(freq, num_layers=8, num_experts=4):
    dec = DecoderConfig(num_layers=num_layers,
                        moe=MoEConfig(num_experts=num_experts, layer_freq=freq))
    return [i for i in range(num_layers) if dec.is_moe_layer(i)]


def test_is_moe_layer_int_freq():
    assert moe_layers(1) == list(range(8))
    assert moe_layers(2) == [1, 3, 5, 7]
    assert moe_layers(4) == [3, 7]
    assert moe_layers(3) == [2, 5]
    assert moe_layers(8) == [7]


def test_is_moe_layer_explicit_pattern():
    assert moe_layers([1, 0, 0, 1, 1, 0, 0, 0]) == [0, 3, 4]
    assert moe_layers([0] * 8) == []
    assert moe_layers([1] * 8) == list(range(8))


def test_is_moe_layer_dense_has_none():
    assert moe_layers(1, num_experts=0) == []
    assert moe_layers([1] * 8, num_experts=0) == []
    assert not MoEConfig().enabled and MoEConfig(num_experts=2).enabled


def test_vision_num_patches():
    assert VisionConfig().num_patches == 729
    assert VisionConfig(image_size=56, patch_size=14).num_patches == 16


def test_the_embedded_default_is_the_configs_default():
    """``mm1-moe train`` without --config runs mm1_moe/default.yaml (shipped in the package);
    configs/default.yaml is its copy for readers of the checkout. They must not drift."""
    import mm1_moe

    embedded = Path(mm1_moe.__file__).resolve().parent / "default.yaml"
    assert embedded.read_bytes() == (CONFIG_DIR / "default.yaml").read_bytes(), (
        "configs/default.yaml and mm1_moe/default.yaml differ: change both")
