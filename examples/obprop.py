"""Observable propagation from Python: turn a question about the model's output ("does it say she or he?") into
feature vectors, rank every attention head by its feature norm from the weights alone, follow one path, and
predict how two tasks couple (`obprop.py` does the same and checks it against patching and a corpus).

    python examples/obprop.py            # SmolLM2-135M-Instruct, offline; a few seconds on 2 CPU cores
"""
import minisv
from minisv.obprop import single_features

model = minisv.load("smollm2")
tok = model.tokenizer

# 1. An observable is a linear function of the logits, n·ℓ: here ℓ[' she'] − ℓ[' he'] (each string must be one
#    token of the model; weights go in front, e.g. "2*' she' - ' he'").
subject = minisv.observable(model, "' she' - ' he'")
obj = minisv.observable(model, "' her' - ' him'")

# 2. Feature norms of every head, no data: pull n back through the unembedding, the final norm and each head's
#    OV circuit; ‖y‖ says how strongly the head can move the observable (inputs of a norm all have norm √d).
heads = single_features(model, subject)["attn"]                 # [layers, heads, d_model]
norms = heads.norm(dim=-1)
top = norms.flatten().topk(5).indices.tolist()
H = model.cfg.n_heads
print("top heads for ' she' - ' he' by feature norm: " +
      ", ".join(f"{i // H}.{i % H} ({norms.flatten()[i]:.2f})" for i in top))

# 3. A path's feature vector: head 26.2 reading MLP 20's output. MLPs are linearized at a reference: here a
#    positive and a negative prompt (MLPs, norm scales and the head's source token are taken there).
pos = tok.encode("So, Mary really is a great friend, isn't", bos=tok.add_bos)
neg = tok.encode("So, John really is a great friend, isn't", bos=tok.add_bos)
ref = minisv.reference(model, pos, neg)
y = minisv.feature_vector(model, subject, "attn 26.2 <- mlp 20", ref)
print(f"path attn 26.2 <- mlp 20: ‖y‖ = {y.norm():.3f} (a vector in MLP 20's normalized input)")

# 4. Coupling: how much an input that scores 1 on one head's subject feature scores on its object feature,
#    C(y1, y2) = y1·y2 / ‖y1‖². Two tasks coupled at a head are computed by the same direction there.
layer, head = divmod(top[0], H)
y_obj = single_features(model, obj)["attn"][layer, head]
print(f"head {layer}.{head}: coupling ' she' - ' he' -> ' her' - ' him' = "
      f"{minisv.coupling(heads[layer, head], y_obj):.3f}")
