"""Half precision: how far kronserve's float16/bfloat16 answers are from the float32 library numbers, and what
computing the adapters in float32 (PEFT's default: `autocast_adapter_dtype`, LoRA input cast to float32 and
the update cast back) would change.

Golden fixtures (tests/fixtures/golden/, float32 numbers from AdapterHub/PEFT), each case scored alone:
  kronserve  : kronserve's engine in the dtype (transformers' own half-precision load, adapters in the dtype)
  fp32 math  : the same transformers half-precision model, adapters added by forward hooks computing in float32
               (PEFT's `lora.Linear.forward`: x -> float32, update, result cast back; a bottleneck likewise)
Prints max |loglik - float32 library| over the 4 cases per fixture and dtype, then a summary line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import T5ForConditionalGeneration

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.formats.importers import read_source, to_adapter

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())["fixtures"]
FIXTURES = ("seq_bn", "double_seq_bn", "lora", "lora_variant")


def fp32_hooks(model: T5ForConditionalGeneration, name: str) -> list:
    """Adapters of fixture `name` on `model` by forward hooks, their arithmetic in float32."""
    fdir = GOLDEN / name
    cfg = json.loads((fdir / "adapter_config.json").read_text())
    if "peft_type" in cfg:
        sd = load_file(fdir / "adapter_model.safetensors")
        s = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
        handles = []
        for key in [k for k in sd if ".lora_A." in k]:
            mod = key[len("base_model.model.") :].split(".lora_A.")[0]
            a, b = sd[key], sd[key.replace("lora_A", "lora_B")]

            def hook(m, args, out, a=a, b=b):
                return (out.float() + (args[0].float() @ a.T @ b.T) * s).to(out.dtype)

            handles.append(model.get_submodule(mod).register_forward_hook(hook))
        return handles
    c, sd = cfg["config"], torch.load(fdir / "pytorch_adapter.bin", weights_only=True)
    act = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu}[c["non_linearity"]]
    handles = []
    for stack in ("encoder", "decoder"):
        for i, block in enumerate(getattr(model, stack).block):
            layers = [0, len(block.layer) - 1] if c["mh_adapter"] else [len(block.layer) - 1]
            for li in layers:
                p = f"{stack}.block.{i}.layer.{li}.adapters.{cfg['name']}."
                w = [sd[p + k] for k in ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight")]
                w.append(sd[p + "adapter_up.bias"])

                def hook(m, args, kwargs, out, w=w):
                    x = (args[0] if args else kwargs["hidden_states"]).float()
                    h = out[0] if isinstance(out, tuple) else out
                    f = h.float() - x
                    z = x + f if c["original_ln_before"] else f
                    new = (h.float() + F.linear(act(F.linear(z, w[0], w[1])), w[2], w[3]) * c["scaling"]).to(h.dtype)
                    return (new, *out[1:]) if isinstance(out, tuple) else new

                handles.append(block.layer[li].register_forward_hook(hook, with_kwargs=True))
    return handles


@torch.no_grad()
def reference_scores(model, tok, cases: list) -> list[float]:
    out = []
    for c in cases:
        enc, labels = tok(c["input"], return_tensors="pt"), tok(c["target"], return_tensors="pt").input_ids
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).logits
        out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).sum()))
    return out


def check_reference(src: str) -> None:
    """The float32-math hooks on a float32 model give the library's numbers: the reference is right."""
    model = T5ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    tok = load_backbone(src, device="cpu").tokenizer
    for name in FIXTURES:
        handles = fp32_hooks(model, name)
        got = reference_scores(model, tok, EXPECTED[name]["cases"])
        for h in handles:
            h.remove()
        worst = max(map(abs, _diff(got, [c["loglik"] for c in EXPECTED[name]["cases"]])))
        assert worst < 1e-4, (name, worst)


def main() -> None:
    src = str(GOLDEN / "backbone")
    check_reference(src)
    rows = []
    for dtype in ("float16", "bfloat16"):
        engine = Engine(load_backbone(src, device="cpu", dtype=dtype))
        model = T5ForConditionalGeneration.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
        for name in FIXTURES:
            engine.load(to_adapter(read_source(GOLDEN / name), name.replace("_", "-"), engine.backbone.fingerprint))
            cases = EXPECTED[name]["cases"]
            want = [c["loglik"] for c in cases]
            ours = [engine.score([name.replace("_", "-")], [c["input"]], [c["target"]]).scores[0] for c in cases]
            handles = fp32_hooks(model, name)
            try:
                theirs = reference_scores(model, engine.backbone.tokenizer, cases)
            finally:
                for h in handles:
                    h.remove()
            rows.append((dtype, name, max(map(abs, _diff(ours, want))), max(map(abs, _diff(theirs, want)))))
    print(f"{'dtype':9s} {'fixture':14s} {'kronserve':>10s} {'fp32 math':>10s}   max |loglik - float32 library|")
    for dtype, name, ours, theirs in rows:
        print(f"{dtype:9s} {name:14s} {ours:10.2e} {theirs:10.2e}")
    for dtype in ("float16", "bfloat16"):
        mine = [r for r in rows if r[0] == dtype]
        print(
            f"summary {dtype}: adapters in {dtype} max {max(r[2] for r in mine):.2e}, "
            f"in float32 max {max(r[3] for r in mine):.2e} (loglik nats, sums over 2-18 tokens)"
        )


def _diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


if __name__ == "__main__":
    main()
