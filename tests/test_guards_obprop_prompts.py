"""ObProp's prompts, each checked against something that does not share its arithmetic:

- the [NAME] slot of `template_prompts` is where the name's token is (found by searching the token ids; the
  other tests reuse the returned position, so they would agree with a slot one token off),
- `Reference.at` on prompts of different lengths reads each prompt at its own last token (transformers' hidden
  states of each prompt run alone),
- the language study's positive prompts are the ones the observable's positive token continues: Python's own
  compiler accepts the negative (Python) prompts continued with ':' and refuses the positive (C) ones; gcc, where
  installed, accepts the positive ones continued with ' {',
- `patch_heads_total` on pairs of different lengths (left-padded into one batch) equals a per-pair brute force
  on transformers' models, head h's slice of the attention output swapped at every position."""
import re
import shutil
import subprocess

import pytest
import torch

import minisv
from minisv import obprop as ob
from minisv.model import Model, ModelConfig
from test_obprop import WORDS, WordTokenizer


def test_the_name_slot_is_where_the_names_token_is():
    torch.manual_seed(0)
    model = Model(ModelConfig("llama", 1, 32, 4, 2, 8, 64, 96, 64, "silu", rotary_dim=8), WordTokenizer(WORDS))
    tok = model.tokenizer
    names = ["Mary", "Anna", "Lisa", "John", "Mark", "Paul"]
    for template in ob.SUBJECT_TEMPLATES + ob.OBJECT_TEMPLATES + ob.OCCUPATION_TEMPLATES:
        kept, prompts, position = ob.template_prompts(model, template, names)
        assert kept == names
        for name, ids in zip(kept, prompts):
            assert ids.count(tok.ids[" " + name]) == 1
            assert position == ids.index(tok.ids[" " + name]), template
            assert ids == tok.encode(template.replace("[NAME]", name))


@pytest.fixture(scope="module")
def pair(tiny):
    family, path, hf = tiny
    return family, minisv.load(str(path), device="cpu"), hf


def test_reference_prompts_of_different_lengths_are_read_at_their_own_last_token(pair):
    _, model, hf = pair
    g = torch.Generator().manual_seed(4)
    for lengths in [(5, 9), (9, 5)]:
        pos, neg = (torch.randint(2, 96, (n,), generator=g) for n in lengths)
        with torch.no_grad():
            hidden = [hf(p[None], output_hidden_states=True).hidden_states for p in (pos, neg)]
        ref = ob.reference(model, pos, neg)
        for layer in (1, 2):
            want = torch.stack([hidden[0][layer][0, -1], hidden[1][layer][0, -1]])
            got = ref.at(f"blocks.{layer}.hook_resid_pre", lengths[0] - 1)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ref.mid(f"blocks.{layer}.hook_resid_pre"), want.mean(0), rtol=1e-4, atol=1e-5)


def _terms(spec):
    """"' {' - ':'" -> [(+1, ' {'), (-1, ':')], read here with a plain regex."""
    return [(-1 if sign == "-" else 1, word) for sign, word in re.findall(r"([+-]?)\s*'([^']*)'", spec)]


def _python_accepts(prompt, continuation):
    try:
        compile(prompt + continuation + "\n        pass\n    return 0\n", "<prompt>", "exec")
        return True
    except SyntaxError:
        return False


def test_the_language_studys_positive_prompts_are_the_ones_its_positive_token_continues():
    [(spec, positive, negative)] = ob.STUDIES["language"]
    (plus, up), (minus, down) = sorted(_terms(spec), reverse=True)
    assert (plus, minus) == (1, -1) and (up, down) == (" {", ":")
    assert len(positive) == len(negative) == len(ob.CONDITIONS)
    assert all(_python_accepts(p, down) for p in negative)             # Python continues with ':'
    assert not any(_python_accepts(p, down) for p in positive)
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return
    globals_ = "int x, y, n, i, count, a, b, flag, size, value, limit, total, index, left, right, done, err, depth, " \
               "max_depth, k, score, best, len;\n"      # the conditions' variables (main's own x shadows x)
    for prompts, compiles in ((positive, True), (negative, False)):
        for p in prompts:
            source = globals_ + p + up + " }\n    return 0;\n}\n"
            r = subprocess.run([gcc, "-fsyntax-only", "-x", "c", "-"], input=source, capture_output=True, text=True)
            assert (r.returncode == 0) == compiles, r.stderr


def _hf_head_patching(family, hf, n, pos, neg):
    """[L, H] mean over pairs of n·ℓ(pos) − n·ℓ(pos with head h's slice of layer l's attention output taken from
    neg at every position), each pair run alone through transformers' model."""
    base = hf.transformer if family == "gpt2" else hf.gpt_neox if family == "neox" else hf.model
    layers = base.h if family == "gpt2" else base.layers
    out_proj = [b.attn.c_proj if family == "gpt2" else b.attention.dense if family == "neox" else b.self_attn.o_proj
                for b in layers]
    H = hf.config.num_attention_heads
    E = hf.config.hidden_size // H
    effects = torch.zeros(len(layers), H)
    with torch.no_grad():
        for p, q in zip(pos, neg):
            p, q = torch.tensor([p]), torch.tensor([q])
            clean = float(hf(p).logits[0, -1] @ n)
            for l, proj in enumerate(out_proj):
                seen = {}
                handle = proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0].clone()))
                hf(q)
                handle.remove()
                for h in range(H):
                    def swap(m, args, h=h):
                        z = args[0].clone()
                        z[..., h * E:(h + 1) * E] = seen["z"][..., h * E:(h + 1) * E]
                        return (z,)
                    handle = proj.register_forward_pre_hook(swap)
                    effects[l, h] += (clean - float(hf(p).logits[0, -1] @ n)) / len(pos)
                    handle.remove()
    return effects


def test_total_effect_patching_of_a_ragged_batch_equals_each_pair_alone(pair):
    family, model, hf = pair
    g = torch.Generator().manual_seed(6)
    lengths = (5, 9, 7)
    pos = [torch.randint(2, 96, (t,), generator=g).tolist() for t in lengths]
    neg = [torch.randint(2, 96, (t,), generator=g).tolist() for t in lengths]
    obs = ob.observable(model, {5: 1.0, 7: -1.0, 11: 0.5})
    n = torch.zeros(96)
    n[obs.ids] = obs.weights
    want = _hf_head_patching(family, hf, n, pos, neg)
    got = ob.patch_heads_total(model, obs, pos, neg)
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
