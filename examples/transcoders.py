"""Transcoders from Python: train a small TopK transcoder for one MLP of SmolLM2, evaluate it on held-out text,
save and load it, and trace a circuit through it (`train_transcoder.py` does the same at full size, with
dashboards and reports).

    python examples/transcoders.py       # SmolLM2-135M-Instruct, offline; well under a minute on 2 CPU cores
"""
import tempfile

import minisv
from minisv.circuits import format_tree
from minisv.data import load_dataset

model = minisv.load("smollm2")
tok = model.tokenizer
LAYER = 6

# 1. Data: the built-in corpus (Python's documentation text) packed into rows of 128 tokens, each starting with
#    BOS; whole documents are held out for evaluation.
train_rows, held_out = load_dataset(None, tok, ctx=128)
print(f"{len(train_rows):,} training rows, {len(held_out):,} held-out rows of 128 tokens")

# 2. Train: the transcoder reads the MLP's input (blocks.6.ln2.hook_normalized) and predicts its output
#    (blocks.6.hook_mlp_out). A tiny budget: 2,304 latents (4 × d_model), 16 active per token, 8,192 tokens in
#    32 steps (most of the time goes into running the model to harvest them). The script's default, 9,216
#    latents, k 32 and 327,680 tokens, reaches FVU 0.34.
cfg = minisv.TrainConfig(layers=[LAYER], d_sae=2304, k=16, lr=8e-3, tokens=8192, batch_tokens=256,
                         buffer_tokens=4096, warmup_steps=2, dead_tokens=2048, bos_id=tok.bos_id, model="smollm2")
transcoders, summary = minisv.train(model, train_rows, cfg, log=lambda line: None)   # {layer: Transcoder}
tc = transcoders[LAYER]
print(f"trained {summary['tokens']:,} tokens in {summary['seconds']:.0f} s; last batch FVU "
      f"{summary['history'][-1]['fvu']:.3f}")

# 3. Evaluate on held-out rows: L0 (active latents per token), FVU (unexplained variance of the MLP output), and
#    the next-token loss with the transcoder spliced in place of the MLP, against the clean and zero-ablated model.
metrics = minisv.evaluate(model, held_out[:4], transcoders, bos_id=tok.bos_id)
m = metrics[f"layer_{LAYER}"]
print(f"held out: L0 {m['l0']:.1f}, FVU {m['fvu']:.3f}; CE clean {metrics['ce_clean']:.3f}, spliced "
      f"{m['ce_spliced']:.3f}, MLP zero-ablated {m['ce_zero_ablated']:.3f} (CE score {m['ce_score']:.2f})")

# 4. Save and load: cfg.json + transcoder.safetensors (format="saelens" or "sparsify" writes those tools' layouts).
with tempfile.TemporaryDirectory() as folder:
    minisv.save_transcoder(tc, folder)
    tc = minisv.load_transcoder(folder)
    print(f"saved and loaded: layer {tc.cfg.layer}, d_sae {tc.cfg.d_sae}, k {tc.cfg.k}")

# 5. A circuit: freeze the prompt's attention patterns and norm scales, let the transcoder stand in for MLP 6,
#    and split a target (by default the most active feature at the last token) exactly into direct terms;
#    top_paths follows the largest terms backwards, format_tree prints them. MLPs 0-5 have no transcoder here:
#    they stay whole, and what they contribute shows up as each node's "error" term.
circuit = minisv.Circuit(model, {LAYER: tc}, tok.encode("def add(a, b):\n    return a +", bos=True))
root = circuit.target()                       # or circuit.target("6:123@-1"), circuit.target("logit: ' b'")
paths = circuit.top_paths(root, rounds=2, branches=3)
print(f"why {root.label} = {root.value:+.3f}:")
print(format_tree(paths))
