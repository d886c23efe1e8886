"""Observable propagation (arXiv 2312.16291; docs/methods.md §3): the feature vectors behind a task, from the weights.

An *observable* is a linear functional on the logits, n·ℓ (e.g. ℓ[' she'] − ℓ[' he']). Along one computational
path from an activation x to the logits, the model is linear or close to it, so the path's contribution to n·ℓ
is ≈ y·x for one vector y, the path's *feature vector*. It is found by pulling n backwards along the path:

    unembedding  y ← W_Uᵀ n                                 the final residual is read through ln_final
    norm         x̂ = s·Px,  s = 1/√(mean((Px)²) + ε)        P removes the mean (LayerNorm) or is I (RMSNorm)
                 the sublayer reads γ⊙x̂ + β, so x̂'s feature is u = P(γ⊙y) (x̂ has zero mean under LayerNorm:
                 y's mean scores nothing and is dropped), and x's feature is
                 s·u               with the scale frozen: the paper's √d/‖x‖·γ⊙y approximation
                 s·(u − x̃(x̃·u))   the exact Jacobian, x̃ = x̂/√d the unit radial direction: it removes u's
                                   radial part, which the frozen-scale approximation keeps (the two have cosine
                                   ≥ 0.999 on SmolLM2, 0.998 in the paper)
    head h       y ← W_Vᵀ W_Oᵀ y = W_OVᵀ y                   the attention pattern scales the score, not the
                                                             direction; rotary does not touch V or O
    MLP          y ← ∇_z y·MLP(z)                           linearized at a point between a positive and a
                                                             negative example (see `mlp_feature`)

A path is written from the logits backwards, "attn 13.11 <- mlp 12 <- attn 9.1": head 13.11 reads MLP 12, which
reads head 9.1. Its feature vector lives where the path starts: in the normalized input x̂ (`hook_normalized`,
before the gain) of its earliest component, ln1's for a head and ln2's for an MLP. There every input has norm
√d whatever the layer, so feature norms of different components compare directly, with no data at all.

Every component acts at its own token (`locate`): the path's first component writes at the last token, where
the observable is read; a head reads its upstream components at a source token, "attn 13.11@name" (a template
slot), "@4" or "@-3" (positions), by default the token it attends to most at the reference prompts; an MLP
reads and writes at one token. Norm scales and MLP linearizations come from a `Reference` (a positive and a
negative prompt) at those tokens; without one s = 1, which rescales every path through the same norms alike
(the ranking of single heads by ‖y‖ is then data-free).

The method makes predictions, and the rest of this file checks them: `patch_heads` (feature-norm ranking vs
direct-path patching), `patch_heads_total` (vs total-effect activation patching), `feature_scores` +
`fit_slope` (predicted coupling vs the empirical slope on a corpus), and `auc`. That the propagated vectors
equal frozen autograd at the right tokens is tested against an independent implementation on transformers'
models (tests/test_obprop.py).
"""
import re
from dataclasses import dataclass, field

import torch

from .errors import MinisvError
from .pullbacks import centered, ov, through_gain, through_scale, unembed_read
from .progress import progress

# The paper's templates (3 per observable); `template_prompts` fills [NAME] with female (positive) and male names.
SUBJECT_TEMPLATES = ["So, [NAME] really is a great friend, isn't", "Man, [NAME] is so funny, isn't",
                     "Really, [NAME] always works so hard, doesn't"]
OBJECT_TEMPLATES = ["What do I think about [NAME]? Well, to be honest, I love",
                    "When it comes to [NAME], I gotta say, I really hate",
                    "This is a present for [NAME]. Tomorrow, I'm gonna give it to"]
OCCUPATION_TEMPLATES = ["My friend [NAME] is an excellent", "Recently, [NAME] has been recognized as a great",
                        "His cousin [NAME] works hard at being a great"]
# Well-known US politicians (the reference's YouGov lists, 20 per party): "NAME is a" -> ' Democrat' / ' Republican'.
DEMOCRATS = ["Barack Obama", "Joe Biden", "Bernie Sanders", "Bill Clinton", "Hillary Clinton", "Kamala Harris",
             "Jimmy Carter", "Al Gore", "Nancy Pelosi", "Elizabeth Warren", "John Kerry", "Andrew Cuomo",
             "Chuck Schumer", "Pete Buttigieg", "Gavin Newsom", "Cory Booker", "Amy Klobuchar", "Al Franken",
             "Ilhan Omar", "Adam Schiff"]
REPUBLICANS = ["George W. Bush", "Mike Pence", "Donald Trump", "Mitt Romney", "Ted Cruz", "Mitch McConnell",
               "Ron DeSantis", "Dick Cheney", "Chris Christie", "Sarah Palin", "Jeb Bush", "Bob Dole", "Marco Rubio",
               "Rand Paul", "Paul Ryan", "Mike Huckabee", "Ben Carson", "Lindsey Graham", "Newt Gingrich",
               "Nikki Haley"]
# C vs Python: the same condition after a C or a Python header; C continues with ' {', Python with ':'.
CONDITIONS = ["x > 0", "n == 1", "i < count", "count != 0", "a >= b", "flag", "x == y", "size > 10", "value < limit",
              "total == 0", "index >= 0", "n % 2 == 0", "left < right", "done", "err != 0", "depth > max_depth",
              "k == n", "score >= best", "len == 0", "x < 0"]
C_PROMPTS = [f"#include <stdio.h>\n\nint main(void) {{\n    int x = 3;\n    if ({c})" for c in CONDITIONS]
PYTHON_PROMPTS = [f"import sys\n\n\ndef main():\n    x = 3\n    if ({c})" for c in CONDITIONS]
# A study: observables, each with its templates (filled with the two name classes) or its positive and negative
# prompts. The first observable is the one every other is coupled with.
STUDIES = {
    "pronouns": [("' she' - ' he'", SUBJECT_TEMPLATES), ("' her' - ' him'", OBJECT_TEMPLATES)],
    "occupations": [("' nurse' + ' teacher' + ' secretary' - ' programmer' - ' doctor' - ' engineer'",
                     OCCUPATION_TEMPLATES), ("' she' - ' he'", SUBJECT_TEMPLATES)],
    "party": [("' Democrat' - ' Republican'", [f"{n} is a" for n in DEMOCRATS], [f"{n} is a" for n in REPUBLICANS])],
    "language": [("' {' - ':'", C_PROMPTS, PYTHON_PROMPTS)],
}
# Common US first names; `template_prompts` keeps those that are one token (with a leading space) for the model.
FEMALE_NAMES = """Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty Sandra
Margaret Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Stephanie Dorothy Rebecca Sharon Laura
Cynthia Amy Kathleen Angela Shirley Brenda Emma Anna Pamela Nicole Samantha Katherine Christine Helen Debra Rachel
Carolyn Janet Maria Catherine Heather Diane Olivia Julie Joyce Victoria Ruth Virginia Lauren Kelly Christina Joan
Evelyn Judith Andrea Hannah Megan Cheryl Jacqueline Martha Madison Teresa Gloria Sara Janice Ann Kathryn Abigail
Sophia Frances Jean Alice Judy Isabella Julia Grace Amber Denise Danielle Marilyn Beverly Charlotte Natalie Theresa
Diana Brittany Doris Kayla Alexis Lori Marie Jane Lucy Rose Claire Sophie Chloe Ella Mia Ava Lily Zoe Leah Molly
Jenny Ellen Fiona Irene Eva Nora Susie Kate Sally Wendy Tina Paula Monica Vanessa Erica Tiffany Holly Kim""".split()
MALE_NAMES = """James Robert John Michael David William Richard Joseph Thomas Christopher Charles Daniel Matthew
Anthony Mark Donald Steven Andrew Paul Joshua Kenneth Kevin Brian George Timothy Ronald Jason Edward Jeffrey Ryan
Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon Benjamin Samuel Gregory Alexander Patrick Frank
Raymond Jack Dennis Jerry Tyler Aaron Jose Adam Nathan Henry Zachary Douglas Peter Kyle Noah Ethan Jeremy Walter
Christian Keith Roger Terry Austin Sean Gerald Carl Harold Dylan Arthur Lawrence Jordan Jesse Bryan Billy Bruce
Gabriel Joe Logan Alan Juan Albert Willie Elijah Wayne Randy Vincent Mason Roy Ralph Bobby Russell Bradley Philip
Eugene Louis Harry Howard Fred Martin Luke Oliver Leo Max Tom Tim Jim Bob Bill Mike Dave Steve Tony Sam Ben Dan
Chris Matt Nick Jake Alex Victor Ian Neil Simon Hugo Oscar Felix Owen Evan Connor Luis Carlos Marcus Craig""".split()


# ------------------------------------------------------------------------- observables
@dataclass
class Observable:
    """n·ℓ with n = Σ weights[i]·e[ids[i]]. ids: LongTensor [k]; weights: float [k]; warnings: what was assumed."""
    name: str
    ids: torch.Tensor
    weights: torch.Tensor
    warnings: list = field(default_factory=list)

    def value(self, logits):
        """logits [..., V] -> n·ℓ [...]."""
        return logits[..., self.ids].float() @ self.weights.to(logits.device)


_TERM = re.compile(r"""\s*([+-])?\s*(?:((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?('[^']*'|"[^"]*")\s*""")


def observable(model, spec, first_token=False) -> Observable:
    """An observable from "' she' - ' he'" (quoted tokens joined by + and -, optional weights: "2*' she'",
    "1e-1*' he'"), or a dict {token string or id: weight}. Every string must be exactly one token of this model;
    with first_token, a string that splits stands for its first token (the reference's take_first_token), and
    `warnings` says so."""
    if isinstance(spec, str):
        terms, pos = {}, 0
        while pos < len(spec):
            m = _TERM.match(spec, pos)
            if not m or (pos > 0 and not m[1]):
                raise MinisvError(f"cannot read observable {spec!r} at {spec[pos:]!r}: write quoted tokens joined "
                                  f"by + and -, like \"' she' - ' he'\" or \"2*' nurse' - ' doctor'\"")
            word = m[3][1:-1]
            terms[word] = terms.get(word, 0.0) + (-1 if m[1] == "-" else 1) * float(m[2] or 1)
            pos = m.end()
        name = spec.strip()
    elif isinstance(spec, dict):
        terms, name = dict(spec), " ".join(f"{w:+g}*{t!r}" for t, w in spec.items())
    else:
        raise MinisvError(f"an observable is a string like \"' she' - ' he'\" or a dict {{token: weight}}, "
                          f"not {type(spec).__name__}")
    warnings = []
    ids = [_single_token(model, t, warnings if first_token else None) for t in terms]
    if not ids or all(w == 0 for w in terms.values()):
        raise MinisvError(f"observable {name!r} is zero; give at least one token with a nonzero weight")
    if len(set(ids)) < len(ids):
        raise MinisvError(f"observable {name!r} names the same token twice; merge the terms into one weight")
    return Observable(name, torch.tensor(ids), torch.tensor(list(terms.values()), dtype=torch.float32), warnings)


def _single_token(model, token, warnings=None):
    """The id of a one-token string (or an id); with a warnings list, a longer string gives its first token."""
    if isinstance(token, int):
        if not 0 <= token < model.cfg.vocab_size:
            raise MinisvError(f"token id {token} is outside the vocabulary [0, {model.cfg.vocab_size})")
        return token
    if model.tokenizer is None:
        raise MinisvError(f"this model has no tokenizer, so {token!r} cannot be looked up; give token ids, "
                          f"like {{5: 1, 7: -1}}")
    ids = model.tokenizer.encode(token)
    if len(ids) > 1 and isinstance(warnings, list):
        warnings.append(f"{token!r} is {len(ids)} tokens for this model; using its first, "
                        f"{model.tokenizer.token_str(ids[0])!r}")
        return ids[0]
    if len(ids) != 1:
        pieces = [model.tokenizer.token_str(i) for i in ids]
        raise MinisvError(f"{token!r} is not one token for this model (it tokenizes as {pieces}); use single-token "
                          f"words, usually with a leading space like ' she'")
    return ids[0]


# ------------------------------------------------------------------------- paths, positions and reference points
_COMPONENT = re.compile(r"\s*(attn|mlp)\s+(\d+)(?:\.(\d+))?\s*(?:@\s*(-?\d+|\[?[A-Za-z_]\w*\]?))?\s*")


def parse_path(model, path):
    """"attn 13.11@name <- mlp 12 <- attn 9.1@3" (or a list of ("attn", 13, 11, "name") / ("mlp", 12, None)) ->
    a list of (kind, layer, head, source), from the component next to the logits back to the path's start.
    A head's source is the token it reads its upstream components from: None (the default, resolved by
    `locate` at a reference prompt), a position (negative counts from the end) or a template slot name
    ("name" or "[NAME]"). An MLP acts where its reader reads, so it takes no source. Each component must come
    before the one it feeds (heads and MLPs of one parallel-block layer cannot feed each other)."""
    parts = re.split(r"<-|←", path) if isinstance(path, str) else list(path)
    out = []
    for part in parts:
        if isinstance(part, str):
            m = _COMPONENT.fullmatch(part)
            if not m:
                raise MinisvError(f"cannot read path component {part.strip()!r}: write 'attn LAYER.HEAD' (optionally "
                                  f"@TOKEN, a position or a template slot like @name) or 'mlp LAYER', joined by '<-' "
                                  f"from the logits back, like 'attn 13.11@name <- mlp 12'")
            source = m[4] if m[4] is None or not re.fullmatch(r"-?\d+", m[4]) else int(m[4])
            part = (m[1], int(m[2]), None if m[3] is None else int(m[3]), source)
        out.append(_check_component(model, path, part))
    if not out:
        raise MinisvError("empty path; give at least one component, like 'attn 13.11'")
    order = [(l, 1 if k == "mlp" and not model.cfg.parallel else 0) for k, l, _, _ in out]
    if any(a <= b for a, b in zip(order, order[1:])):
        raise MinisvError(f"path {path!r} is out of order: each component must come before the one it feeds "
                          f"(write from the logits back, later layers first)")
    return out


def _check_component(model, path, part):
    """One path component as (kind, layer, head, source), or a MinisvError saying what is wrong with it."""
    H = model.cfg.n_heads
    usage = f"write ('attn', LAYER, HEAD) with a head in 0..{H - 1}, or ('mlp', LAYER)"
    if not isinstance(part, (tuple, list)) or len(part) not in (2, 3, 4):
        raise MinisvError(f"cannot read path component {part!r}: {usage}")
    kind, layer, head, source = (*part, None, None)[:4]

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)
    if kind not in ("attn", "mlp") or not is_int(layer) or (kind == "mlp") != (head is None) \
            or (kind == "attn" and not (is_int(head) and 0 <= head < H)):
        raise MinisvError(f"path component {tuple(part)} needs 'attn LAYER.HEAD' with a head in 0..{H - 1}, "
                          f"or 'mlp LAYER' without a head")
    model.check_layer(layer, f"layer in path {path!r}:")
    if source is not None and (kind == "mlp" or not (is_int(source) or isinstance(source, str))):
        raise MinisvError(f"path component {tuple(part)}: only a head takes a source token (@position or @slot); an "
                          f"MLP acts at the token its reader reads")
    return kind, layer, head, source


def _norm_input(model, kind, layer):
    """The hook holding the residual stream the norm in front of a component reads."""
    if kind == "attn":
        return f"blocks.{layer}.hook_resid_pre"
    return f"blocks.{layer}.hook_resid_{'pre' if model.cfg.parallel else 'mid'}"


@dataclass
class Reference:
    """One or two reference prompts (a positive and a negative example) and their activations at every token,
    where norm scales are evaluated, MLPs linearized and a head's default source token chosen.
    prompts: token-id lists; acts: per prompt {hook name: [T, D]} (every norm's input and output x̂);
    patterns: [L, H, T, T] attention weights, averaged over the prompts when they line up (else the first's);
    slots: {slot name: position} of template slots like [NAME], shared by the prompts."""
    prompts: list
    acts: list
    patterns: torch.Tensor
    slots: dict

    @property
    def length(self):
        return len(self.prompts[0])

    def at(self, name, t):
        """The activation `name` at position t (of the first prompt) in every prompt: [P, D]. Prompts of different
        lengths line up only at their last token."""
        lengths = [len(p) for p in self.prompts]
        if t != lengths[0] - 1 and len(set(lengths)) > 1:
            raise MinisvError(f"the reference prompts have {lengths} tokens: only their last tokens line up, so a "
                              f"path cannot use token {t}; give prompts of equal length (a template does that)")
        return torch.stack([a[name][t - lengths[0] + len(p)] for a, p in zip(self.acts, self.prompts)])

    def mid(self, name, t=-1):
        return self.at(name, t % self.length).mean(0)


def reference(model, pos, neg=None, slots=None) -> Reference:
    """A Reference from token ids (lists or [T] tensors) and optional {slot name: position}. With one prompt,
    every rule is evaluated exactly there."""
    L, mid = model.cfg.n_layers, "pre" if model.cfg.parallel else "mid"     # ln2 reads resid_mid, or resid_pre
    names = [f"blocks.{L - 1}.hook_resid_post"] + [f"blocks.{l}.{n}" for l in range(L) for n in (
        "hook_resid_pre", f"hook_resid_{mid}", "ln1.hook_normalized", "ln2.hook_normalized", "attn.hook_pattern")]
    prompts = [torch.as_tensor(p).tolist() for p in (pos, neg) if p is not None]
    if any(len(p) == 0 for p in prompts):
        raise MinisvError("a reference prompt is empty; give at least one token")
    device, acts = model.embed.weight.device, []
    with torch.no_grad():
        for p in prompts:
            _, cache = model.run_with_cache(torch.tensor(p, device=device), names=names)
            acts.append({n: x[0].float() for n, x in cache.items()})
    grids = [torch.stack([a.pop(f"blocks.{l}.attn.hook_pattern") for l in range(L)]) for a in acts]   # [L, H, T, T]
    patterns = torch.stack(grids).mean(0) if len({len(p) for p in prompts}) == 1 else grids[0]
    return Reference(prompts, acts, patterns, {k.strip("[]").lower(): v for k, v in (slots or {}).items()})


def locate(model, path, ref=None):
    """Where each component of a path acts: a list of dicts {kind, layer, head, writes, reads}, from the logits
    back. The path's first component writes at the last token (where the observable is read); a head writes at
    its query token and reads at its source token, where the next component writes; an MLP reads and writes at
    one token. A head's source is the one given in the path, or by default the token it attends to most at the
    reference prompts (the reference code's rule). Without a reference, positions are None."""
    steps, t = [], None if ref is None else ref.length - 1
    for kind, layer, head, source in parse_path(model, path):
        reads = t
        if kind == "attn" and ref is not None:
            reads = _source(ref, layer, head, t, source)
        elif kind == "attn" and source is not None:
            raise MinisvError(f"attn {layer}.{head}@{source}: a source token needs reference prompts to point into")
        steps.append(dict(kind=kind, layer=layer, head=head, writes=t, reads=reads))
        t = reads
    return steps


def _source(ref, layer, head, t, source):
    """The source position a head reads at from query position t (see `locate`)."""
    if source is None:
        return int(ref.patterns[layer, head, t, :t + 1].argmax())
    if isinstance(source, str):
        key = source.strip("[]").lower()
        if key not in ref.slots:
            raise MinisvError(f"attn {layer}.{head}@{source}: no template slot {source!r} in the reference prompts "
                              f"(slots: {sorted(ref.slots) or 'none; use a --template with [NAME]'})")
        source = ref.slots[key]
    s = source + ref.length if source < 0 else source
    if not 0 <= s <= t:
        raise MinisvError(f"attn {layer}.{head}@{source}: a head at token {t} can only read tokens 0..{t} of the "
                          f"{ref.length}-token reference prompt")
    return s


@torch.no_grad()
def last_token_acts(model, prompts, names, at=None):
    """Run prompts (token-id lists, ragged ones are left-padded) in one batch and return {name: [B, ...]}, each
    activation taken at the last token, or at position at[b] of prompt b (a list of ints, before padding)."""
    rows = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    width, device = max(len(r) for r in rows), model.embed.weight.device
    pad = torch.tensor([width - len(r) for r in rows], device=device)
    tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = (torch.arange(width, device=device) >= pad[:, None]).long() if pad.any() else None
    where = pad + torch.tensor(at, device=device) if at is not None else torch.full_like(pad, width - 1)
    out = {}

    def keep(x, name):
        out[name] = x[torch.arange(len(rows), device=device), where]
    with model.hooks({n: keep for n in names}):
        model(tokens, attention_mask=mask, stop_at_layer=_last_layer_needed(model, names))
    return out


def _last_layer_needed(model, names):
    """stop_at_layer for a forward that only has to reach these hooks (None: it needs the final norm too)."""
    blocks = all(n.startswith("blocks.") for n in names)
    return max(int(n.split(".")[1]) for n in names) + 1 if blocks else None


# ------------------------------------------------------------------------- propagation rules
def _to_residual(model, input_hook, u, ref, exact, t=-1):
    """Feature of a norm's x̂ -> feature of the norm's input (the residual stream at `input_hook`) at position t of
    the reference; without one the scale is 1. u: [D]"""
    if ref is None:
        if exact:
            raise MinisvError("the exact norm Jacobian needs a reference point: pass ref=reference(model, tokens)")
        return u
    return through_scale(model, u, ref.mid(input_hook, t), exact)


def logit_feature(model, obs, ref=None, exact=False):
    """The observable pulled back to the final residual stream (the input of ln_final) at the last token: [D]."""
    u = through_gain(model, model.ln_final, unembed_read(model, obs.ids, obs.weights))
    return _to_residual(model, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", u, ref, exact)


def head_features(model, layer, y):
    """W_OVᵀ y for every head of `layer`, as features of ln1's x̂: [H, D]. y: [D], a feature of the attention
    output (see `minisv.pullbacks.ov`, which also handles grouped-query attention)."""
    return through_gain(model, model.blocks[layer].ln1, ov(model, layer, y.float()))


def mlp_feature(model, layer, y, ref, t=-1, return_t=False):
    """∇ y·MLP as a feature of ln2's x̂ at position t of the reference: [D]. The MLP is linearized at
    x̂(τ) = x̂_neg + τ(x̂_pos − x̂_neg), the point on the segment between the reference's two examples where y·MLP is
    halfway between its values at the ends (the decision boundary between them; the reference code finds τ for a
    level with an optimizer, we bisect). With one reference prompt that point is the prompt's own x̂."""
    if ref is None:
        raise MinisvError(f"MLP {layer} is linearized at a point between two examples: pass "
                          f"ref=reference(model, pos_tokens, neg_tokens)")
    block, name = model.blocks[layer], f"blocks.{layer}.ln2.hook_normalized"
    points = ref.at(name, t % ref.length)
    a, b = points[0], points[-1]
    dtype = block.mlp.proj.weight.dtype

    def f(xhat):    # y·MLP(γ⊙x̂ + β)
        z = xhat * block.ln2.weight.float() + (block.ln2.bias.float() if block.ln2.bias is not None else 0)
        return model.apply_mlp(layer, z.to(dtype)).float() @ y

    with torch.no_grad():   # f(b + τ(a−b)) is continuous, and the level lies between its values at τ = 0, 1:
        lo, hi = 0.0, 1.0       # narrow [lo, hi] around a crossing, 32 sub-intervals at a time (to 32⁻⁴ ≈ 1e-6)
        for step in range(4):
            taus = torch.linspace(lo, hi, 33, device=a.device)
            values = f(b + taus[:, None] * (a - b))                                            # [33]
            if step == 0:
                level, rising = (values[0] + values[-1]) / 2, values[-1] >= values[0]
            below = (values < level) == rising
            i = 32 if below.all() else int(below.long().argmin())              # the first τ past the level
            lo, hi = float(taus[max(i - 1, 0)]), float(taus[i])
    tau = (lo + hi) / 2
    point = (b + tau * (a - b)).requires_grad_(True)
    with torch.enable_grad():
        grad = torch.autograd.grad(f(point), point)[0]
    u = centered(model, grad)
    return (u, tau) if return_t else u


def feature_vector(model, obs, path, ref=None, exact=False, trace=False):
    """The feature vector [D] of a path (see `parse_path`) for an observable, in the x̂ of the path's start at the
    token it reads (see `locate`). Each rule is evaluated at its own token: the final norm at the last token, a
    head's OV circuit anywhere (it is the same matrix at every token; the attention weight scales the path's
    score, not its direction, and is left out as for single heads), an MLP linearized and a norm scale taken at
    the token where the component acts. ref: the reference prompts (needed for MLPs and for exact=True;
    without it s = 1). exact: exact norm Jacobians instead of frozen scales. trace: also return `locate`'s
    steps, with each MLP's linearization point τ added."""
    steps = locate(model, path, ref)
    y = logit_feature(model, obs, ref, exact)
    for i, step in enumerate(steps):
        kind, layer = step["kind"], step["layer"]
        if kind == "attn":
            u = head_features(model, layer, y)[step["head"]]
        else:
            u, step["tau"] = mlp_feature(model, layer, y, ref, step["reads"], return_t=True)
        if i < len(steps) - 1:
            y = _to_residual(model, _norm_input(model, kind, layer), u, ref, exact, step["reads"])
    return (u, steps) if trace else u


def single_features(model, obs, ref=None, exact=False):
    """Features of every single-component path: {"attn": [L, H, D], "mlp": [L, D]} ("mlp" is None without ref)."""
    y = logit_feature(model, obs, ref, exact)
    L = model.cfg.n_layers
    with torch.no_grad():
        heads = torch.stack([head_features(model, l, y) for l in range(L)])
    mlps = torch.stack([mlp_feature(model, l, y, ref) for l in range(L)]) if ref is not None else None
    return {"attn": heads, "mlp": mlps}


def search_paths(model, obs, ref, steps, width, exact=False):
    """Greedy path search with positions (the reference's patch_get_max_paths, scored by feature·activation
    instead of by patching). From the observable at the last token, every path in the beam is extended backwards
    by every earlier component: a head at each source token s it can read, or an MLP at the path's token. A
    path's score is its contribution to n·ℓ(pos) − n·ℓ(neg), y·(x̂_pos − x̂_neg) at its start, times the attention
    weight of every head on it (y·x̂_pos with one reference prompt, or prompts of different lengths). The `width`
    paths of largest |score| are kept at each of `steps` lengths. Returns one list per length of {path, score,
    parent}: path is written with every source (@position) so that feature_vector reproduces it, parent is the
    index of the path it extends in the previous list."""
    L, H, T = model.cfg.n_layers, model.cfg.n_heads, ref.length
    pair = len(ref.prompts) == 2 and len(ref.prompts[1]) == T

    def activation(name):       # [T, D]: x̂_pos − x̂_neg, or x̂_pos
        return ref.acts[0][name] - ref.acts[1][name] if pair else ref.acts[0][name]
    beam = [dict(path="", y=logit_feature(model, obs, ref, exact), reads=T - 1, bound=(L, 0), weight=1.0, parent=None)]
    levels = []
    for _ in progress(range(steps), "path search", unit=" steps"):
        candidates = []
        for i, p in enumerate(beam):
            r = p["reads"]
            for l in range(L):
                if (l, 0) < p["bound"]:     # every head of layer l, at every source token s <= r
                    u = head_features(model, l, p["y"])                                             # [H, D]
                    a = ref.patterns[l, :, r, :r + 1]                                               # [H, r+1]
                    score = p["weight"] * a * (u @ activation(f"blocks.{l}.ln1.hook_normalized")[:r + 1].T)
                    candidates += [(float(score[h, s]), i, "attn", l, h, s, u[h], float(a[h, s]))
                                   for h in range(H) for s in range(r + 1)]
                if (l, 0 if model.cfg.parallel else 1) < p["bound"]:
                    u = mlp_feature(model, l, p["y"], ref, r)
                    score = p["weight"] * float(u @ activation(f"blocks.{l}.ln2.hook_normalized")[r])
                    candidates.append((score, i, "mlp", l, None, r, u, 1.0))
        candidates.sort(key=lambda c: -abs(c[0]))
        level = []
        for score, i, kind, l, h, s, u, a in candidates[:width]:
            parent = beam[i]
            name = f"attn {l}.{h}@{s}" if kind == "attn" else f"mlp {l}"
            level.append(dict(path=f"{parent['path']} <- {name}" if parent["path"] else name, score=score, parent=i,
                              y=_to_residual(model, _norm_input(model, kind, l), u, ref, exact, s), reads=s,
                              bound=(l, 0 if kind == "attn" or model.cfg.parallel else 1),
                              weight=parent["weight"] * a))
        levels.append([dict(path=p["path"], score=p["score"], parent=p["parent"]) for p in level])
        beam = level
    return levels


def head_name(head):
    """(13, 11) -> "13.11"."""
    return f"{head[0]}.{head[1]}"


def step_name(step):
    """A `locate` step as written in a path: "attn 13.11" or "mlp 12"."""
    return f"attn {step['layer']}.{step['head']}" if step["kind"] == "attn" else f"mlp {step['layer']}"


def format_search(levels):
    """`search_paths`' result as indented lines, each path under the path it extends."""
    lines = []

    def walk(depth, parent):
        for i, p in enumerate(levels[depth]):
            if p["parent"] == parent:
                lines.append(f"{'  ' * depth}{p['score']:+8.3f}  {p['path']}")
                if depth + 1 < len(levels):
                    walk(depth + 1, i)
    walk(0, 0)
    return lines


def coupling(y1, y2):
    """C(y1, y2) = y1·y2 / ‖y1‖²: the expected y2-score of an input scoring 1 on y1 (inputs uniform on a sphere).
    Asymmetric and scale-aware, unlike the cosine."""
    return float(y1 @ y2 / (y1 @ y1))


def cosine(y1, y2):
    return float(y1 @ y2 / (y1.norm() * y2.norm()))


# ------------------------------------------------------------------------- validation
@torch.no_grad()
def patch_heads(model, obs, pos_prompts, neg_prompts):
    """Path patching of every head's direct path to the logits, mean over prompt pairs: [L, H]. For pair b, head
    (l, h)'s output at the last token of the positive prompt is replaced by its output on the negative prompt,
    and only ln_final and the unembedding see the change (the path whose feature norm ObProp predicts):
        effect = n·ℓ(pos) − n·ℓ(resid_pos − out_pos^{l,h} + out_neg^{l,h}).
    Two batched forwards in all; the prompts of a pair may differ in length."""
    cfg, L = model.cfg, model.cfg.n_layers
    if len(pos_prompts) != len(neg_prompts) or not pos_prompts:
        raise MinisvError(f"patching needs pairs: got {len(pos_prompts)} positive and {len(neg_prompts)} negative "
                          f"prompts")
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    runs = [last_token_acts(model, prompts, names) for prompts in (pos_prompts, neg_prompts)]
    # each head's share of the attention output at the last token: out[b, l, h] = W_O^h z^h, [B, L, H, D]
    W_O = torch.stack([model.blocks[l].attn.o.weight.view(-1, cfg.n_heads, cfg.d_head) for l in range(L)])
    out_pos, out_neg = (torch.einsum("blhe,ldhe->blhd", torch.stack([r[n] for n in names[:-1]], 1), W_O) for r in runs)
    resid = runs[0][names[-1]]
    patched = resid[:, None, None] - out_pos + out_neg
    w = unembed_read(model, obs.ids, obs.weights)                                                       # W_Uᵀ n

    def value(x):    # n·ℓ = (W_Uᵀ n)·ln_final(x), without the full [.., V] logits
        return model.apply_norm("ln_final", x).float() @ w
    return (value(resid)[:, None, None] - value(patched)).mean(0)


@torch.no_grad()
def patch_heads_total(model, obs, pos_prompts, neg_prompts):
    """Total-effect activation patching of every head, mean over prompt pairs: [L, H]. For pair b, head (l, h)'s
    output at *every* position of the positive prompt is replaced by its output on the negative prompt, and all
    later layers recompute (so the effect includes every path through the head, not only its direct one):
        effect = n·ℓ(pos) − n·ℓ(pos with z^{l,h} ← z^{l,h}_neg).
    The two prompts of a pair must have the same length (token positions are patched one to one). One forward
    per layer, from that layer on, over a batch of H copies of the pairs (copy h patches head h)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if len(pos_prompts) != len(neg_prompts) or not pos_prompts:
        raise MinisvError(f"patching needs pairs: got {len(pos_prompts)} positive and {len(neg_prompts)} negative "
                          f"prompts")
    if any(len(p) != len(n) for p, n in zip(pos_prompts, neg_prompts)):
        raise MinisvError("total-effect patching swaps a head's output token by token, so the prompts of a pair need "
                          "the same length; use a template, or direct-path patching only")
    rows = [torch.as_tensor(p).tolist() for p in pos_prompts + neg_prompts]
    B, width, device = len(pos_prompts), max(len(r) for r in rows), model.embed.weight.device
    tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = None if all(len(r) == width for r in rows) else \
        torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{l}.attn.hook_z" for l in range(L)]
    w = unembed_read(model, obs.ids, obs.weights)                                                       # W_Uᵀ n

    def value(resid):    # n·ℓ at the last token = (W_Uᵀ n)·ln_final(x), without the full [.., V] logits
        return model.apply_norm("ln_final", resid[:, -1]).float() @ w
    resid, cache = model.run_with_cache(tokens, names=names, attention_mask=mask, stop_at_layer=L)
    clean = value(resid[:B])                                                                       # [B]
    effects = torch.zeros(L, H, device=device)
    heads = torch.arange(H, device=device).repeat_interleave(B)                     # copy h·B + b patches head h
    for l in progress(range(L), "total-effect patching", unit=" layers"):
        z_neg = cache[f"blocks.{l}.attn.hook_z"][B:].repeat(H, 1, 1, 1)                 # [H·B, T, H, E]

        def patch(z, name):
            z = z.clone()
            z[torch.arange(len(z)), :, heads] = z_neg[torch.arange(len(z)), :, heads]
            return z
        with model.hooks({f"blocks.{l}.attn.hook_z": patch}):
            start = tokens[:B].repeat(H, 1) if l == 0 else cache[f"blocks.{l}.hook_resid_pre"][:B].repeat(H, 1, 1)
            out = model(start, start_at_layer=l, stop_at_layer=L,
                        attention_mask=None if mask is None else mask[:B].repeat(H, 1))
        effects[l] = (clean.repeat(H) - value(out)).view(H, B).mean(1)
    return effects


def ranking_agreement(predicted, measured, k):
    """How well one importance ranking (e.g. feature norms) matches another (e.g. |patching effect|):
    the overlap of the top k (a fraction) and Spearman's rank correlation over all entries."""
    a, b = predicted.flatten().float(), measured.flatten().float()
    k = min(k, len(a))
    overlap = len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
    ra, rb = (x.argsort().argsort().float() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return {"top_k_overlap": overlap, "spearman": float(ra @ rb / (ra.norm() * rb.norm()))}


@torch.no_grad()
def feature_scores(model, features, rows, batch_size=16, skip_first=True):
    """Scores y·x̂ of features on every token of rows [N, T]: features is {hook name: [F, D]}, each row scored on
    the activation at that hook (e.g. 'blocks.13.ln1.hook_normalized'). Scores are taken inside the hooks, so
    nothing large is kept, and the forward stops after the last layer needed. skip_first drops position 0 (BOS
    in packed rows), whose activation is the same outlier in every row. Returns {hook name: [F, N·T']}."""
    out = {name: [] for name in features}

    def score(x, name):
        y = features[name].to(x.device)
        out[name].append((x[:, int(skip_first):].float() @ y.T).reshape(-1, len(y)))
    stop = _last_layer_needed(model, features)
    with model.hooks({name: score for name in features}):
        for i in progress(range(0, len(rows), batch_size), "scoring the corpus", unit=" batches"):
            model(rows[i:i + batch_size].to(model.embed.weight.device), stop_at_layer=stop)
    return {name: torch.cat(s).T.cpu() for name, s in out.items()}


def fit_slope(s1, s2):
    """Least-squares slope (with intercept) of s2 on s1, and r²: the empirical counterpart of coupling(y1, y2)."""
    s1, s2 = s1.double() - s1.double().mean(), s2.double() - s2.double().mean()
    slope = float(s1 @ s2 / (s1 @ s1))
    return slope, float((s1 @ s2) ** 2 / ((s1 @ s1) * (s2 @ s2)))


def auc(pos_scores, neg_scores):
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half."""
    p, n = torch.as_tensor(pos_scores).flatten()[:, None], torch.as_tensor(neg_scores).flatten()[None]
    return float((p > n).double().mean() + 0.5 * (p == n).double().mean())


def template_prompts(model, template, names):
    """Fill "[NAME]" in a template with each name that is one token with its leading space (the space before
    [NAME] in the template). Returns (kept names, token-id lists, the name's position); every prompt is
    prefix + [name] + suffix with the same prefix and suffix tokens, so positions line up across names."""
    if template.count("[NAME]") != 1 or not template.split("[NAME]")[0].endswith(" "):
        raise MinisvError(f"template {template!r} must contain ' [NAME]' (with the space before it) exactly once, "
                          f"e.g. \"So, [NAME] really is a great friend, isn't\"")
    if model.tokenizer is None:
        raise MinisvError("templates need the model's tokenizer; this model has none")
    tok = model.tokenizer
    before, after = template.split("[NAME]")
    prefix, suffix = tok.encode(before[:-1], bos=tok.add_bos), tok.encode(after)
    kept, prompts = [], []
    for name in names:
        ids, single = tok.encode(before + name + after, bos=tok.add_bos), tok.encode(" " + name)
        if len(single) == 1 and ids == prefix + single + suffix:
            kept.append(name)
            prompts.append(ids)
    if not prompts:
        raise MinisvError(f"none of the names is a single token in template {template!r}; give common first names")
    return kept, prompts, len(prefix)
