"""jaxllm: a language-model library in JAX written as pure functions."""

import importlib
import sys
import types

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
    "jaxllm.tokenizer_json": ("JsonTokenizer",),
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

__version__ = "0.1.0"

__all__ = sorted(_WHERE)
