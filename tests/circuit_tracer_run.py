"""Run the real circuit-tracer on a model directory and a transcoder directory in its layout, and save what the
minisv tests compare with: the adjacency matrix, the pruned node and edge masks, the scores, the logit targets.
Runs in a Python that has circuit-tracer (it needs other versions of transformers than minisv's tests), named by
MINISV_CIRCUIT_TRACER_PYTHON:  python tests/circuit_tracer_run.py MODEL_DIR TRANSCODER_DIR IDS OUT.npz"""
import os
import sys

import numpy as np
import torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores, prune_graph
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set


def main(model_dir, coder_dir, ids, out):
    config = dict(line.split(": ", 1) for line in open(os.path.join(coder_dir, "config.yaml")).read().splitlines())
    hooks = dict(feature_input_hook=config["feature_input_hook"], feature_output_hook=config["feature_output_hook"],
                 device=torch.device("cpu"), dtype=torch.float32)
    if config["model_kind"] == "transcoder_set":
        layers = sorted(f for f in os.listdir(coder_dir) if f.startswith("layer_"))
        coder = load_transcoder_set({int(f[6:-12]): os.path.join(coder_dir, f) for f in layers}, scan="minisv",
                                    **hooks)
    else:
        coder = load_clt(coder_dir, scan="minisv", **hooks)
    model = ReplacementModel.from_pretrained_and_transcoders(model_dir, coder, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    graph = attribute(torch.tensor([int(i) for i in ids.split(",")]), model, batch_size=64, verbose=False)
    graph.to("cpu")
    pruned = prune_graph(graph, 0.8, 0.98)
    np.savez(out, adjacency=graph.adjacency_matrix.float().numpy(), node_mask=pruned.node_mask.numpy(),
             edge_mask=pruned.edge_mask.numpy(), input_ids=graph.input_tokens.numpy(),
             logit_ids=np.array([int(t.vocab_idx) if hasattr(t, "vocab_idx") else int(t) for t in graph.logit_targets]),
             scores=np.array(compute_graph_scores(graph)))


if __name__ == "__main__":
    main(*sys.argv[1:])
