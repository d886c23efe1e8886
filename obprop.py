"""Observable propagation: find the heads and feature vectors behind a task from the weights alone, then check the
predictions against path patching, a corpus and a low-data baseline (METHODS.md §3; minisv/obprop.py).

The default run is the paper's gendered-pronoun study on the packaged SmolLM2-135M-Instruct, offline: subject
(' she' - ' he') and object (' her' - ' him') observables, each with its template filled with built-in female
(positive) and male (negative) single-token names. Per observable it prints the top heads by feature norm (no
data) next to the top heads by path patching over name pairs, and how well each top head's feature classifies
the name compared with a mean-difference vector from a handful of examples. Then, at the top heads, it prints
the predicted subject -> object coupling coefficient next to the empirical best-fit slope of the two features'
scores over corpus tokens. Results go to an HTML report (and, with --json, to a machine-readable file).
"""
import argparse
import html
import json
import sys
import time

import torch

import minisv
from minisv import obprop as ob
from minisv.errors import MinisvError
from minisv.atomic import write_text

EPILOG = """examples:
  python obprop.py                                   # the gendered-pronoun study on SmolLM2 (offline)
  python obprop.py --observable "' she' - ' he'" --pos-prompt "Mary said that" --neg-prompt "John said that"
  python obprop.py --observable "' nurse' - ' engineer'" --template "My friend [NAME] is an excellent" --top 10
  python obprop.py --path "attn 26.2 <- mlp 20" --corpus mytexts/ --json results.json
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (packaged, offline), a hub id, a local HF directory "
                   "or a .gguf file (default: smollm2)")
    p.add_argument("--observable", action="append", help="a linear function of the logits: quoted single tokens "
                   "joined by + and -, e.g. \"' she' - ' he'\"; repeat to compare observables (default: the paper's "
                   "\"' she' - ' he'\" and \"' her' - ' him'\")")
    p.add_argument("--template", action="append", help="a prompt with ' [NAME]' where the names go: one per "
                   "observable, or one for all (default: the paper's templates for the default observables)")
    p.add_argument("--pos-names", help="comma-separated names of the positive class (default: built-in female names)")
    p.add_argument("--neg-names", help="comma-separated names of the negative class (default: built-in male names)")
    p.add_argument("--pos-prompt", action="append", help="a positive prompt instead of a template (one, or one per "
                   "observable); the observable is read at its last token")
    p.add_argument("--neg-prompt", action="append", help="the matching negative prompt")
    p.add_argument("--pairs", type=int, default=20, help="name pairs patched per observable (default: 20)")
    p.add_argument("--top", type=int, default=5, help="heads shown per ranking, and the k of the top-k overlap "
                   "(default: 5)")
    p.add_argument("--path", action="append", help="also report this path's feature vector, written from the logits "
                   "back, e.g. 'attn 26.2 <- mlp 20' (repeatable)")
    p.add_argument("--corpus", help="text for the empirical coupling slopes: a .txt/.md/.jsonl file or a folder "
                   "(default: minisv's built-in corpus)")
    p.add_argument("--corpus-tokens", type=int, default=20_000, help="corpus tokens to score (default: 20000)")
    p.add_argument("--ctx", type=int, default=128, help="corpus row length in tokens (default: 128)")
    p.add_argument("--train-examples", type=int, default=5, help="names per class the mean-difference baseline is "
                   "built from; the other names are the test set (default: 5)")
    p.add_argument("--exact-norms", action="store_true", help="exact norm Jacobians at the reference prompts instead "
                   "of frozen norm scales")
    p.add_argument("--html", default="runs/obprop/report.html", help="HTML report path (default: %(default)s)")
    p.add_argument("--json", help="also write every result, machine-readable, to this file")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def build_tasks(model, args):
    """One task per observable: the observable and paired positive/negative prompts, plus the names and the
    name's token position when the prompts come from a template."""
    specs = args.observable or [spec for spec, _ in ob.PRONOUN_STUDY]
    tok = model.tokenizer
    if args.pos_prompt or args.neg_prompt:
        pos, neg = args.pos_prompt or [], args.neg_prompt or []
        if len(pos) != len(neg) or len(pos) not in (1, len(specs)):
            raise MinisvError(f"got {len(pos)} --pos-prompt and {len(neg)} --neg-prompt for {len(specs)} "
                              f"observable(s); give one pair, or one pair per observable")
        if tok is None:
            raise MinisvError("prompts need the model's tokenizer; this model has none")
        return [dict(obs=ob.observable(model, spec), pos=[tok.encode(pos[i % len(pos)], bos=tok.add_bos)],
                     neg=[tok.encode(neg[i % len(neg)], bos=tok.add_bos)], names=None) for i, spec in enumerate(specs)]
    templates = args.template or (None if args.observable else [t for _, t in ob.PRONOUN_STUDY])
    if not templates or len(templates) not in (1, len(specs)):
        raise MinisvError(f"give one --template (with [NAME]) for all observables or one per observable "
                          f"({len(specs)}), or --pos-prompt/--neg-prompt")
    classes = [[n.strip() for n in flag.split(",")] if flag else default
               for flag, default in ((args.pos_names, ob.FEMALE_NAMES), (args.neg_names, ob.MALE_NAMES))]
    tasks = []
    for i, spec in enumerate(specs):
        template = templates[i % len(templates)]
        (pos_names, pos, position), (neg_names, neg, _) = (ob.template_prompts(model, template, names)
                                                           for names in classes)
        tasks.append(dict(obs=ob.observable(model, spec), pos=pos, neg=neg, names=(pos_names, neg_names),
                          position=position))
    return tasks


def analyse(model, task, args, say):
    """Feature norms vs patching, the low-data classifier comparison and the requested paths, for one observable."""
    obs, H = task["obs"], model.cfg.n_heads
    slots = {"name": task["position"]} if task["names"] is not None else None
    ref = ob.reference(model, task["pos"][0], task["neg"][0], slots)   # where MLPs are linearized, norms evaluated
    feats = ob.single_features(model, obs, ref, args.exact_norms)
    norms = feats["attn"].norm(dim=-1)
    pairs = min(args.pairs, len(task["pos"]), len(task["neg"]))
    say(f"{obs.name}: feature vectors of every head and MLP; patching every head over {pairs} pair(s)")
    effects = ob.patch_heads(model, obs, task["pos"][:pairs], task["neg"][:pairs])
    top_norm, top_patch = ([[i // H, i % H] for i in x.flatten().topk(args.top).indices.tolist()]
                           for x in (norms, effects.abs()))
    out = dict(observable=obs.name, pairs=pairs, feature_norms=norms.tolist(), patching=effects.tolist(),
               mlp_feature_norms=feats["mlp"].norm(dim=-1).tolist(), top_by_norm=top_norm, top_by_patching=top_patch,
               agreement=ob.ranking_agreement(norms, effects.abs(), args.top))
    if task["names"] is not None:
        out["classifier"] = classify(model, task, feats["attn"], top_norm, args.train_examples)
    out["reference"] = dict(tokens=ref.prompts, text=[[model.tokenizer.token_str(i) for i in p] for p in ref.prompts],
                            slots=ref.slots)
    out["paths"] = path_results(model, obs, args.path or [], ref, args.exact_norms)
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
    """AUC of each head's ObProp feature (no training data) vs a mean-difference vector from k names per class, as
    classifiers of the name's class from x̂ at the name token (what the head reads), on the remaining names."""
    (pos_names, neg_names), position = task["names"], task["position"]
    if not 0 < k < min(len(pos_names), len(neg_names)):
        raise MinisvError(f"--train-examples {k} leaves no test names ({len(pos_names)} positive, {len(neg_names)} "
                          f"negative single-token names); use a smaller value or more names")
    hooks = sorted({f"blocks.{l}.ln1.hook_normalized" for l, _ in heads})
    pos, neg = (ob.last_token_acts(model, prompts, hooks, at=[position] * len(prompts))
                for prompts in (task["pos"], task["neg"]))
    rows = []
    for l, h in heads:
        x_pos, x_neg = (acts[f"blocks.{l}.ln1.hook_normalized"].float() for acts in (pos, neg))
        mean_difference = x_pos[:k].mean(0) - x_neg[:k].mean(0)
        rows.append(dict(head=[l, h], auc_obprop=ob.auc(x_pos[k:] @ head_feats[l, h], x_neg[k:] @ head_feats[l, h]),
                         auc_mean_difference=ob.auc(x_pos[k:] @ mean_difference, x_neg[k:] @ mean_difference)))
    return dict(train_examples=k, test_names=[len(pos_names) - k, len(neg_names) - k], heads=rows)


def couple(model, tasks, results, head_feats, args, say):
    """At the first observable's top heads: the predicted coupling of its features to every other observable's,
    next to the best-fit slope of their scores over corpus tokens (one batched pass scores every feature)."""
    from minisv import data
    if model.tokenizer is None:
        raise MinisvError("the corpus needs the model's tokenizer; this model has none")
    texts = data.default_corpus() if args.corpus is None else data.read_texts(args.corpus)
    rows = data.token_rows(model.tokenizer, texts, args.ctx, bos=model.tokenizer.add_bos)
    rows = rows[:-(-args.corpus_tokens // args.ctx)]
    heads = results[0]["top_by_norm"]
    say(f"scoring {len(heads)} heads x {len(tasks)} observables on {rows.numel()} corpus tokens ({len(rows)} rows)")
    stacks, where = {}, {}      # hook name -> features read there; (l, h) -> (hook name, first row)
    for l, h in heads:
        stack = stacks.setdefault(f"blocks.{l}.ln1.hook_normalized", [])
        where[l, h] = f"blocks.{l}.ln1.hook_normalized", len(stack)
        stack += [f[l, h] for f in head_feats]
    scores = ob.feature_scores(model, {name: torch.stack(s) for name, s in stacks.items()}, rows)
    out = []
    for j in range(1, len(tasks)):
        table = []
        for l, h in heads:
            name, i = where[l, h]
            slope, r2 = ob.fit_slope(scores[name][i], scores[name][i + j])
            y1, y2 = head_feats[0][l, h], head_feats[j][l, h]
            table.append(dict(head=[l, h], predicted=ob.coupling(y1, y2), slope=slope, r2=r2, cosine=ob.cosine(y1, y2)))
        y1, y2 = (ob.logit_feature(model, t["obs"]) for t in (tasks[0], tasks[j]))
        out.append(dict(source=tasks[0]["obs"].name, target=tasks[j]["obs"].name, tokens=scores[name].shape[1],
                        observables_cosine=ob.cosine(y1, y2), heads=table))
    return out


def print_results(results, couplings, args):
    basis = "exact norms at one prompt pair" if args.exact_norms else "no data"
    for r in results:
        a = r["agreement"]
        print(f"\n{r['observable']}   top {args.top} heads by feature norm ({basis}) vs by path patching ({r['pairs']} "
              f"pair(s)): overlap {a['top_k_overlap']:.0%}, Spearman {a['spearman']:.2f} over all heads")
        print(f"  {'rank':>4}  {'head':>6} {'‖y‖':>7}    {'head':>6} {'effect':>8}")
        for i, ((l1, h1), (l2, h2)) in enumerate(zip(r["top_by_norm"], r["top_by_patching"])):
            print(f"  {i + 1:>4}  {l1:>3}.{h1:<2} {r['feature_norms'][l1][h1]:7.3f}    "
                  f"{l2:>3}.{h2:<2} {r['patching'][l2][h2]:+8.3f}")
        if "classifier" in r:
            c = r["classifier"]
            print(f"  classifying the name from x̂ at its token ({c['test_names'][0]} vs {c['test_names'][1]} test "
                  f"names; the mean difference is built from {c['train_examples']} per class):")
            print(f"  {'head':>6}  {'AUC ObProp':>10}  {'AUC mean-diff':>13}")
            for x in c["heads"]:
                print(f"  {x['head'][0]:>3}.{x['head'][1]:<2}  {x['auc_obprop']:10.3f}  "
                      f"{x['auc_mean_difference']:13.3f}")
            if any(x["auc_obprop"] < 0.5 for x in c["heads"]):
                print("  (an ObProp AUC below 0.5: the head reads the name with the opposite sign, i.e. pushes the "
                      "observable the other way)")
        words = r["reference"]["text"][0]
        for path, y in r["paths"].items():
            where = "; ".join(f"{step_name(s)} reads token {s['reads']} {words[s['reads']]!r}" for s in y["steps"])
            print(f"  path {path}: ‖y‖ = {y['norm']:.4f}   ({where})")
    for c in couplings:
        print(f"\ncoupling {c['source']} -> {c['target']} at the top heads (observables' cosine "
              f"{c['observables_cosine']:.3f}; slopes over {c['tokens']} tokens)")
        print(f"  {'head':>6}  {'predicted':>9}  {'slope':>7}  {'r²':>5}  {'cosine':>6}")
        for x in c["heads"]:
            print(f"  {x['head'][0]:>3}.{x['head'][1]:<2}  {x['predicted']:9.3f}  {x['slope']:7.3f}  {x['r2']:5.3f}  "
                  f"{x['cosine']:6.3f}")


def step_name(step):
    return f"attn {step['layer']}.{step['head']}" if step["kind"] == "attn" else f"mlp {step['layer']}"


# ------------------------------------------------------------------------- the HTML report
def heatmap(values, title):
    """An [L, H] grid of cells: red for positive, blue for negative, opacity ∝ |value|; hover shows the value."""
    peak = max(abs(v) for row in values for v in row) or 1.0

    def cell(l, h, v):
        color = "200,40,40" if v >= 0 else "40,80,200"
        return f'<td title="{l}.{h}: {v:.4g}" style="background:rgba({color},{abs(v) / peak:.2f})"></td>'
    rows = "".join(f"<tr><th>{l}</th>{''.join(cell(l, h, v) for h, v in enumerate(row))}</tr>"
                   for l, row in enumerate(values))
    heads = "".join(f"<th>{h}</th>" for h in range(len(values[0])))
    return f"<div class=map><h4>{html.escape(title)}</h4><table><tr><th></th>{heads}</tr>{rows}</table></div>"


def table(header, rows):
    """An HTML table; numbers are shown with 3 decimals, every string is escaped."""
    def cells(row, tag):
        return "".join(f"<{tag}>{html.escape(c if isinstance(c, str) else f'{c:.3f}')}</{tag}>" for c in row)
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table class=t><tr>{cells(header, 'th')}</tr>{body}</table>"


def report_html(model_name, results, couplings):
    e, parts = html.escape, [f"<h1>Observable propagation on {html.escape(model_name)}</h1>"]
    for r in results:
        a = r["agreement"]
        parts += [f"<h2>{e(r['observable'])}</h2><p>Heads ranked by feature norm (from the weights, no data) and by"
                  f" path patching over {r['pairs']} pair(s): top-{len(r['top_by_norm'])} overlap"
                  f" {a['top_k_overlap']:.0%}, Spearman {a['spearman']:.3f} over all heads.</p>",
                  table(["rank", "head by ‖y‖", "‖y‖", "head by patching", "effect"],
                        [[str(i + 1), f"{l1}.{h1}", r["feature_norms"][l1][h1], f"{l2}.{h2}", r["patching"][l2][h2]]
                         for i, ((l1, h1), (l2, h2)) in enumerate(zip(r["top_by_norm"], r["top_by_patching"]))]),
                  heatmap(r["feature_norms"], "feature norm ‖y‖ (layer × head)"),
                  heatmap(r["patching"], "path-patching effect (layer × head)")]
        if "classifier" in r:
            c = r["classifier"]
            parts += [f"<p>Classifying the name from x̂ at its token: the head's ObProp feature (no training data) vs"
                      f" the mean difference of {c['train_examples']} names per class; AUC on {c['test_names'][0]} +"
                      f" {c['test_names'][1]} held-out names (below 0.5: the head pushes the other way).</p>",
                      table(["head", "AUC ObProp", "AUC mean difference"],
                            [[f"{x['head'][0]}.{x['head'][1]}", x["auc_obprop"], x["auc_mean_difference"]]
                             for x in c["heads"]])]
        if r["paths"]:
            parts.append(table(["path", "‖y‖"], [[p, y["norm"]] for p, y in r["paths"].items()]))
    for c in couplings:
        parts += [f"<h2>Coupling {e(c['source'])} → {e(c['target'])}</h2><p>Predicted C(y1, y2) = y1·y2/‖y1‖² vs the"
                  f" least-squares slope of the y2-scores on the y1-scores over {c['tokens']} corpus tokens. Cosine of"
                  f" the two observables at the final residual: {c['observables_cosine']:.3f}.</p>",
                  table(["head", "predicted", "empirical slope", "r²", "cosine"],
                        [[f"{x['head'][0]}.{x['head'][1]}", x["predicted"], x["slope"], x["r2"], x["cosine"]]
                         for x in c["heads"]])]
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table.t{border-collapse:collapse;margin:.5em 0}"
             "table.t td,table.t th{border:1px solid #ccc;padding:.2em .6em;text-align:right}.map{display:inline-block;"
             "margin-right:2em;vertical-align:top}.map table{border-collapse:collapse;font-size:9px}.map td{width:14px;"
             "height:10px;border:1px solid #eee}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>ObProp</title><style>{style}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def run(args):
    t0 = time.time()

    def say(message):   # progress, with the time since the start
        print(f"[{time.time() - t0:6.1f}s] {message}", flush=True)
    for flag in ("pairs", "top", "corpus_tokens", "ctx", "train_examples"):
        if getattr(args, flag) < 1:
            raise MinisvError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    say(f"loading {args.model}")
    model = minisv.load(args.model, device=args.device)
    if args.top > model.cfg.n_layers * model.cfg.n_heads:
        raise MinisvError(f"--top {args.top} is more than the model's {model.cfg.n_layers * model.cfg.n_heads} heads")
    for path in args.path or []:
        ob.parse_path(model, path)          # a bad path fails before the slow part
    tasks = build_tasks(model, args)
    results, head_feats = zip(*(analyse(model, task, args, say) for task in tasks))
    couplings = couple(model, tasks, results, head_feats, args, say) if len(tasks) > 1 else []
    print_results(results, couplings, args)
    write_text(args.html, report_html(args.model, results, couplings))
    if args.json:
        write_text(args.json, json.dumps(dict(model=args.model, settings=vars(args), observables=results,
                                                couplings=couplings, seconds=round(time.time() - t0, 1)), indent=1))
    say(f"done: report {args.html}" + (f", results {args.json}" if args.json else ""))
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except MinisvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
