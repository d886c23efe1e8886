"""Observable propagation: find the heads, MLPs and feature vectors behind a task from the weights alone, then check
the predictions against patching, a corpus and a low-data baseline (docs/methods.md §3; minisv/obprop.py).

The default run is the paper's gendered-pronoun study on the packaged SmolLM2-135M-Instruct, offline: subject
(' she' - ' he') and object (' her' - ' him') observables, each with its template filled with built-in female
(positive) and male (negative) single-token names. Per observable it prints the top heads by feature norm (no
data) next to the top heads by direct-path patching and by total-effect activation patching over name pairs, the
top MLPs by feature norm, and how well each top head's feature classifies the name compared with a
mean-difference vector from a handful of examples. Then, over every head, it compares the predicted subject ->
object coupling coefficient with the empirical best-fit slope of the two features' scores over corpus tokens.
Paths (--path) are evaluated token by token: a head reads its upstream components at its source token (@name,
@3, or by default the token it attends to most at the reference prompts). Results go to an HTML report (and,
with --json, to a machine-readable file that records the reference prompts, positions and linearization points).

Memory: the run estimates its peak memory from its settings (the model; the corpus pass, 16 rows at a time
through the whole model; the total-effect patching), prints the estimate at start and refuses to start when it
exceeds the memory available. The default run needs about 2.8 GB (2.3 GB measured; the corpus pass varies from
run to run with what the allocator keeps); --corpus-tokens, --ctx and --total-pairs lower it.
"""
import argparse
import json
import os
import sys
import time

import torch

import minisv
from minisv import cli, data
from minisv import obprop as ob
from minisv.atomic import write_text
from minisv.errors import MinisvError
from minisv.report import obprop_html

EPILOG = """examples:
  python obprop.py                                   # the gendered-pronoun study on SmolLM2 (offline)
  python obprop.py --observable "' she' - ' he'" --pos-prompt "Mary said that" --neg-prompt "John said that"
  python obprop.py --observable "' nurse' - ' engineer'" --template "My friend [NAME] is an excellent" --top 10
  python obprop.py --path "attn 26.2 <- mlp 20" --path "attn 26.2@name <- mlp 20" --search-paths 3 --json r.json
  python obprop.py --study occupations                # gendered occupations, coupled with she/he
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (packaged, offline), a hub id, a local HF directory "
                   "or a .gguf file (default: smollm2)")
    p.add_argument("--study", choices=sorted(ob.STUDIES), help="one of the paper's studies: pronouns (she/he and "
                   "her/him after names, the default), occupations (gendered occupations coupled with she/he), party "
                   "(Democrat/Republican after politicians' names), language (C ' {' vs Python ':' after a condition)")
    p.add_argument("--observable", action="append", help="a linear function of the logits: quoted single tokens "
                   "joined by + and -, with optional weights, e.g. \"' she' - ' he'\" or \"2*' her' - 1e-1*' him'\"; "
                   "repeat to compare observables (default: the paper's \"' she' - ' he'\" and \"' her' - ' him'\")")
    p.add_argument("--template", action="append", help="a prompt with ' [NAME]' where the names go; several "
                   "templates for one observable are joined with ' | ' (the paper averages 3). One per observable, "
                   "or one for all (default: the paper's templates for the default observables)")
    p.add_argument("--pos-names", help="comma-separated names of the positive class (default: built-in female names)")
    p.add_argument("--neg-names", help="comma-separated names of the negative class (default: built-in male names)")
    p.add_argument("--pos-prompt", action="append", help="a positive prompt instead of a template (one, or one per "
                   "observable); the observable is read at its last token")
    p.add_argument("--neg-prompt", action="append", help="the matching negative prompt")
    p.add_argument("--pairs", type=cli.positive_int, default=20, help="prompt pairs for direct-path patching "
                   "(default: 20)")
    p.add_argument("--total-pairs", type=cli.nonneg_int, default=4, help="prompt pairs for total-effect activation "
                   "patching, one forward per layer over heads x pairs prompts; 0 skips it (default: 4)")
    p.add_argument("--top", type=cli.positive_int, default=5, help="heads and MLPs shown per ranking, the k of the "
                   "top-k overlap, and the width of the path search (default: 5)")
    p.add_argument("--path", action="append", help="also report this path's feature vector, written from the logits "
                   "back, a head optionally with its source token: 'attn 26.2@name <- mlp 20', '@3', '@-2' "
                   "(repeatable)")
    p.add_argument("--search-paths", type=cli.nonneg_int, default=0, help="greedy path search: grow the --top paths "
                   "of largest |feature·activation| backwards through heads and MLPs for this many steps (default: 0)")
    p.add_argument("--corpus", help="text for the empirical coupling slopes: a .txt/.md/.jsonl file, a folder of them, "
                   "or pre-tokenized .bin/.npy tokens (default: minisv's built-in corpus)")
    p.add_argument("--corpus-tokens", type=cli.positive_int, default=20_000, help="corpus tokens to score "
                   "(default: 20000)")
    p.add_argument("--ctx", type=cli.positive_int, help="corpus row length in tokens, at least 2 (default: 128, or "
                   "the model's context if shorter)")
    p.add_argument("--train-examples", type=cli.positive_int, default=5, help="names per class (per template) the "
                   "mean-difference baseline is built from; the other names are the test set (default: 5)")
    p.add_argument("--exact-norms", action="store_true", help="exact norm Jacobians at the reference prompts instead "
                   "of frozen norm scales")
    p.add_argument("--html", default="runs/obprop/report.html", help="HTML report path (default: %(default)s)")
    p.add_argument("--json", help="also write every result, machine-readable, to this file")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------- tasks
def build_tasks(model, args):
    """One task per observable: the observable and groups of paired positive/negative prompts, one group per
    template (with its names and the name's token position), or one group holding the given prompts."""
    tok = model.tokenizer
    if tok is None:
        raise MinisvError("prompts and templates need the model's tokenizer; this model has none")
    tasks = []
    for spec, templates, pos, neg in study_entries(args):
        if templates is None:
            groups = [dict(template=None, names=None, position=None, pos=[tok.encode(p, bos=tok.add_bos) for p in pos],
                           neg=[tok.encode(p, bos=tok.add_bos) for p in neg])]
        else:
            groups = [template_group(model, template.strip(), args) for template in templates]
        obs = ob.observable(model, spec, first_token=args.study is not None)
        if not obs.weights.isfinite().all():       # e.g. 1e309*' she': every feature vector would be inf or NaN
            raise MinisvError(f"observable {obs.name!r} has a weight beyond float32's range (±3.4e38), stored as "
                              f"{obs.weights[~obs.weights.isfinite()][0].item()}; use smaller weights")
        for warning in obs.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        tasks.append(dict(obs=obs, groups=groups))
    return tasks


def study_entries(args):
    """(observable, templates or None, positive prompts, negative prompts) per observable, from --study or from
    --observable with --template or --pos-prompt/--neg-prompt (default: the pronoun study)."""
    flags = args.observable or args.template or args.pos_prompt or args.neg_prompt
    if args.study is not None and flags:
        raise MinisvError(f"--study {args.study} sets the observables and prompts; drop --observable, --template, "
                          f"--pos-prompt and --neg-prompt, or drop --study")
    if args.study is not None or not args.observable:
        study = ob.STUDIES[args.study or "pronouns"]
        if args.template or args.pos_prompt or args.neg_prompt:
            raise MinisvError("--template and --pos-prompt/--neg-prompt need --observable")
        return [(spec, rest[0], None, None) if len(rest) == 1 else (spec, None, *rest) for spec, *rest in study]
    specs = args.observable
    if args.pos_prompt or args.neg_prompt:
        pos, neg = args.pos_prompt or [], args.neg_prompt or []
        if len(pos) != len(neg) or len(pos) not in (1, len(specs)):
            raise MinisvError(f"got {len(pos)} --pos-prompt and {len(neg)} --neg-prompt for {len(specs)} "
                              f"observable(s); give one pair, or one pair per observable")
        return [(spec, None, [pos[i % len(pos)]], [neg[i % len(neg)]]) for i, spec in enumerate(specs)]
    templates = args.template
    if not templates or len(templates) not in (1, len(specs)):
        raise MinisvError(f"give one --template (with [NAME]) for all observables or one per observable "
                          f"({len(specs)}), or --pos-prompt/--neg-prompt")
    return [(spec, templates[i % len(templates)].split(" | "), None, None) for i, spec in enumerate(specs)]


def template_group(model, template, args):
    """A template filled with the positive and the negative names that are single tokens in it."""
    classes = [[n.strip() for n in flag.split(",")] if flag else default
               for flag, default in ((args.pos_names, ob.FEMALE_NAMES), (args.neg_names, ob.MALE_NAMES))]
    (pos_names, pos, position), (neg_names, neg, _) = (ob.template_prompts(model, template, names)
                                                       for names in classes)
    return dict(template=template, names=(pos_names, neg_names), position=position, pos=pos, neg=neg)


def prompt_pairs(task, n):
    """Up to n (positive, negative) prompt pairs, taken from the templates in turn; a pair shares its template."""
    groups = task["groups"]
    pairs = [(g["pos"][i], g["neg"][i]) for i in range(max(min(len(g["pos"]), len(g["neg"])) for g in groups))
             for g in groups if i < min(len(g["pos"]), len(g["neg"]))]
    return [p for p, _ in pairs[:n]], [q for _, q in pairs[:n]]


# ------------------------------------------------------------------------- the analyses
def analyse(model, task, args, say):
    """Feature norms vs both kinds of patching, the MLP ranking, the low-data classifier comparison, the requested
    paths and the path search, for one observable."""
    obs, first = task["obs"], task["groups"][0]
    slots = {"name": first["position"]} if first["position"] is not None else None
    ref = ob.reference(model, first["pos"][0], first["neg"][0], slots)  # where MLPs are linearized, norms evaluated
    feats = ob.single_features(model, obs, ref, args.exact_norms)
    norms, mlp_norms = feats["attn"].norm(dim=-1), feats["mlp"].norm(dim=-1)
    pos, neg = prompt_pairs(task, args.pairs)
    say(f"{obs.name}: feature vectors of every head and MLP; direct-path patching of every head over {len(pos)} "
        f"pair(s)")
    effects = {"direct": ob.patch_heads(model, obs, pos, neg)}
    total_pairs = min(args.total_pairs, len(pos))
    if total_pairs and all(len(p) == len(q) for p, q in zip(pos[:total_pairs], neg[:total_pairs])):
        say(f"{obs.name}: total-effect activation patching of every head over {total_pairs} pair(s)")
        effects["total"] = ob.patch_heads_total(model, obs, pos[:total_pairs], neg[:total_pairs])
    elif total_pairs:
        say("total-effect patching skipped: the prompts of a pair differ in length (use a template)")

    def top(x, k):
        return [[i // x.shape[-1], i % x.shape[-1]] if x.dim() == 2 else i
                for i in x.flatten().topk(min(k, x.numel())).indices.tolist()]
    out = dict(observable=obs.name, pairs=len(pos), total_pairs=total_pairs if "total" in effects else 0,
               feature_norms=norms.tolist(), mlp_feature_norms=mlp_norms.tolist(), top_by_norm=top(norms, args.top),
               top_mlps_by_norm=top(mlp_norms, args.top), patching=effects["direct"].tolist(),
               total_patching=effects["total"].tolist() if "total" in effects else None,
               top_by_patching=top(effects["direct"].abs(), args.top),
               top_by_total_patching=top(effects["total"].abs(), args.top) if "total" in effects else None,
               agreement={f"norm_vs_{kind}": ob.ranking_agreement(norms, e.abs(), args.top) for kind, e in
                          effects.items()})
    if "total" in effects:
        out["agreement"]["direct_vs_total"] = ob.ranking_agreement(effects["direct"].abs(), effects["total"].abs(),
                                                                   args.top)
    # ln_final's scale s at the reference's last token (the factor between norm-scaled and weights-only features)
    out["final_norm_scale"] = float(ob.logit_feature(model, obs, ref).norm() / ob.logit_feature(model, obs).norm())
    out["reference"] = dict(tokens=ref.prompts, text=[[model.tokenizer.token_str(i) for i in p] for p in ref.prompts],
                            slots=ref.slots, templates=[g["template"] for g in task["groups"]])
    if sum(len(g["pos"]) for g in task["groups"]) > 1:
        out["classifier"] = classify(model, task, feats["attn"], out["top_by_norm"], args.train_examples)
    out["paths"] = path_results(model, obs, args.path or [], ref, args.exact_norms)
    if args.search_paths:
        say(f"{obs.name}: greedy path search, {args.search_paths} step(s) of width {args.top}")
        out["search"] = ob.search_paths(model, obs, ref, args.search_paths, args.top, args.exact_norms)
    return out, feats["attn"]


def path_results(model, obs, paths, ref, exact):
    """Each path's feature vector with where every component acted (`locate`'s steps: the token it writes at and
    the token it reads, and an MLP's linearization point τ between the two reference prompts), so that a result
    can be reproduced from the JSON alone."""
    out = {}
    for path in paths:
        y, steps = ob.feature_vector(model, obs, path, ref, exact, trace=True)
        out[path] = dict(norm=float(y.norm()), vector=y.tolist(), steps=steps)
    return out


def classify(model, task, head_feats, heads, k):
    """AUC of each head's ObProp feature (no training data) vs a mean-difference vector from k examples per class
    and template, as classifiers of the class from x̂ at the name token (what the head reads; the last token for
    prompts without a template), on the other examples."""
    hooks = sorted({f"blocks.{l}.ln1.hook_normalized" for l, _ in heads})
    train, test = {"pos": [], "neg": []}, {"pos": [], "neg": []}
    for g in task["groups"]:
        n_pos, n_neg = (len(g["pos"]), len(g["neg"])) if g["names"] is None else map(len, g["names"])
        if not 0 < k < min(n_pos, n_neg):
            raise MinisvError(f"--train-examples {k} leaves no test examples ({n_pos} positive, {n_neg} negative "
                              f"prompts from {g['template'] or 'the prompts'!r}); use a smaller value or more examples")
        for side in ("pos", "neg"):
            at = None if g["position"] is None else [g["position"]] * len(g[side])
            acts = ob.last_token_acts(model, g[side], hooks, at=at)
            train[side].append({h: x[:k].float() for h, x in acts.items()})
            test[side].append({h: x[k:].float() for h, x in acts.items()})
    rows = []
    for l, h in heads:
        hook = f"blocks.{l}.ln1.hook_normalized"
        (x_pos, x_neg), (t_pos, t_neg) = ([torch.cat([a[hook] for a in part[side]]) for side in ("pos", "neg")]
                                          for part in (train, test))
        mean_difference = x_pos.mean(0) - x_neg.mean(0)
        y = head_feats[l, h]
        rows.append(dict(head=[l, h], auc_obprop=ob.auc(t_pos @ y, t_neg @ y),
                         auc_mean_difference=ob.auc(t_pos @ mean_difference, t_neg @ mean_difference)))
    return dict(train_examples=k, test_names=[len(t_pos), len(t_neg)], heads=rows)


def corpus_rows(model, args):
    """Rows [N, ctx] of the corpus, at most --corpus-tokens tokens."""
    bos = model.tokenizer.bos_id if model.tokenizer is not None and model.tokenizer.add_bos else None
    if args.corpus is not None and args.corpus.endswith(data.TOKEN_SUFFIXES):
        rows = data.load_tokens(args.corpus, args.ctx, bos)
    elif model.tokenizer is None:
        raise MinisvError("the corpus needs the model's tokenizer; this model has none (give pre-tokenized .bin/.npy)")
    else:
        texts = data.default_corpus() if args.corpus is None else data.read_texts(args.corpus)
        rows = data.token_rows(model.tokenizer, texts, args.ctx, bos=model.tokenizer.add_bos)
    rows = rows[:-(-args.corpus_tokens // args.ctx)]
    if len(rows) * (args.ctx - 1) < 3:
        raise MinisvError(f"the corpus gives {len(rows)} row(s) of {args.ctx} tokens: too few scored tokens for a "
                          f"slope; give more text or a larger --corpus-tokens")
    return rows


def couple(model, tasks, results, head_feats, args, say):
    """Over every head: the predicted coupling of the first observable's feature to every other observable's,
    next to the best-fit slope of their scores over corpus tokens (one batched pass scores every feature), with
    Pearson/Spearman correlations overall and by |cosine| of the two features."""
    rows = corpus_rows(model, args)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    say(f"scoring {L * H} heads x {len(tasks)} observables on {rows.numel()} corpus tokens ({len(rows)} rows)")
    # features read at ln1 of layer l, ordered (observable, head): [len(tasks)·H, D]
    features = {f"blocks.{l}.ln1.hook_normalized": torch.cat([f[l] for f in head_feats]) for l in range(L)}
    scores = ob.feature_scores(model, features, rows)
    weights_only = [ob.single_features(model, t["obs"])["attn"] for t in tasks]     # no norm scales at all
    out = []
    for j in range(1, len(tasks)):
        heads = []
        for l in range(L):
            s = scores[f"blocks.{l}.ln1.hook_normalized"]
            for h in range(H):
                slope, r2 = ob.fit_slope(s[h], s[j * H + h])
                y1, y2 = head_feats[0][l, h], head_feats[j][l, h]
                heads.append(dict(head=[l, h], predicted=ob.coupling(y1, y2), slope=slope, r2=r2,
                                  cosine=ob.cosine(y1, y2),
                                  predicted_weights_only=ob.coupling(weights_only[0][l, h], weights_only[j][l, h])))
        y1, y2 = (ob.logit_feature(model, t["obs"]) for t in (tasks[0], tasks[j]))
        out.append(dict(source=tasks[0]["obs"].name, target=tasks[j]["obs"].name, tokens=s.shape[1],
                        observables_cosine=ob.cosine(y1, y2), summary=agreement_by_cosine(heads),
                        scale_ratio=results[j]["final_norm_scale"] / results[0]["final_norm_scale"],
                        top_heads=[heads[l * H + h] for l, h in results[0]["top_by_norm"]], heads=heads))
    return out


def agreement_by_cosine(heads):
    """Pearson and Spearman correlation of predicted coupling vs empirical slope over the heads, overall and in
    bins of |cosine| between the two features (where the prediction should be good: a feature pair with cosine
    near 0 has a coupling near 0 and a noisy slope)."""
    bins = [("all", 0.0, 1.01), ("|cos| >= 0.9", 0.9, 1.01), ("0.5 <= |cos| < 0.9", 0.5, 0.9),
            ("|cos| < 0.5", 0.0, 0.5)]
    out = []
    for name, lo, hi in bins:
        chosen = [x for x in heads if lo <= abs(x["cosine"]) < hi]
        row = dict(bin=name, heads=len(chosen), pearson=None, spearman=None)
        if len(chosen) >= 3:
            p, s = (torch.tensor([x[k] for x in chosen], dtype=torch.float64) for k in ("predicted", "slope"))
            row.update(pearson=pearson(p, s), spearman=pearson(p.argsort().argsort().double(),
                                                               s.argsort().argsort().double()))
        out.append(row)
    return out


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


# ------------------------------------------------------------------------- printing
def print_results(results, couplings, args):
    basis = "exact norms at one prompt pair" if args.exact_norms else "no data"
    for r in results:
        total = r["total_patching"] is not None
        also = f" and by total-effect patching ({r['total_pairs']} pair(s))" if total else ""
        print(f"\n{r['observable']}   top {args.top} heads by feature norm ({basis}), by direct-path patching "
              f"({r['pairs']} pair(s)){also}")
        for name, a in r["agreement"].items():
            print(f"  {name.replace('_', ' ')}: top-{args.top} overlap {a['top_k_overlap']:.0%}, Spearman "
                  f"{a['spearman']:.2f} over all heads")
        print(f"  {'rank':>4}  {'head':>6} {'‖y‖':>7}    {'head':>6} {'direct':>8}"
              + (f"    {'head':>6} {'total':>8}" if total else ""))
        for i in range(len(r["top_by_norm"])):
            (l1, h1), (l2, h2) = r["top_by_norm"][i], r["top_by_patching"][i]
            line = (f"  {i + 1:>4}  {l1:>3}.{h1:<2} {r['feature_norms'][l1][h1]:7.3f}    "
                    f"{l2:>3}.{h2:<2} {r['patching'][l2][h2]:+8.3f}")
            if total:
                l3, h3 = r["top_by_total_patching"][i]
                line += f"    {l3:>3}.{h3:<2} {r['total_patching'][l3][h3]:+8.3f}"
            print(line)
        print("  top MLPs by feature norm: " + ", ".join(f"mlp {m} ({r['mlp_feature_norms'][m]:.3f})"
                                                        for m in r["top_mlps_by_norm"]))
        if "classifier" in r:
            c = r["classifier"]
            print(f"  classifying the class from x̂ at the name token (the last token without a template; "
                  f"{c['test_names'][0]} vs {c['test_names'][1]} test prompts; the mean difference is built from "
                  f"{c['train_examples']} examples per class and template):")
            print(f"  {'head':>6}  {'AUC ObProp':>10}  {'AUC mean-diff':>13}")
            for x in c["heads"]:
                print(f"  {ob.head_name(x['head']):>6}  {x['auc_obprop']:10.3f}  {x['auc_mean_difference']:13.3f}")
            if any(x["auc_obprop"] < 0.5 for x in c["heads"]):
                print("  (an ObProp AUC below 0.5: the head reads the name with the opposite sign, i.e. pushes the "
                      "observable the other way)")
        words = r["reference"]["text"][0]
        for path, y in r["paths"].items():
            where = "; ".join(f"{ob.step_name(s)} reads token {s['reads']} {words[s['reads']]!r}" for s in y["steps"])
            print(f"  path {path}: ‖y‖ = {y['norm']:.4f}   ({where})")
        if "search" in r:
            print(f"  path search (score: contribution to n·ℓ(pos) − n·ℓ(neg) at the reference prompts; "
                  f"@k = source token k of {words}):")
            for line in ob.format_search(r["search"]):
                print("    " + line)
    for c in couplings:
        print(f"\ncoupling {c['source']} -> {c['target']} over all {len(c['heads'])} heads (observables' cosine "
              f"{c['observables_cosine']:.3f}; slopes over {c['tokens']} tokens). Predicted: the norm-scaled "
              f"features (= weights-only x {c['scale_ratio']:.3f}, the ratio of the two tasks' final-norm scales)")
        for s in c["summary"]:
            corr = "" if s["pearson"] is None else f"Pearson {s['pearson']:.3f}, Spearman {s['spearman']:.3f}"
            print(f"  {s['bin']:<20} {s['heads']:>4} heads  {corr}")
        print(f"  {'head':>6}  {'predicted':>9}  {'weights-only':>12}  {'slope':>7}  {'r²':>5}  {'cosine':>6}")
        for x in c["top_heads"]:
            print(f"  {ob.head_name(x['head']):>6}  {x['predicted']:9.3f}  {x['predicted_weights_only']:12.3f}  "
                  f"{x['slope']:7.3f}  {x['r2']:5.3f}  {x['cosine']:6.3f}")


# ------------------------------------------------------------------------- main
def run(args):
    t0 = time.time()

    def say(message):   # progress, with the time since the start
        print(f"[{time.time() - t0:6.1f}s] {message}", flush=True)
    inputs = [("--model", cli.model_path(args.model), "any"), ("--corpus", args.corpus, "data")]
    cli.check_paths(inputs=[i for i in inputs if i[1] is not None],
                    outputs=[("--html", args.html)] + ([("--json", args.json)] if args.json else []))
    if args.ctx is not None and args.ctx < 2:
        raise MinisvError(f"--ctx {args.ctx} is too short: a slope needs rows of at least 2 tokens (the first "
                          f"token of each row is skipped)")
    device = cli.device(args.device)
    available = cli.available_memory(device)        # before the model takes its share
    say(f"loading {args.model}")
    model = cli.check_logits(minisv.load(args.model, device=device), args.model)
    if args.top > model.cfg.n_layers * model.cfg.n_heads:
        raise MinisvError(f"--top {args.top} is more than the model's {model.cfg.n_layers * model.cfg.n_heads} heads")
    args.ctx = args.ctx or min(128, model.cfg.n_ctx)
    if args.ctx > model.cfg.n_ctx:
        raise MinisvError(f"--ctx {args.ctx} is longer than the model's context of {model.cfg.n_ctx} tokens")
    for path in args.path or []:
        ob.parse_path(model, path)          # a bad path fails before the slow part
    tasks = build_tasks(model, args)
    cli.check_memory(*memory(model, args, tasks), available, {"corpus pass": "--corpus-tokens or --ctx",
                                                                "patching": "--total-pairs"}, say)
    results, head_feats = zip(*(analyse(model, task, args, say) for task in tasks))
    couplings = couple(model, tasks, results, head_feats, args, say) if len(tasks) > 1 else []
    cli.check_finite(dict(observables=results, couplings=couplings), "the results")
    print_results(results, couplings, args)
    write_text(args.html, obprop_html(args.model, results, couplings))
    if args.json:
        write_text(args.json, json.dumps(dict(model=args.model, settings=vars(args), observables=results,
                                              couplings=couplings, seconds=round(time.time() - t0, 1)), indent=1))
    say(f"done: report {args.html}" + (f", results {args.json}" if args.json else ""))
    return 0


def memory(model, args, tasks):
    """(held, phases) for cli.check_memory: Python with torch and the model (with what loading keeps); then the
    corpus pass (the text tokenized, every head's score of every observable on every token, gathered twice, and
    16 rows at a time through the whole model) or the total-effect patching (heads × pairs prompts through the
    model). The pass frees each layer's activations, but the allocator keeps much of what it freed: the default
    run measured 1.1-1.6 GB above the model over three runs, so 0.6 of a batch's activations in every layer is
    counted as held."""
    c, width = model.cfg, model.embed.weight.element_size()
    text = os.path.getsize(args.corpus) if args.corpus and os.path.isfile(args.corpus) else 2_100_000
    per_layer = 16 * args.ctx * (8 * c.d_model + 3 * c.d_mlp + 2 * c.n_heads * args.ctx) * width
    scores = 2 * args.corpus_tokens * c.n_layers * c.n_heads * len(tasks) * 4
    prompt = max(len(p) for t in tasks for g in t["groups"] for p in g["pos"] + g["neg"])
    patching = 2 * c.n_heads * args.total_pairs * prompt * (c.n_layers * (2 * c.d_model + c.n_heads * c.d_head)
                                                            + 6 * c.d_model + 3 * c.d_mlp) * width
    corpus = 12 * text + scores + int(0.6 * c.n_layers * per_layer) if len(tasks) > 1 else 0
    return ({"runtime": cli.RUNTIME_BYTES, "model": cli.model_bytes(model) * 5 // 4},
            {"corpus pass": corpus, "patching": patching})


def main(argv=None):
    return cli.main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
