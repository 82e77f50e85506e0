"""jaxllm: a language-model library in JAX written as pure functions."""

import importlib
import sys
import types
from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562), so `import jaxllm.cli` (the command-line helpers
# every script parses its flags with) does not import JAX: a bad flag is reported at once.
_EXPORTS = {
    "jaxllm.checkpoint": ("load_checkpoint", "save_checkpoint"),
    "jaxllm.config": ("ModelConfig", "TrainConfig"),
    "jaxllm.errors": ("CacheError", "CheckpointError", "ConfigError", "DataError", "GenerationError", "JaxllmError",
                      "TokenizerError", "TrainingError"),
    "jaxllm.generate": ("GenerationResult", "generate", "generate_stream", "generate_tokens"),
    "jaxllm.hf": ("export_hf", "load_hf"),
    "jaxllm.kvcache": ("KVCache", "init_cache"),
    "jaxllm.model": ("forward", "init_params"),
    "jaxllm.quantize": ("QuantizedWeight", "quantize_params"),
    "jaxllm.request": ("Request", "RequestError"),
    "jaxllm.sampling": ("SamplingParams",),
    "jaxllm.stopping": ("StopParams",),
    "jaxllm.tokenizer": ("Tokenizer",),
}
_RENAMED = {"prepare_params": ("jaxllm.devices", "prepare")}
_WHERE = {name: (module, name) for module, names in _EXPORTS.items() for name in names} | _RENAMED


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
    module, attr = _WHERE[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


class _Package(types.ModuleType):
    """Importing a submodule makes it an attribute of its package. `jaxllm.generate` must stay
    the function (as when this file imported it eagerly), so that submodule gives its function."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == f"jaxllm.{name}" and _WHERE.get(name) == (value.__name__, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from jaxllm.checkpoint import load_checkpoint, save_checkpoint
    from jaxllm.config import ModelConfig, TrainConfig
    from jaxllm.devices import prepare as prepare_params
    from jaxllm.errors import (
        CacheError,
        CheckpointError,
        ConfigError,
        DataError,
        GenerationError,
        JaxllmError,
        TokenizerError,
        TrainingError,
    )
    from jaxllm.generate import GenerationResult, generate, generate_stream, generate_tokens
    from jaxllm.hf import export_hf, load_hf
    from jaxllm.kvcache import KVCache, init_cache
    from jaxllm.model import forward, init_params
    from jaxllm.quantize import QuantizedWeight, quantize_params
    from jaxllm.request import Request, RequestError
    from jaxllm.sampling import SamplingParams
    from jaxllm.stopping import StopParams
    from jaxllm.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GenerationError",
    "GenerationResult",
    "JaxllmError",
    "KVCache",
    "ModelConfig",
    "QuantizedWeight",
    "Request",
    "RequestError",
    "SamplingParams",
    "StopParams",
    "Tokenizer",
    "TokenizerError",
    "TrainConfig",
    "TrainingError",
    "forward",
    "generate",
    "generate_stream",
    "generate_tokens",
    "init_cache",
    "init_params",
    "export_hf",
    "load_hf",
    "load_checkpoint",
    "prepare_params",
    "quantize_params",
    "save_checkpoint",
]
