"""minisv: one-shot steering vectors, transcoders and observable propagation on real language models.

The public entry points of the three methods (each module's docstring derives its maths):

    steering    SteerConfig, Datapoint, optimize_vector, steer, compare_generations, save_vector, load_vector
    transcoders Transcoder, TranscoderConfig, TrainConfig, train, evaluate, Circuit, load_transcoder,
                save_transcoder, import_released
    ObProp      observable, reference, feature_vector, coupling
"""
from .errors import MinisvError
from .loading import load
from .model import KVCache, Model, ModelConfig
from .steering import (Datapoint, SteerConfig, compare_generations, completion_logprob, load_vector,
                       optimize_vector, residual_norm, save_vector, steer, steering_hook, steering_loss, success_rate)
from .transcoder import Transcoder, TranscoderConfig
from .formats import import_released, load as load_transcoder, save as save_transcoder
from .training import TrainConfig, train
from .evals import evaluate
from .circuits import Circuit
from .obprop import coupling, feature_vector, observable, reference

__version__ = "0.1.0"
