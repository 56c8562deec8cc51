"""One typed config tree (schema), strict YAML storage (loader), cross-field rules (validate)."""

from .loader import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    read_yaml,
)
from .schema import (
    Config,
    ConnectorConfig,
    DataConfig,
    DecoderConfig,
    KernelsConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    VisionConfig,
)
from .validate import data_parallel_size, validate, validate_layout

__all__ = [
    "Config", "ConfigError", "ConnectorConfig", "DataConfig", "DecoderConfig", "KernelsConfig",
    "ModelConfig", "MoEConfig", "ParallelConfig", "TrainConfig", "VisionConfig",
    "apply_overrides", "config_from_dict", "config_to_dict", "data_parallel_size", "dump_config",
    "load_config", "read_yaml", "validate", "validate_layout",
]
