#!/usr/bin/env python
"""Independent check of tests/fixtures/golden/ WITHOUT the adapter libraries.

Runs in the project's own venv (torch + transformers 5.x + safetensors; no `adapters`, no `peft`):

    . .venv/bin/activate && python scripts/golden/check_fixtures.py

1. loads backbone/ with T5ForConditionalGeneration.from_pretrained and checks the "bare" scores
   (|d loglik| <= TOL) and greedy ids of expected.json;
2. re-implements every AdapterHub bottleneck / Compacter fixture and every PEFT LoRA fixture from the raw
   weights file + adapter_config.json with forward hooks on the stock HF T5 modules, using the formulas written
   down below, and checks scores and greedy ids against expected.json;
3. checks that compacter_missing_rule/ is refused (shared_phm_rule true, no rule in the file).

It is a readable reference for the importer, not production code.

AdapterHub semantics implemented here (adapters 1.3.0 on HF T5, read from its source):
  sites: encoder block i: layer.0 = self-attention ("mh_adapter"), layer.1 = FFN ("output_adapter");
         decoder block i: layer.0 = self-attention (mh), layer.1 = cross-attention ("cross_adapter"),
         layer.2 = FFN (output). leave_out holds global block ids: encoder i -> i, decoder i -> L + i.
  with x = sublayer input (residual), f = sublayer(RMSNorm(x)) (what the stock layer adds to x), and
         A(z) = scaling * up(act(down(z))):
         T5 passes layer_norm=None to the adapter layer, so original_ln_before/after only add x
         (methods/modeling.py Adapter.pre_forward / forward / post_forward, ParallelAdapter):
         is_parallel : out = s(x) + f + A(x)        (original_ln_before, residual_before_ln ignored)
         otherwise   : h = x + f if original_ln_before else f          (the adapter's input)
                       r = f if residual_before_ln is True else h      ("post_add": the library fails on T5)
                       out = s(x) + r + A(h)
         with s(x) = x if original_ln_after else 0. So SeqBn (Pfeiffer) = x + f + A(x + f), DoubleSeqBn
         (Houlsby) = x + f + A(f), and SeqBn with residual_before_ln=False = 2x + f + A(x + f).
         (valid for ln_before=ln_after=use_gating=False, scaling a float, as in all fixtures.)
  dense: down(z) = z @ Wd.T + bd (adapter_down.0.weight (k, d)), up(h) = h @ Wu.T + bu (adapter_up.weight (d, k))
  PHM:   down(z) = z @ H + b with H = sum_i kron(C[i], W_left[i] @ W_right[i]), shape (in, out);
         C = shared_parameters.<name>.phm_rule (n,n,n), or bmm(phm_rule_left (n,n,1), phm_rule_right (n,1,n))
         when factorized_phm_rule is true.
PEFT LoRA: y = base(x) + (x @ A.T @ B.T) * s, s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

Prefix tuning, AdapterHub 1.3.0 (methods/prefix_tuning.py, models/t5/modeling_t5.py with transformers 4.57):
  locations: "encoder_prefix" = encoder self-attn (if encoder_prefix), "self_prefix" = decoder self-attn
         (always), "cross_prefix" = decoder cross-attn (if cross_prefix); leave_out holds global block ids
         (encoder i -> i, decoder i -> L + i) and removes that block's prefix(es). Per location, the n layers
         that keep a prefix are numbered 0..n-1 in block order.
  weights: one pool, saved under every attention layer's path and once as prefix_tuning.prefix_tunings.<name>.
         <location>.* (all copies identical). MLP: kv = Linear2(act(Linear1(wte.weight))) (act = non_linearity,
         tanh), flat: kv = control_trans; kv.view(P, 2n, H, d_kv); layer j: K = kv[:, 2j], V = kv[:, 2j + 1].
  attention: K, V = [prefix; real] (prefix before the real keys, after the cache update); the mask gets 0
         (visible) for the prefix; scores = q K^T + bias (T5: no 1/sqrt(d) scaling).
  bias: the stack's first self-attention computes the relative bias over the concatenated keys: query t at
         position t, key m at position m (prefix 0..P-1, real token j at P + j, i.e. shifted by P); later layers
         REUSE it while their key length is the same, otherwise they recompute, and a layer without
         relative_attention_bias (every layer but the first) then gets an all-zero bias (leave_out: encoder
         layer 1 and decoder layer 1 of prefix_leave_out run with no position bias at all). Cross-attention has
         zero bias.
  MAM ("architecture": "union" of prefix_tuning and a parallel bottleneck): both, independently.
Prefix tuning, PEFT 0.21.2 (peft_model.py get_prompt / PeftModelForSeq2SeqLM on transformers 4.57):
  prompt_embeddings [P, 2 L token_dim] (with prefix_projection the saved tensor is the MLP's output) viewed as
         [P, 2L, H, token_dim / H]; num_transformer_submodules = 2 doubles it along dim 1 and splits in groups of
         4, so decoder layer i self-attention gets K = rows 4i mod 2L, V = 4i + 1 mod 2L (with L = 2: both decoder
         layers get rows 0, 1). The cross-attention part is discarded (cross cache reset), the encoder is untouched.
  the prefix is a pre-filled self-attention cache of length P: decoder query t sits at position P + t, real key j
         at j, prefix key k at k; relative bias over those positions (computed once, shared), causal mask with the
         prefix visible.
Prefix fixtures are scored with use_cache=False and greedy ids by a loop over the teacher-forced forward
(no cache), which the library numbers must match.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import ByT5Tokenizer, T5ForConditionalGeneration

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "tests" / "fixtures" / "golden"
TOL = 1e-4  # summed log-likelihood per case
TOKEN_TOL = 5e-5  # each token's log-probability (a correct float32 implementation is within ~1e-5)

ACT = {
    "relu": F.relu,
    "gelu": lambda t: F.gelu(t),  # exact erf
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def load_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class Refused(Exception):
    pass


def adapterhub_modules(fdir: Path, meta: dict):
    cfgfile = json.loads((fdir / "adapter_config.json").read_text())
    cfg, name = cfgfile["config"], cfgfile["name"]
    sd = load_weights(fdir / meta["weights_file"])
    # strip an optional "transformer." prefix (saved from adapters' T5AdapterModel)
    sd = {k[len("transformer.") :] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    parts = cfg["configs"] if cfg.get("architecture") == "union" else [cfg]
    installs = []
    for part in parts:
        if part.get("architecture") == "prefix_tuning":
            installs.append(adapterhub_prefix(part, name, {k: v for k, v in sd.items() if ".prefix_tunings." in k}))
        else:
            bn_sd = {k: v for k, v in sd.items() if ".prefix_tunings." not in k}
            installs.append(adapterhub_bottleneck(fdir, part, name, bn_sd))

    def install(model):
        return [h for f in installs for h in f(model)]

    install.prefix = any(getattr(f, "prefix", False) for f in installs)
    return install


def adapterhub_bottleneck(fdir: Path, cfg: dict, name: str, sd: dict):
    for k, want in (
        ("ln_before", False),
        ("ln_after", False),
        ("use_gating", False),
        ("cross_adapter", False),
    ):
        if cfg[k] != want:
            raise Refused(f"{k}={cfg[k]} not implemented in this reference")
    if cfg["residual_before_ln"] not in (True, False):
        raise Refused(f"residual_before_ln={cfg['residual_before_ln']!r}: AdapterHub's own forward fails on T5")
    rule = None
    if cfg["phm_layer"]:
        if cfg["shared_W_phm"] or not cfg["factorized_phm_W"] or not cfg["shared_phm_rule"]:
            raise Refused("only shared rule + per-layer factorized W implemented here")
        pre = f"shared_parameters.{name}."
        if cfg["factorized_phm_rule"]:
            if pre + "phm_rule_left" not in sd or pre + "phm_rule_right" not in sd:
                raise Refused(f"shared_phm_rule is true but {pre}phm_rule_left/right missing")
            rule = torch.bmm(sd[pre + "phm_rule_left"], sd[pre + "phm_rule_right"])
        else:
            if pre + "phm_rule" not in sd:
                raise Refused(f"shared_phm_rule is true but {pre}phm_rule is missing from the weights file")
            rule = sd[pre + "phm_rule"]
    act = ACT[cfg["non_linearity"].lower()]
    scaling = float(cfg["scaling"])

    def proj(prefix):
        if cfg["phm_layer"]:
            Wl, Wr, b = sd[prefix + "W_left"], sd[prefix + "W_right"], sd[prefix + "b"]
            H = sum(torch.kron(rule[i], Wl[i] @ Wr[i]) for i in range(rule.shape[0]))
            return lambda z: z @ H + b
        W, b = sd[prefix + "weight"], sd[prefix + "bias"]
        return lambda z: F.linear(z, W, b)

    def make_A(site_prefix):
        down = proj(f"{site_prefix}.adapters.{name}.adapter_down.0.")
        up = proj(f"{site_prefix}.adapters.{name}.adapter_up.")
        return lambda z: up(act(down(z))) * scaling

    def place(x, f, A):
        skip = x if cfg["original_ln_after"] else 0
        if cfg["is_parallel"]:
            return skip + f + A(x)
        h = x + f if cfg["original_ln_before"] else f
        r = f if cfg["residual_before_ln"] is True else h
        return skip + r + A(h)

    def install(model):
        L = len(model.encoder.block)
        handles, used = [], set()
        for stack, off in (("encoder", 0), ("decoder", L)):
            for i, block in enumerate(getattr(model, stack).block):
                if off + i in cfg["leave_out"]:
                    continue
                sites = []
                if cfg["mh_adapter"]:
                    sites.append(0)
                if cfg["output_adapter"]:
                    sites.append(1 if stack == "encoder" else 2)
                for li in sites:
                    sp = f"{stack}.block.{i}.layer.{li}"
                    used.update(k for k in sd if k.startswith(sp + ".adapters."))
                    A = make_A(sp)

                    def hook(mod, args, kwargs, out, A=A):
                        x = args[0] if args else kwargs["hidden_states"]
                        h = out[0] if isinstance(out, tuple) else out
                        new = place(x, h - x, A)
                        return (new, *out[1:]) if isinstance(out, tuple) else new

                    handles.append(block.layer[li].register_forward_hook(hook, with_kwargs=True))
        unused = set(sd) - used - {k for k in sd if k.startswith("shared_parameters.")}
        if unused:
            raise SystemExit(f"{fdir.name}: weights not placed: {sorted(unused)[:4]}")
        return handles

    return install


class _Restore:
    """Undo an instance-level forward override (same interface as a hook handle)."""

    def __init__(self, module):
        self.module = module

    def remove(self):
        del self.module.forward


def rel_bias(attn0, T: int, K: int, ctx_offset: int):
    """attn0's relative position bias [1, H, T, K]: query t at position ctx_offset + t, key m at position m."""
    ctx = torch.arange(T)[:, None] + ctx_offset
    mem = torch.arange(K)[None, :]
    buckets = attn0._relative_position_bucket(
        mem - ctx,
        bidirectional=not attn0.is_decoder,
        num_buckets=attn0.relative_attention_num_buckets,
        max_distance=attn0.relative_attention_max_distance,
    )
    return attn0.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)


def install_prefix_attention(model, prefixes: dict, style: str):
    """Replace every T5Attention.forward (no cache; batch 1, no padding) by q [pK; K]^T + bias with the prefixes
    prefixes[(site, i)] = (K, V) each [H, P, d_kv], site in "enc_self", "dec_self", "cross". style "adapterhub":
    positions/bias sharing as AdapterHub (see top); "peft": decoder queries at P + t."""
    handles = []
    sites = [("enc_self", model.encoder, 0), ("dec_self", model.decoder, 0), ("cross", model.decoder, 1)]
    for site, stack, li in sites:
        attn0 = stack.block[0].layer[0].SelfAttention
        plens = [prefixes[(site, i)][0].shape[1] if (site, i) in prefixes else 0 for i in range(len(stack.block))]
        for i, block in enumerate(stack.block):
            attn = block.layer[li].EncDecAttention if site == "cross" else block.layer[li].SelfAttention
            pkv = prefixes.get((site, i))
            # AdapterHub: the first layer's bias is reused while the key length stays the same, else zeros.
            shares_first = all(p == plens[0] for p in plens[: i + 1])

            def forward(
                hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, *,
                attn=attn, pkv=pkv, site=site, attn0=attn0, shares_first=shares_first, **kw,
            ):  # fmt: skip
                assert cache is None, "prefix reference runs without cache"
                B, T = hidden_states.shape[:2]
                H, dk = attn.n_heads, attn.key_value_proj_dim
                q = attn.q(hidden_states).view(B, T, H, dk).transpose(1, 2)
                src = hidden_states if key_value_states is None else key_value_states
                k = attn.k(src).view(B, -1, H, dk).transpose(1, 2)
                v = attn.v(src).view(B, -1, H, dk).transpose(1, 2)
                S = k.shape[2]
                P = 0
                if pkv is not None:
                    P = pkv[0].shape[1]
                    k = torch.cat([pkv[0].unsqueeze(0).expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
                    v = torch.cat([pkv[1].unsqueeze(0).expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
                if site == "cross":
                    bias = torch.zeros(1, H, T, P + S, dtype=q.dtype)
                elif style == "peft":
                    bias = rel_bias(attn0, T, P + S, ctx_offset=P) if site == "dec_self" else rel_bias(attn0, T, S, 0)
                elif shares_first:
                    bias = rel_bias(attn0, T, P + S, ctx_offset=0)
                else:
                    bias = torch.zeros(1, H, T, P + S, dtype=q.dtype)
                if site == "dec_self":  # causal over the real keys, the prefix always visible
                    real = torch.arange(S)[None, :] <= torch.arange(T)[:, None]
                    visible = torch.cat([torch.ones(T, P, dtype=torch.bool), real], dim=1)
                    bias = bias.masked_fill(~visible, torch.finfo(q.dtype).min)
                scores = q @ k.transpose(-1, -2) * attn.scaling + bias.to(q.dtype)
                w = torch.softmax(scores.float(), dim=-1).type_as(scores)
                out = (w @ v).transpose(1, 2).reshape(B, T, H * dk)
                return attn.o(out), None, None

            attn.forward = forward
            handles.append(_Restore(attn))
    return handles


def adapterhub_prefix(cfg: dict, name: str, sd: dict):
    for k, want in (("use_gating", False),):
        if cfg[k] != want:
            raise Refused(f"prefix {k}={cfg[k]} not implemented in this reference")
    act = ACT[cfg["non_linearity"].lower()]
    P = cfg["prefix_length"]
    top = f"prefix_tuning.prefix_tunings.{name}."
    # every per-layer copy must equal the top-level one
    for k, v in sd.items():
        tail = k.split(f".prefix_tunings.{name}.", 1)[1]
        if not torch.equal(v, sd[top + tail]):
            raise SystemExit(f"prefix copy {k} differs from {top + tail}")

    def kv(loc):
        pre = f"{top}{loc}."
        if pre + "control_trans" in sd:  # flat, or an ejected save (whose config still says flat: false)
            out = sd[pre + "control_trans"]
        else:
            h = act(
                F.linear(sd[pre + "wte.weight"], sd[pre + "control_trans.0.weight"], sd[pre + "control_trans.0.bias"])
            )
            out = F.linear(h, sd[pre + "control_trans.2.weight"], sd[pre + "control_trans.2.bias"])
        return out

    def install(model):
        L = len(model.encoder.block)
        H, dk = model.config.num_heads, model.config.d_kv
        leave = set(cfg["leave_out"])
        plan = {
            "enc_self": ("encoder_prefix", [i for i in range(L) if i not in leave] if cfg["encoder_prefix"] else []),
            "dec_self": ("self_prefix", [i for i in range(L) if L + i not in leave]),
            "cross": ("cross_prefix", [i for i in range(L) if L + i not in leave] if cfg["cross_prefix"] else []),
        }
        prefixes = {}
        for site, (loc, layers) in plan.items():
            if not layers:
                if any(k.startswith(f"{top}{loc}.") for k in sd):
                    raise SystemExit(f"{loc} weights present but no layer takes them")
                continue
            t = kv(loc).reshape(P, 2 * len(layers), H, dk)
            for j, i in enumerate(layers):
                prefixes[(site, i)] = (t[:, 2 * j].transpose(0, 1), t[:, 2 * j + 1].transpose(0, 1))
        return install_prefix_attention(model, prefixes, "adapterhub")

    install.prefix = True
    return install


def peft_prefix_modules(cfg: dict, sd: dict):
    P, H, td, nl = cfg["num_virtual_tokens"], cfg["num_attention_heads"], cfg["token_dim"], cfg["num_layers"]
    emb = sd["prompt_embeddings"]

    def install(model):
        if model.config.num_heads != H or td // H != model.config.d_kv:
            raise Refused(f"PEFT prefix token_dim {td} / {H} heads does not fit T5's {model.config.num_heads} x d_kv")
        t = emb.reshape(P, 2 * nl, H, td // H)
        prefixes = {}
        for i in range(len(model.decoder.block)):
            rk, rv = (4 * i) % (2 * nl), (4 * i + 1) % (2 * nl)
            prefixes[("dec_self", i)] = (t[:, rk].transpose(0, 1), t[:, rv].transpose(0, 1))
        return install_prefix_attention(model, prefixes, "peft")

    install.prefix = True
    return install


def peft_modules(fdir: Path, meta: dict):
    cfg = json.loads((fdir / "adapter_config.json").read_text())
    sd = load_weights(fdir / meta["weights_file"])
    if cfg["peft_type"] == "PREFIX_TUNING":
        return peft_prefix_modules(cfg, sd)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs = {}
    for k, v in sd.items():
        assert k.startswith("base_model.model."), k
        mod, ab = k[len("base_model.model.") :].rsplit(".lora_", 1)
        pairs.setdefault(mod, {})[ab.split(".")[0]] = v

    def install(model):
        handles = []
        for mod, t in pairs.items():
            A, B = t["A"], t["B"]
            handles.append(
                model.get_submodule(mod).register_forward_hook(
                    lambda m, args, out, A=A, B=B: out + (args[0] @ A.T @ B.T) * s
                )
            )
        return handles

    return install


@torch.no_grad()
def greedy_no_cache(model, input_ids, attention_mask, max_new_tokens=8):
    ids = [0]
    for _ in range(max_new_tokens):
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=torch.tensor([ids]), use_cache=False
        )
        ids.append(int(out.logits[0, -1].argmax()))
        if ids[-1] == 1:
            break
    return ids


@torch.no_grad()
def score(model, tok, cases, no_cache=False):
    got = []
    for c in cases:
        enc = tok(c["input"], return_tensors="pt")
        labels = tok(c["target"], return_tensors="pt").input_ids
        assert enc.input_ids[0].tolist() == c["input_ids"] and labels[0].tolist() == c["target_ids"]
        if no_cache:
            assert bool(enc.attention_mask.all()) and enc.input_ids.shape[0] == 1
            logits = model(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels, use_cache=False
            ).logits
        else:
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).logits
        tlp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1))[0, :, 0]
        ll = float(tlp.sum())
        if no_cache:
            ids = greedy_no_cache(model, enc.input_ids, enc.attention_mask)
        else:
            gen = model.generate(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                max_new_tokens=8,
                num_beams=1,
                do_sample=False,
            )
            ids = gen[0].tolist()
        got.append((ll, ids, tlp.tolist()))
    return got


def compare(name, cases, got):
    ok = True
    worst = worst_tok = 0.0
    for c, (ll, ids, tlp) in zip(cases, got):
        dtok = max(abs(a - b) for a, b in zip(tlp, c["token_logprobs"], strict=True))
        worst, worst_tok = max(worst, abs(ll - c["loglik"])), max(worst_tok, dtok)
        if abs(ll - c["loglik"]) > TOL or dtok > TOKEN_TOL or ids != c["greedy_ids"]:
            ok = False
            print(f"  MISMATCH {name}: {ll} vs {c['loglik']}; {ids} vs {c['greedy_ids']}")
    print(f"{'ok  ' if ok else 'FAIL'} {name:24s} max|dloglik|={worst:.2e} max|dtoken|={worst_tok:.2e}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--only", nargs="*", help="check only these fixtures")
    args = ap.parse_args()
    exp = json.loads((args.dir / "expected.json").read_text())
    tok = ByT5Tokenizer.from_pretrained(str(args.dir / "backbone"))
    model = T5ForConditionalGeneration.from_pretrained(str(args.dir / "backbone"), dtype=torch.float32).eval()
    all_ok = True
    for name, meta in exp["fixtures"].items():
        if args.only and name not in args.only:
            continue
        fdir = args.dir / meta["dir"]
        try:
            if meta["format"] == "hf_t5_backbone":

                def install(m):
                    return []
            elif meta["format"] == "adapterhub":
                install = adapterhub_modules(fdir, meta)
            else:
                install = peft_modules(fdir, meta)
        except Refused as e:
            if meta.get("expect_refusal"):
                print(f"ok   {name:24s} refused: {e}")
                continue
            print(f"FAIL {name}: refused: {e}")
            all_ok = False
            continue
        if meta.get("expect_refusal"):
            print(f"FAIL {name}: should have been refused")
            all_ok = False
            continue
        handles = install(model)
        try:
            no_cache = getattr(install, "prefix", False)
            all_ok &= compare(name, meta["cases"], score(model, tok, meta["cases"], no_cache=no_cache))
        finally:
            for h in handles:
                h.remove()
    print("ALL OK" if all_ok else "SOME FAILED")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
