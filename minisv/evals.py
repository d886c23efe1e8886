"""How good is a transcoder? Sparsity, reconstruction, and what splicing it in costs (`docs/methods.md` §2.3).

    L0          mean number of active latents per token
    FVU         Σ‖y − ŷ‖² / Σ‖y − ȳ‖²: the fraction of the *target's* variance left unexplained (the reference
                code measured it against the input, which is meaningless for a transcoder). The target y is what
                the transcoder was trained to predict (`Transcoder.target`): mlp_out, or for a target-centered
                transcoder (the released GPT-2 ones) mlp_out minus its mean over d_model. `fvu` is the one place
                it is computed: training's loss and logs, the held-out curve and this evaluation all call it
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

from .clt import CrossLayerTranscoder
from .pullbacks import splice_hooks
from .progress import progress


def moments(y):
    """[Σ_n y_n (d numbers), Σ_n ‖y_n‖², n] of targets y [n, d] in float64: the sums FVU's denominator needs, which
    add up over batches and processes."""
    y = y.detach().double()
    return torch.cat([y.sum(0), y.pow(2).sum()[None], torch.tensor([len(y)], dtype=y.dtype, device=y.device)])


def fvu(sse, m):
    """FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² from the summed squared error `sse` and the targets' summed `moments` m. The
    denominator Σ‖y‖² − ‖Σy‖²/n is taken in float64: in float32 it cancels catastrophically when the mean dwarfs
    the spread (residual streams have dimensions like that)."""
    return sse / (m[-2] - m[:-2].pow(2).sum() / m[-1]).to(sse.dtype)


@torch.no_grad()
def evaluate(model, rows, coders, bos_id=None, batch_rows=16, per_row=False):
    """Metrics on token rows [N, T] for {layer: Transcoder}: per layer ("layer_L": that transcoder alone spliced
    in) and, with several layers, "all" (every one of those MLPs replaced at once); for a CrossLayerTranscoder,
    per layer L0/FVU/dead of its reconstruction and "all", the replacement model with every MLP replaced. Each
    spliced run reports CE, CE score, KL and top-1 agreement with the clean model. per_row: also each row's
    summed NLL and KL per run under "rows" (for paired standard errors across rows). Returns plain numbers."""
    clt = coders if isinstance(coders, CrossLayerTranscoder) else None
    layers = list(range(clt.cfg.n_layers)) if clt is not None else sorted(coders)
    runs = {"clean": {}}                              # name -> the coders spliced in (None: that MLP zero-ablated)
    for l in layers if clt is None else ():
        runs[f"layer_{l}"], runs[f"layer_{l}_zero"] = {l: coders[l]}, {l: None}
    if len(layers) > 1 or clt is not None:
        runs["all"], runs["all_zero"] = clt if clt is not None else dict(coders), dict.fromkeys(layers)
    sums = {name: {"nll": [], "kl": [], "agree": 0} for name in runs}
    stats, n_pred = {l: _Stats(clt.cfg.d_sae if clt else coders[l].cfg.d_sae) for l in layers}, 0
    sites = {l: (f"blocks.{l}.{clt.cfg.hook_in}", f"blocks.{l}.{clt.cfg.hook_out}") if clt else coders[l].sites(l)
             for l in layers}
    for i in progress(range(0, len(rows), batch_rows), "evaluating", unit=" batches"):
        tokens = rows[i:i + batch_rows].to(model.embed.weight.device)
        keep = tokens != bos_id if bos_id is not None else torch.ones_like(tokens, dtype=torch.bool)
        # nothing changes below the first layer: run those blocks once (layer 0 starts from the tokens)
        start = model(tokens, stop_at_layer=layers[0]) if layers[0] > 0 else tokens
        for name, spliced in runs.items():
            with model.hooks(splice_hooks(spliced, keep)):
                if name == "clean":
                    logits, cache = model.run_with_cache(start, names=sorted({n for p in sites.values() for n in p}),
                                                         start_at_layer=layers[0])
                    _reconstruction_stats(coders, clt, stats, sites, cache, keep)
                else:
                    logits = model(start, start_at_layer=layers[0])
            logp = logits[:, :-1].float().log_softmax(-1)
            if name == "clean":
                clean = logp
            sums[name]["nll"] += (-logp.gather(-1, tokens[:, 1:, None])[..., 0]).sum(-1).tolist()
            sums[name]["kl"] += (clean.exp() * (clean - logp)).sum((-1, -2)).tolist()
            sums[name]["agree"] += int((logp.argmax(-1) == clean.argmax(-1)).sum())
        n_pred += tokens[:, 1:].numel()
    out = {"tokens": n_pred, "ce_clean": sum(sums["clean"]["nll"]) / n_pred}
    for l in layers:
        out[f"layer_{l}"] = {**stats[l].result(), **(_ce(sums, f"layer_{l}", n_pred) if clt is None else {})}
    if "all" in runs:
        out["all"] = _ce(sums, "all", n_pred)
    if per_row:      # each row predicts rows.shape[1] − 1 tokens
        out["rows"] = {name: {k: sums[name][k] for k in ("nll", "kl")} for name in runs}
    return out


def _reconstruction_stats(coders, clt, stats, sites, cache, keep):
    """Feed each layer's reconstruction of the clean activations to its running statistics."""
    if clt is not None:
        x = torch.stack([cache[sites[l][0]][keep] for l in stats], 1)
        y_hat, values, indices = clt.reconstruct(x)
        fired = clt.fired(values, indices)
        for l in stats:
            stats[l].add(cache[sites[l][1]][keep], y_hat[:, l], fired[l])
        return
    for l, (x_name, y_name) in sites.items():
        tc = coders[l]
        y_hat, values, indices = tc.reconstruct(cache[x_name][keep])
        stats[l].add(tc.target(cache[y_name][keep]), y_hat, tc.fired(values, indices))


def _ce(sums, name, n):
    zero, spliced, clean = (sum(sums[k]["nll"]) for k in (name + "_zero", name, "clean"))
    return {"ce_spliced": spliced / n, "ce_zero_ablated": zero / n, "ce_score": (zero - spliced) / (zero - clean),
            "kl": sum(sums[name]["kl"]) / n, "top1_agreement": sums[name]["agree"] / n}


class _Stats:
    """Running sums for L0, FVU and firing frequencies of one layer's coder, so no [tokens, d_sae] matrix is kept."""

    def __init__(self, d_sae):
        self.n, self.sse, self.moments = 0, 0.0, 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def add(self, y, y_hat, fired):
        """Targets y and predictions y_hat [n, d] of n tokens, and how often each latent fired on them."""
        y = y.double()
        self.n += len(y)
        self.fired += fired.double().cpu()
        self.sse += float((y - y_hat.double()).pow(2).sum())
        self.moments = self.moments + moments(y).cpu()

    def result(self):
        freq = self.fired / max(self.n, 1)
        live = freq[freq > 0]
        return {"l0": float(self.fired.sum()) / max(self.n, 1),
                "fvu": float(fvu(torch.tensor(self.sse, dtype=torch.float64), self.moments)),
                "dead": float((freq == 0).double().mean()), "dense": float((freq > 0.1).double().mean()),
                # live latents per decade of firing frequency: [1e-8, 1e-7), ..., [0.1, 1]
                "freq_histogram": {"log10_edges": list(range(-8, 1)),
                                   "counts": torch.histc(live.log10(), bins=8, min=-8, max=0).long().tolist()}}
