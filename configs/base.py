"""Base config: every section and field with its default. Other config files derive from it.

Not meant to be run directly; see configs/shakespeare.py (the default), configs/tiny.py and
configs/pretrain.py:<preset>. Every field is a flag: `--config.model.positional=rope`.

The fields and their defaults are the dataclasses of llm/config.py (and llm/model/config.py,
llm/sharding.py), written once there, with a comment per field; this file only converts them
(`tests/test_config.py` checks that every field is a flag and every flag a field).
"""

from ml_collections import config_dict

from llm.config import default_config_dict


def get_config() -> config_dict.ConfigDict:
    return default_config_dict()


def apply_model_preset(c: config_dict.ConfigDict, preset: dict) -> None:
    """Overwrite c.model fields with a preset (nested dicts merge into sub-sections)."""
    _merge(c.model, preset)


def _merge(section, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict):
            _merge(section[k], v)
        else:
            section[k] = v
