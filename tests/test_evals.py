"""minisv.evals against independent oracles: the FVU of target-centered transcoders, and the held-out FVU of a
trained transcoder measured again on unseen documents with activations harvested by transformers."""
import random

import pytest
import torch

import minisv
from conftest import tiny_config
from minisv.data import eval_sample, load_dataset
from minisv.evals import evaluate
from minisv.training import TrainConfig, train
from minisv.transcoder import mlp_hooks
from minisv.transcoder import Transcoder, TranscoderConfig

BOS = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def saved(tmp_path, family, mlp_mean, **config):
    """(directory, transformers model) of a tiny random checkpoint whose MLP output has mean ≈ mlp_mean over
    d_model (a large output bias), with random norm gains and O(1) activations."""
    import transformers as tf
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(tiny_config(family) if not config else
                                              type(tiny_config(family))(**{**tiny_config(family).to_dict(), **config})).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2:                                # weights of order 1/sqrt(width): tokens differ
                p.normal_(0, 0.2)
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln" in name else 0.0, 0.1)
            if name.endswith(("mlp.c_proj.bias", "mlp.down_proj.bias")):
                p.add_(mlp_mean)
    ref.save_pretrained(tmp_path)
    return tmp_path, ref


def test_fvu_of_a_target_centered_transcoder_is_measured_against_the_centered_target(tmp_path):
    """A released GPT-2 transcoder predicts mlp_out minus its mean over d_model. One that outputs the average
    centered target for every token explains none of its variance: FVU exactly 1, however large mlp_out's mean
    (measured against raw mlp_out, as before, it came out ≈ 2,000× too large on GPT-2)."""
    path, _ = saved(tmp_path, "gpt2", mlp_mean=5.0)
    model = minisv.load(str(path), device="cpu")
    rows = torch.randint(2, 96, (6, 16), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = BOS
    _, cache = model.run_with_cache(rows, names=list(mlp_hooks(1)))
    y = cache[mlp_hooks(1)[1]][rows != BOS]
    centered = y - y.mean(-1, keepdim=True)
    assert y.mean() > 4.0
    tc = Transcoder(TranscoderConfig(32, 32, 48, "relu", layer=1, target_centered=True))
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.b_dec.copy_(centered.mean(0))
    assert evaluate(model, rows, {1: tc}, bos_id=BOS)["layer_1"]["fvu"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():                                   # and any transcoder: the hand formula on centered targets
        tc.W_dec.normal_(0, 0.1)
    x = cache[mlp_hooks(1)[0]][rows != BOS]
    fvu = (centered - tc(x).detach()).pow(2).sum() / (centered - centered.mean(0)).pow(2).sum()
    assert evaluate(model, rows, {1: tc}, bos_id=BOS)["layer_1"]["fvu"] == pytest.approx(float(fvu), rel=1e-5)


# ------------------------------------------------------------------------- held-out FVU, checked independently
WORDS = "the a of to and in is it that for on as with was by this at be".split() + \
        "function returns value list object string module class error file name".split()
CHARS = " .abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """Lower-case letters, space and full stop: ids 2..29; 0 is BOS."""
    bos_id = BOS

    def encode(self, text, bos=False):
        return [BOS] * bos + [2 + CHARS.index(c) for c in text]


def documents(n, seed):
    """Text of one domain: sentences of words drawn from a fixed bigram-ish process, a seeded stream."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        word, sentences = rng.choice(WORDS), []
        for _ in range(rng.randint(2, 6)):
            words = []
            for _ in range(rng.randint(4, 10)):
                word = WORDS[(WORDS.index(word) + rng.choice([1, 2, 3, 7])) % len(WORDS)]
                words.append(word)
            sentences.append(" ".join(words) + ".")
        docs.append(" ".join(sentences))
    return docs


def independent_fvu(ref, tc, rows, layer):
    """FVU of tc on rows, with nothing from minisv but the weights: activations from the transformers model
    (RMSNorm input, normalized by hand without its gain; the MLP's output), the TopK map written out, and the
    sums over every non-BOS position."""
    captured = {}
    block = ref.model.layers[layer]
    hooks = [block.post_attention_layernorm.register_forward_pre_hook(lambda m, args: captured.update(h=args[0])),
             block.mlp.register_forward_hook(lambda m, args, out: captured.update(y=out))]
    try:
        with torch.no_grad():
            ref(rows)
    finally:
        for h in hooks:
            h.remove()
    keep = rows != BOS
    h, y = captured["h"][keep].double(), captured["y"][keep].double()
    x = h / (h.pow(2).mean(-1, keepdim=True) + ref.config.rms_norm_eps).sqrt()
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec))
    pre = x @ W_enc + b_enc
    top = pre.topk(tc.cfg.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    y_hat = f @ W_dec + b_dec
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_held_out_fvu_is_what_an_independent_evaluation_finds_on_unseen_documents(tmp_path):
    """Train on documents of one domain, report FVU on the held-out split as train_transcoder.py does (evaluate()
    on eval_sample rows); an independent re-implementation on activations harvested by transformers, on fresh
    documents of the same domain that were never in the data set, finds the same FVU (within 0.1). The MLP output
    has a large mean (bias 3), so a returned transcoder whose b_dec were left in training units would be far off."""
    path, ref = saved(tmp_path / "model", "llama", mlp_mean=3.0, mlp_bias=True)
    model = minisv.load(str(path), device="cpu")
    tok = CharTokenizer()
    (tmp_path / "docs.jsonl").write_text("\n".join('{"text": "%s"}' % d for d in documents(300, seed=1)))
    train_rows, held = load_dataset(tmp_path / "docs.jsonl", tok, ctx=32, held_out=0.1)
    cfg = TrainConfig(layers=[1], d_sae=64, k=4, lr=1e-2, tokens=256 * 60, batch_tokens=256, buffer_tokens=2048,
                      warmup_steps=5, dead_tokens=2048, bos_id=BOS)
    tcs, _ = train(model, train_rows, cfg, log=lambda s: None)
    eval_rows, info = eval_sample(held, 32 * 24, bos_id=BOS)
    reported = evaluate(model, eval_rows, tcs, bos_id=BOS)["layer_1"]["fvu"]
    assert info["documents"] >= 20
    unseen = torch.tensor([tok.encode(d, bos=True)[:32] for d in documents(60, seed=2)])
    independent = independent_fvu(ref, tcs[1], unseen, layer=1)
    print(f"held-out FVU {reported:.3f} on {info}; independent, unseen documents: {independent:.3f}")
    assert reported < 0.6                                   # it learned something: the comparison means something
    assert independent == pytest.approx(reported, abs=0.1)
