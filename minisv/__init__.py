"""minisv: one-shot steering vectors, transcoders and observable propagation on real language models."""
from .errors import MinisvError
from .loading import load
from .model import KVCache, Model, ModelConfig

__version__ = "0.1.0"
