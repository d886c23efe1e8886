"""How good is a transcoder? Sparsity, reconstruction, and what splicing it in costs (`docs/methods.md` §2.3).

    L0          mean number of active latents per token
    FVU         Σ‖y − ŷ‖² / Σ‖y − ȳ‖²: the fraction of the *target's* variance left unexplained (the reference
                code measured it against the input, which is meaningless for a transcoder). The target y is what
                the transcoder was trained to predict: mlp_out, or for a target-centered transcoder (the released
                GPT-2 ones) mlp_out minus its mean over d_model
    dead/dense  fractions of latents that never fire / fire on more than 10% of the evaluated tokens
    CE          next-token cross-entropy of the clean model, with the transcoder spliced in place of the MLP,
                and with the MLP zero-ablated; CE score = (CE_zero − CE_spliced) / (CE_zero − CE_clean):
                1 = as good as the MLP, 0 = as bad as deleting it
    KL          mean KL(clean ‖ spliced) of the next-token distributions, in nats

Positions holding `bos_id` (if given) are left alone: transcoders are trained without them (the BOS residual is
an outlier, an attention sink every later token reads), so they are neither spliced nor ablated there, and the
reconstruction metrics skip them too.

A target-centered transcoder is spliced in as it is: its output lacks mlp_out's mean over d_model, a multiple of
the all-ones vector, which every later LayerNorm subtracts anyway (such transcoders are made for LayerNorm models).
"""
import torch

from .transcoder import hook_names


@torch.no_grad()
def evaluate(model, rows, transcoders, bos_id=None, batch_rows=16):
    """Metrics on token rows [N, T] for {layer: Transcoder}: per layer ("layer_L": that transcoder alone spliced
    in) and, with several layers, "all" (every one of those MLPs replaced at once). Returns plain numbers."""
    layers = sorted(transcoders)
    runs = {"clean": ({}, [])}                       # name -> (transcoders spliced in, layers zero-ablated)
    for l in layers:
        runs[f"layer_{l}"], runs[f"layer_{l}_zero"] = ({l: transcoders[l]}, []), ({}, [l])
    if len(layers) > 1:
        runs["all"], runs["all_zero"] = (transcoders, []), ({}, layers)
    nll, kl = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    stats = {l: _Stats(transcoders[l].cfg.d_sae) for l in layers}
    n_pred = 0
    for i in range(0, len(rows), batch_rows):
        tokens = rows[i:i + batch_rows].to(model.embed.weight.device)
        keep = tokens != bos_id if bos_id is not None else torch.ones_like(tokens, dtype=torch.bool)
        # nothing changes below the first layer: run those blocks once (layer 0 starts from the tokens)
        start = model(tokens, stop_at_layer=layers[0]) if layers[0] > 0 else tokens
        for name, (spliced, ablated) in runs.items():
            with model.hooks(_hooks(spliced, ablated, keep, stats if name == "clean" else None, transcoders)):
                logp = model(start, start_at_layer=layers[0])[:, :-1].float().log_softmax(-1)
            if name == "clean":
                clean = logp
            nll[name] += float(-logp.gather(-1, tokens[:, 1:, None]).sum())
            kl[name] += float((clean.exp() * (clean - logp)).sum())
        n_pred += tokens[:, 1:].numel()
    out = {"tokens": n_pred, "ce_clean": nll["clean"] / n_pred}
    for l in layers:
        out[f"layer_{l}"] = {**stats[l].result(), **_ce(nll, kl, f"layer_{l}", n_pred)}
    if len(layers) > 1:
        out["all"] = _ce(nll, kl, "all", n_pred)
    return out


def _ce(nll, kl, name, n):
    zero, spliced, clean = nll[name + "_zero"], nll[name], nll["clean"]
    return {"ce_spliced": spliced / n, "ce_zero_ablated": zero / n, "ce_score": (zero - spliced) / (zero - clean),
            "kl": kl[name] / n}


def _hooks(spliced, ablated, keep, record, transcoders):
    """Hooks that put each spliced layer's transcoder output (or zeros, for ablated layers) in place of the MLP
    output at kept positions. In the clean run (`record`) they change nothing and feed the statistics."""
    hooks, inputs = {}, {}
    for l in set(spliced) | set(ablated) | (set(transcoders) if record is not None else set()):
        # ablation zeroes the MLP output; a coder reads and writes the hooks its config names (an SAE: one hook)
        cfg = transcoders[l].cfg
        x_name, y_name = hook_names(l) if l in ablated or not cfg.hook_in else (cfg.hook_in, cfg.hook_out)

        def read(x, name, l=l):
            inputs[l] = x

        def write(y, name, l=l, sae=x_name == y_name):
            x = y if sae else inputs[l]
            if record is not None:
                record[l].add(transcoders[l], x[keep], y[keep])
                return None
            new = torch.zeros_like(y) if l in ablated else spliced[l](x.to(spliced[l].W_enc.dtype))
            return torch.where(keep[..., None], new.to(y.dtype), y)
        hooks[x_name], hooks[y_name] = read, write
    return hooks


class _Stats:
    """Running sums for L0, FVU and firing frequencies, so no [tokens, d_sae] matrix is ever kept."""

    def __init__(self, d_sae):
        self.n, self.active, self.err, self.y_sq, self.y_sum = 0, 0.0, 0.0, 0.0, 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, tc, x, y):
        x = x.to(tc.W_enc.dtype)
        if tc.cfg.architecture == "topk":
            values, indices = tc.encode_sparse(x)
            y_hat = tc.decode_sparse(values, indices)
            fired = torch.zeros(tc.cfg.d_sae, device=x.device).index_add_(0, indices.flatten(),
                                                                          (values > 0).flatten().float())
        else:
            f = tc.encode(x)
            y_hat, fired = tc.decode(f), (f > 0).sum(0)
        if tc.W_skip is not None:
            y_hat = y_hat + x @ tc.W_skip
        y = y.double()
        if tc.cfg.target_centered:
            y = y - y.mean(-1, keepdim=True)
        self.n += len(y)
        self.fired += fired.double().cpu()
        self.err += float((y - y_hat.double()).pow(2).sum())
        self.y_sq, self.y_sum = self.y_sq + float(y.pow(2).sum()), self.y_sum + y.sum(0)

    def result(self):
        freq = self.fired / max(self.n, 1)
        live = freq[freq > 0]
        total_variance = self.y_sq - float(torch.as_tensor(self.y_sum).pow(2).sum()) / max(self.n, 1)
        return {"l0": float(self.fired.sum()) / max(self.n, 1), "fvu": self.err / total_variance,
                "dead": float((freq == 0).double().mean()), "dense": float((freq > 0.1).double().mean()),
                # live latents per decade of firing frequency: [1e-8, 1e-7), ..., [0.1, 1]
                "freq_histogram": {"log10_edges": list(range(-8, 1)),
                                   "counts": torch.histc(live.log10(), bins=8, min=-8, max=0).long().tolist()}}
