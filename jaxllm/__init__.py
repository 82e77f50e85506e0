"""jaxllm: a language-model library in JAX written as pure functions."""

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
