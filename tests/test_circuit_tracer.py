"""minisv's attribution graphs against the real circuit-tracer.

tests/data/circuit_tracer holds a tiny Llama (3 layers, d 64, 4 heads / 2 kv heads, random RMSNorm gains), a
JumpReLU CLT and a JumpReLU per-layer set in circuit-tracer's layout (and, in tokenizer/, the model's word-level
tokenizer, which circuit-tracer needs and minisv does not read) reading `mlp.hook_in` (the MLP input after
the norm's gain), and what circuit-tracer 0.5.0 (TransformerLens backend) computed from them for one prompt: its
adjacency matrix, pruned node and edge masks, scores and graph JSON. minisv reads the coders (folding the gain
in), builds its own graph and must agree: adjacency to 1e-4 relative, the same pruned nodes and edges, the same
scores and node ids. With MINISV_CIRCUIT_TRACER_PYTHON naming a Python that has circuit-tracer, the other
direction runs live: coders minisv makes and writes are read and traced by circuit-tracer itself."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import minisv
from minisv import circuit_tracer as ct
from minisv.clt import CLTConfig, CrossLayerTranscoder
from minisv.graph import attribute, prune, scores

DATA = os.path.join(os.path.dirname(__file__), "data", "circuit_tracer")
PYTHON = os.environ.get("MINISV_CIRCUIT_TRACER_PYTHON")


@pytest.fixture(scope="module")
def model():
    return minisv.load(os.path.join(DATA, "tiny_model"), device="cpu")


def assert_same_graph(graph, reference):
    A = torch.tensor(reference["adjacency"])
    assert graph.adjacency.shape == A.shape
    assert float((graph.adjacency - A).abs().max() / A.abs().max()) <= 1e-4
    nodes, edges, _ = prune(graph)
    assert torch.equal(nodes, torch.tensor(reference["node_mask"]))
    assert torch.equal(edges, torch.tensor(reference["edge_mask"]))
    assert scores(graph) == pytest.approx(reference["scores"].tolist(), rel=1e-5)


@pytest.mark.parametrize("name", ["clt_mlp", "plt_mlp"])
def test_graphs_of_circuit_tracers_coders_equal_circuit_tracers(model, name):
    reference = np.load(os.path.join(DATA, f"reference_{name}.npz"))
    coder = ct.load(os.path.join(DATA, name), model)
    assert coder.cfg.window == (1 if name == "plt_mlp" else 0) and coder.cfg.architecture == "jumprelu"
    graph = attribute(model, coder, reference["input_ids"].tolist())
    assert graph.logit_ids.tolist() == reference["logit_ids"].tolist()
    assert_same_graph(graph, reference)
    with open(os.path.join(DATA, f"reference_{name}_graph.json")) as f:
        theirs = json.load(f)
    ours = ct.graph_json(graph, None)
    assert [n["node_id"] for n in ours["nodes"]] == theirs["nodes"]
    assert sorted([link["source"], link["target"]] for link in ours["links"]) == sorted(theirs["links"])


def random_coder(model, window, skip=False, seed=0):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(model.cfg.n_layers, model.cfg.d_model, 32, "jumprelu", window=window,
                                         skip=skip))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.15)
        clt.log_threshold.fill_(-1.5)
    return clt


@pytest.mark.parametrize("window, skip", [(0, False), (2, False), (1, True)])
def test_writing_and_reading_circuit_tracers_layout_keeps_the_map(model, tmp_path, window, skip):
    """A CLT (any window: later layers beyond it are written as zeros) or a per-layer set with skip paths, written
    with the gain divided out and read back with it multiplied in, computes what it computed (to float rounding)."""
    clt = random_coder(model, window, skip)
    ct.save(clt, tmp_path, model)
    files = {"config.yaml"} | ({f"layer_{l}.safetensors" for l in range(3)} if window == 1 else
                               {f"W_{m}_{l}.safetensors" for m in ("enc", "dec") for l in range(3)})
    assert set(os.listdir(tmp_path)) == files
    back = ct.load(tmp_path, model)
    x = torch.randn(5, model.cfg.n_layers, model.cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(back(x), clt(x), rtol=1e-4, atol=1e-5)


def test_coders_circuit_tracer_cannot_run_are_refused(model, tmp_path):
    topk = CrossLayerTranscoder(CLTConfig(model.cfg.n_layers, model.cfg.d_model, 16, "topk", 4))
    with pytest.raises(minisv.MinisvError, match="circuit-tracer has no form of a topk CLT"):
        ct.save(topk, tmp_path / "a", model)
    shutil.copytree(os.path.join(DATA, "clt_mlp"), tmp_path / "b")
    config = (tmp_path / "b" / "config.yaml").read_text().replace("mlp.hook_in", "hook_resid_mid")
    (tmp_path / "b" / "config.yaml").write_text(config)
    with pytest.raises(minisv.MinisvError, match="reading hook_resid_mid"):
        ct.load(tmp_path / "b", model)


@pytest.mark.skipif(PYTHON is None, reason="set MINISV_CIRCUIT_TRACER_PYTHON to a Python with circuit-tracer")
@pytest.mark.parametrize("window, skip", [(0, False), (1, True)])
def test_circuit_tracer_traces_minisvs_coders_as_minisv_does(model, tmp_path, window, skip):
    clt = random_coder(model, window, skip, seed=3)
    ct.save(clt, tmp_path / "coder", model)
    shutil.copytree(os.path.join(DATA, "tiny_model"), tmp_path / "model")
    for name in os.listdir(os.path.join(DATA, "tokenizer")):     # circuit-tracer needs the model's tokenizer
        shutil.copy(os.path.join(DATA, "tokenizer", name), tmp_path / "model")
    ids = [1, 4, 81, 7, 84, 11]
    subprocess.run([PYTHON, os.path.join(os.path.dirname(__file__), "circuit_tracer_run.py"), str(tmp_path / "model"),
                    str(tmp_path / "coder"), ",".join(map(str, ids)), str(tmp_path / "ct.npz")], check=True,
                   timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    reference = np.load(tmp_path / "ct.npz")
    graph = attribute(model, clt, ids)
    assert graph.logit_ids.tolist() == reference["logit_ids"].tolist()
    assert_same_graph(graph, reference)
