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


def peft_modules(fdir: Path, meta: dict):
    cfg = json.loads((fdir / "adapter_config.json").read_text())
    sd = load_weights(fdir / meta["weights_file"])
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
def score(model, tok, cases):
    got = []
    for c in cases:
        enc = tok(c["input"], return_tensors="pt")
        labels = tok(c["target"], return_tensors="pt").input_ids
        assert enc.input_ids[0].tolist() == c["input_ids"] and labels[0].tolist() == c["target_ids"]
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).logits
        tlp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1))[0, :, 0]
        ll = float(tlp.sum())
        gen = model.generate(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=8, num_beams=1, do_sample=False
        )
        got.append((ll, gen[0].tolist(), tlp.tolist()))
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
    args = ap.parse_args()
    exp = json.loads((args.dir / "expected.json").read_text())
    tok = ByT5Tokenizer.from_pretrained(str(args.dir / "backbone"))
    model = T5ForConditionalGeneration.from_pretrained(str(args.dir / "backbone"), dtype=torch.float32).eval()
    all_ok = True
    for name, meta in exp["fixtures"].items():
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
            all_ok &= compare(name, meta["cases"], score(model, tok, meta["cases"]))
        finally:
            for h in handles:
                h.remove()
    print("ALL OK" if all_ok else "SOME FAILED")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
