"""minisv: one-shot steering vectors, transcoders and observable propagation on real language models."""
from .errors import MinisvError
from .loading import load
from .model import KVCache, Model, ModelConfig
from .steering import (Datapoint, compare_generations, completion_logprob, load_vector, optimize_vector,
                       residual_norm, save_vector, steer, steering_hook, steering_loss, success_rate)
from .transcoder import Transcoder, TranscoderConfig, import_released

__version__ = "0.1.0"
