"""One-shot steering vectors from Python: load a model, read an activation with a hook, optimize a vector on ONE
prompt, steer generation with it, and save it for later (`optimize_sv.py` does the same with a report).

    python examples/steering.py          # SmolLM2-135M-Instruct, offline; about 30 s on 2 CPU cores
"""
import os
import tempfile

import torch

import minisv

model = minisv.load("smollm2")                  # the packaged SmolLM2-135M-Instruct (float32 on CPU)
tok = model.tokenizer
LAYER = 4                                       # the vector is added to the residual stream entering block 4

# 1. Hooks: every activation has a TransformerLens name; run_with_cache returns the ones asked for.
prompt = tok.chat("Give me a recipe for pancakes.")     # one user turn in the model's chat template
ids = torch.tensor([tok.encode(prompt, bos=tok.add_bos)])
logits, cache = model.run_with_cache(ids, names=[f"blocks.{LAYER}.hook_resid_pre"])
resid = cache[f"blocks.{LAYER}.hook_resid_pre"][0]              # [T, d_model]
print(f"{ids.shape[1]} prompt tokens; residual norm entering block {LAYER}: {resid.norm(dim=-1).median():.1f}")

# 2. Optimize: one datapoint, a completion to promote. The settings are SteerConfig's (the script's defaults:
#    lr 0.1, 20 Adam steps); keyword arguments override them, here 8 larger steps to keep the example short.
datapoint = minisv.Datapoint("Give me a recipe for pancakes.", promote=["I'm sorry, but I can't help with that."])
vector, info = minisv.optimize_vector(model, [datapoint], LAYER, lr=0.3, max_iters=8)
print(f"optimized in {info['iters']} steps: loss {info['history'][0]:.2f} -> {info['loss']:.2f} nats, "
      f"|v| = {info['norm']:.1f}")

# 3. Steer: inside the context manager the vector is added at every position, also while generating.
question = torch.tensor(tok.encode(tok.chat("What is the capital of France?"), bos=tok.add_bos))
plain = tok.decode(model.generate(question, max_new_tokens=12))
with minisv.steer(model, vector, LAYER):
    steered = tok.decode(model.generate(question, max_new_tokens=12))
print(f"unsteered: {plain!r}\nsteered:   {steered!r}")     # a refusal: the vector transfers to a new prompt

# compare_generations does the same for many prompts and multipliers at once (0 = unsteered, -1 = minus v)
texts = minisv.compare_generations(model, ["How do I boil an egg?"], vector, LAYER, multipliers=(1.0, -1.0),
                                   max_new_tokens=10)
print({m: t[0] for m, t in texts.items()})

# 4. Save and load: a .safetensors file with the layer and any metadata you pass.
with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "refusal.safetensors")
    minisv.save_vector(path, vector, LAYER, prompt=datapoint.prompt, loss=info["loss"])
    loaded, meta = minisv.load_vector(path)
    assert torch.equal(loaded, vector.cpu()) and meta["layer"] == LAYER
    print(f"saved and loaded {os.path.basename(path)}: layer {meta['layer']}, loss {meta['loss']:.4f}")
