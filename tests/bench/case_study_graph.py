"""A case study of one attribution graph, with an intervention check: do the graph's nodes do, in the real model,
what the graph says they do?

For the prompt (default: "The capital of France is", where SmolLM2 says " Paris" with p ≈ 0.75), the graph of a
trained CLT gives its scores and its most influential features. For each of the top N features by influence, the
graph *predicts* how much removing it moves the top logit (demeaned, the graph's target): its direct edge, plus
its effect through every other feature, in the linear replacement model with frozen attention and norms:

    Δ = −(A[k, j] + A[k, F] diag(1/a_F) (I − B)⁻¹ A[F, j]),   B = A[F, F] diag(1/a_F)

(a feature's pre-activation moves by its incoming edges, and while it stays active its activation moves as
much). The *measured* change removes the feature from the real model: its decoder vectors, times its activation,
are subtracted from the MLP outputs it writes to at its position, and everything downstream (attention, MLPs,
norms) recomputes. The report gives both per feature and their rank correlation.

    python tests/bench/case_study_graph.py --load runs/clt-smollm2 --out runs/case_study.md
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv import formats  # noqa: E402
from minisv.atomic import write_text  # noqa: E402
from minisv.graph import attribute, influence, normalized, prune, scores  # noqa: E402


def predicted(graph, j):
    """The linear replacement model's change of the top logit when feature j is removed."""
    A, a, n_f = graph.adjacency.double(), graph.activations.double(), graph.n_features
    k = len(A) - len(graph.logit_ids)                                 # the top logit's row
    B = A[:n_f, :n_f] / a[None]
    moved = torch.linalg.solve(torch.eye(n_f, dtype=torch.float64) - B, A[:n_f, j])
    return float(-(A[k, j] + (A[k, :n_f] / a) @ moved))


@torch.no_grad()
def measured(model, clt, tokens, graph, j):
    """The real model's change of the top demeaned logit when feature j's decoder vectors are taken out."""
    l, p, f = graph.features[j].tolist()
    a = float(graph.activations[j])
    hooks = {}
    for t in range(l, model.cfg.n_layers):
        if l in clt.cfg.sources(t):
            delta = a * clt.decoder(l, f, t).float()

            def remove(y, name, delta=delta):
                y = y.clone()
                y[:, p] -= delta.to(y.dtype)
                return y
            hooks[f"blocks.{t}.hook_mlp_out"] = remove
    logits = model(torch.tensor([tokens]))[0, -1]
    with model.hooks(hooks):
        changed = model(torch.tensor([tokens]))[0, -1]
    k = int(graph.logit_ids[0])
    return float((changed[k] - changed.mean()) - (logits[k] - logits.mean()))


def spearman(x, y):
    rx, ry = (torch.tensor(v).argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(rx @ ry / (rx.norm() * ry.norm()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--load", required=True, help="a CLT (or per-layer set) directory covering every layer")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default="runs/case_study.md")
    args = p.parse_args(argv)
    model = minisv.load(args.model, device="cpu")
    clt = formats.load(args.load, model=model)
    tok = model.tokenizer
    tokens = tok.encode(args.prompt, bos=True)
    graph = attribute(model, clt, tokens)
    (rep, comp), nodes = scores(graph), prune(graph)
    pruned = scores(graph, *nodes[:2])
    score = influence(normalized(graph.adjacency), graph.logit_weights())[:graph.n_features]
    top = score.argsort(descending=True)[:args.top].tolist()
    rows = [(j, predicted(graph, j), measured(model, clt, tokens, graph, j)) for j in top]
    rho = spearman([r[1] for r in rows], [r[2] for r in rows])
    # the graph freezes attention: a feature at an earlier position reaches the logit only through attention, which
    # removing it also changes in the real model; at the last position it also has MLP and direct paths
    last = [r for r in rows if int(graph.features[r[0]][1]) == len(tokens) - 1]
    earlier = [r for r in rows if r not in last]

    def agreement(part):
        if len(part) < 3:
            return f"{len(part)} features"
        signs = sum((p > 0) == (m > 0) for _, p, m in part)
        return f"{len(part)} features, Spearman {spearman([r[1] for r in part], [r[2] for r in part]):.3f}, " \
               f"same sign {signs}/{len(part)}"
    word = tok.token_str(int(graph.logit_ids[0]))
    lines = [f"Prompt {args.prompt!r} ({len(tokens)} tokens with BOS): the model's next token is {word!r} with p = "
             f"{float(graph.logit_probs[0]):.3f}. Coder: {args.load}. Graph: {graph.n_features:,} active features, "
             f"{len(graph.logit_ids)} logits; replacement score {rep:.3f}, completeness {comp:.3f}; pruned to "
             f"{int(nodes[0].sum())} nodes: {pruned[0]:.3f}, {pruned[1]:.3f}.", "",
             f"Intervention check on the top {args.top} features by influence: the change of {word!r}'s demeaned "
             f"logit when the feature is removed, as the linear graph predicts it and as the real model gives it. "
             f"Spearman rank correlation: **{rho:.3f}**. At the last position: {agreement(last)}; at earlier "
             f"positions: {agreement(earlier)}.", "",
             "| feature (layer, position, id) | token | activation | predicted Δ | measured Δ |", "|---|---|---|---|---|"]
    for j, pred, meas in rows:
        l, pos, f = graph.features[j].tolist()
        lines.append(f"| {l}, {pos}, {f} | {tok.token_str(tokens[pos])!r} | {float(graph.activations[j]):.3f} | "
                     f"{pred:+.4f} | {meas:+.4f} |")
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
