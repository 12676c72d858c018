#!/usr/bin/env python
"""Build the golden test fixtures in tests/fixtures/golden/.

Runs in its OWN virtual environment (see scripts/golden/README.md and requirements.txt), never in the
project's: it needs transformers 4.57 + AdapterHub `adapters` 1.3.0 + `peft`, which the project does not use.

What it writes (all relative to the output folder, default <repo>/tests/fixtures/golden):

  backbone/                 tiny randomly initialised T5 v1 (safetensors) + ByT5 tokenizer files
  <adapter fixture>/        one directory per adapter, saved by the library itself (AdapterHub save_adapter,
                            PEFT save_pretrained); see FIXTURES below
  compacter_missing_rule/   a Compacter exactly as the buggy plain-T5 save writes it (no shared phm_rule)
  expected.json             configs, tensor keys/shapes, teacher-forced log-likelihoods and greedy ids

No network is used: the backbone is built from a T5Config with torch.manual_seed(0).
Every adapter parameter is perturbed (+ N(0, 0.2) from a per-fixture torch.Generator) before saving, so
each adapter clearly changes the model's outputs.

Every saved adapter is re-loaded by its library into a fresh backbone and must reproduce the scores
exactly, and the float32 scores must agree with a float64 re-run within COND_TOL (so that the fixtures are
well-conditioned and a 1e-4 comparison is meaningful); the script fails otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import adapters
import peft
import torch
import transformers
from adapters import (
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    MAMConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    T5AdapterModel,
)
from peft import LoraConfig, PeftModel, get_peft_model
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "golden"

EXPECTED_VERSIONS = {
    "torch": "2.13.0",
    "transformers": "4.57.6",
    "adapters": "1.3.0",
    "peft": "0.21.2",
}

NOISE_STD = 0.2
COND_TOL = 3e-5  # max |float32 - float64| allowed for any loglik or token logprob of a fixture

BACKBONE_CONFIG = dict(
    d_model=128,
    d_ff=128,
    d_kv=32,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=2,
    vocab_size=384,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)

CASES = [
    ("summarize: the cat sat on the mat", "cat on mat"),
    ("translate English to German: hello", "hallo"),
    ("question: what is 2+2? answer:", "4"),
    ("cola sentence: The boy quickly ran home.", "acceptable"),
]

MAX_NEW_TOKENS = 8

# (directory == adapter name, config factory, use_safetensors, noise seed[, noise std])
ADAPTERHUB_FIXTURES = [
    ("compacter", lambda: CompacterConfig(), False, 101),
    (
        "compacter_variant",
        lambda: CompacterConfig(
            reduction_factor=16, phm_rank=2, factorized_phm_rule=True, non_linearity="relu", leave_out=[1]
        ),
        True,
        102,
    ),
    ("compacterpp", lambda: CompacterPlusPlusConfig(), False, 103),
    ("compacterpp_variant", lambda: CompacterPlusPlusConfig(phm_dim=2, reduction_factor=8), False, 104),
    ("double_seq_bn", lambda: DoubleSeqBnConfig(), False, 105),
    (
        "double_seq_bn_variant",
        lambda: DoubleSeqBnConfig(reduction_factor=8, non_linearity="gelu", scaling=2.0),
        False,
        106,
    ),
    ("seq_bn", lambda: SeqBnConfig(), False, 107),
    (
        "seq_bn_variant",
        lambda: SeqBnConfig(reduction_factor=8, non_linearity="gelu_new", leave_out=[2]),
        True,
        108,
    ),
    ("par_bn", lambda: ParBnConfig(), False, 109),
    ("par_bn_variant", lambda: ParBnConfig(reduction_factor=8, scaling=2.0), False, 110),
    # residual_before_ln / original_ln_after on T5 (the adapter layer gets layer_norm=None there, so
    # original_ln_before/after only add the sublayer's residual x; f = the sublayer's output):
    # SeqBn with residual_before_ln=False and original_ln_after=False (AdapterPlus' residual choice):
    # x + f + A(x + f), the Pfeiffer form.
    (
        "seq_bn_residual_after_add",
        lambda: SeqBnConfig(residual_before_ln=False, original_ln_after=False),
        False,
        111,
    ),
    # Houlsby with residual_before_ln=False: without original_ln_before the residual is f either way.
    ("double_seq_bn_residual_false", lambda: DoubleSeqBnConfig(residual_before_ln=False), False, 112),
    # ParBn ignores original_ln_before and residual_before_ln (ParallelAdapter.pre_forward).
    (
        "par_bn_ln_options",
        lambda: ParBnConfig(original_ln_before=True, residual_before_ln=False),
        False,
        113,
    ),
    # SeqBn with residual_before_ln=False keeps original_ln_after=True: x is added twice,
    # 2x + f + A(x + f). Saved with the library's numbers; kronserve refuses it (KRONSERVE_REFUSES).
    ("seq_bn_residual_twice", lambda: SeqBnConfig(residual_before_ln=False), False, 115),
    # Extra: gelu (erf) vs gelu_new (tanh) moves the default-size fixtures' summed loglik by < 1e-4 only;
    # this one (larger noise, scaling 8) moves it by ~1.2e-3 (~1.3e-3 per token), so that mix-up is caught.
    ("compacter_gelu_probe", lambda: CompacterConfig(reduction_factor=8, scaling=8.0), False, 114, 0.5),
]

# Fixtures whose numbers are AdapterHub's own but that kronserve refuses by name (fixture -> the option the
# refusal names); the tests check the refusal, check_fixtures.py the numbers.
KRONSERVE_REFUSES = {"seq_bn_residual_twice": "residual_before_ln"}

PEFT_FIXTURES = [
    (
        "lora",
        lambda: LoraConfig(r=8, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"),
        201,
        NOISE_STD,
    ),
    (
        "lora_variant",
        lambda: LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q", "k", "v", "o", "wi", "wo"],
            use_rslora=True,
            task_type="SEQ_2_SEQ_LM",
        ),
        202,
        NOISE_STD,
    ),
]

# Prefix tuning and MAM (issue 17). Prefixes go through an MLP (tanh): their perturbation is larger, so that
# they move the scores; MAM's 800-wide MLP and its parallel adapter need less.
ADAPTERHUB_PREFIX_FIXTURES = [
    ("prefix", lambda: PrefixTuningConfig(prefix_length=5, bottleneck_size=64), False, 121, 0.5),
    (
        "prefix_self_only",
        lambda: PrefixTuningConfig(prefix_length=3, bottleneck_size=32, encoder_prefix=False, cross_prefix=False),
        False,  # AdapterHub 1.3.0 cannot save a prefix as safetensors: its pool is saved under every layer (shared)
        122,
        0.5,
    ),
    # Encoder layer 0 and decoder layer 1 left out: AdapterHub's stack-wide position bias then goes to zero in
    # encoder layer 1 (prefixed, unlike layer 0) and decoder layer 1 (not prefixed, unlike layer 0).
    (
        "prefix_leave_out",
        lambda: PrefixTuningConfig(prefix_length=7, bottleneck_size=32, leave_out=[0, 3]),
        False,
        123,
        0.5,
    ),
    ("prefix_flat", lambda: PrefixTuningConfig(prefix_length=4, flat=True), False, 124, 0.5),
    # MAMConfig's union with a smaller prefix MLP than its default (bottleneck 800, P 30): AdapterHub saves the pool
    # under all 7 attention paths, and the default would make a 4 MB fixture. The parallel adapter is the default.
    (
        "mam",
        lambda: MAMConfig(prefix_tuning=PrefixTuningConfig(prefix_length=10, bottleneck_size=32)),
        False,
        125,
        0.2,
    ),
]
PEFT_PREFIX_FIXTURES = [
    # The golden backbone's attention is 2 heads x d_kv 32 = 64 wide, not d_model (128): PEFT sizes the prefix by
    # token_dim, which must then be given.
    (
        "peft_prefix",
        lambda: PeftPrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5, token_dim=64, num_attention_heads=2
        ),
        131,
        0.5,
    ),
    (
        "peft_prefix_projection",
        lambda: PeftPrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM",
            num_virtual_tokens=6,
            token_dim=64,
            num_attention_heads=2,
            prefix_projection=True,
            encoder_hidden_size=32,
        ),
        132,
        0.5,
    ),
]

ADAPTERHUB_WEIGHTS = "pytorch_adapter.bin"
ADAPTERHUB_SAFE_WEIGHTS = "adapter.safetensors"


# --------------------------------------------------------------------------------------------------- helpers


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def check_versions(strict: bool) -> dict:
    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "adapters": adapters.__version__,
        "peft": peft.__version__,
    }
    bad = {k: (found[k], v) for k, v in EXPECTED_VERSIONS.items() if found[k] != v}
    if bad:
        msg = "library versions differ from scripts/golden/requirements.txt: " + ", ".join(
            f"{k} {f} (want {w})" for k, (f, w) in bad.items()
        )
        if strict:
            raise SystemExit(msg + " (use --allow-other-versions to go on anyway)")
        log("WARNING:", msg)
    found["torch_full"] = torch.__version__
    return found


def load_backbone() -> T5ForConditionalGeneration:
    # Relative path on purpose (cwd is the output folder): libraries record it in their configs
    # (PEFT base_model_name_or_path, AdapterHub model_name), and "backbone" is better than a machine path.
    model = T5ForConditionalGeneration.from_pretrained("backbone", torch_dtype=torch.float32)
    return model.eval()


def tensor_keys(path: Path) -> dict:
    """name -> shape of every tensor in a weights file, in file order (sorted for safetensors)."""
    if path.suffix == ".safetensors":
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = list(f.get_slice(k).get_shape())
        return out
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: list(v.shape) for k, v in sd.items()}


def tensor_dtypes(path: Path) -> list:
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})


def file_info(d: Path) -> dict:
    out = {}
    for p in sorted(d.iterdir()):
        if p.is_file():
            out[p.name] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    return out


def library_greedy(model, enc) -> list:
    """The library's own greedy `generate`, with its decoder start token."""
    gen = model.generate(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        max_new_tokens=MAX_NEW_TOKENS,
        num_beams=1,
        do_sample=False,
    )
    seq = gen[0] if isinstance(gen, torch.Tensor) else gen.sequences[0]
    return [int(i) for i in seq]


@torch.no_grad()
def score_cases(model, tok, greedy=library_greedy) -> list:
    cases = []
    for src, tgt in CASES:
        enc = tok(src, return_tensors="pt")
        labels = tok(tgt, return_tensors="pt").input_ids
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        tok_lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)[0]
        ids = greedy(model, enc)
        cases.append(
            {
                "input": src,
                "target": tgt,
                "input_ids": [int(i) for i in enc.input_ids[0]],
                "target_ids": [int(i) for i in labels[0]],
                "loglik": float(tok_lp.sum()),
                "token_logprobs": [float(x) for x in tok_lp],
                "greedy_ids": ids,
                "greedy_text": tok.decode(ids, skip_special_tokens=True),
            }
        )
    return cases


@torch.no_grad()
def add_float64_reference(model, tok, cases: list, what: str):
    """Score again in float64 (the model is converted in place) and require the float32 numbers to be close to
    it: a fixture whose float32 result depends on summation order (saturated attention etc.) would make any
    1e-4 comparison meaningless."""
    model.double()
    worst = 0.0
    for c in cases:
        enc = tok(c["input"], return_tensors="pt")
        labels = tok(c["target"], return_tensors="pt").input_ids
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
        tlp = torch.log_softmax(out.logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)[0]
        c["loglik_float64"] = float(tlp.sum())
        worst = max(worst, abs(c["loglik_float64"] - c["loglik"]))
        worst = max(worst, max(abs(a - b) for a, b in zip(tlp.tolist(), c["token_logprobs"])))
    if worst > COND_TOL:
        raise SystemExit(f"{what}: float32 vs float64 differ by {worst:.2e} > {COND_TOL}: ill-conditioned fixture")
    return worst


def assert_same_cases(a: list, b: list, what: str, tol: float = 1e-5):
    for ca, cb in zip(a, b, strict=True):
        if abs(ca["loglik"] - cb["loglik"]) > tol or ca["greedy_ids"] != cb["greedy_ids"]:
            raise SystemExit(
                f"{what}: scores differ: {ca['loglik']} vs {cb['loglik']}, {ca['greedy_ids']} vs {cb['greedy_ids']}"
            )


@torch.no_grad()
def perturb(named_params: list, seed: int, std: float = NOISE_STD) -> list:
    """Add N(0, std) to every given parameter (zero-initialised ones thereby become random)."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    for name, p in sorted(named_params, key=lambda x: x[0]):
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        names.append(name)
    return names


def adapterhub_params(model, name: str) -> list:
    return [
        (n, p)
        for n, p in model.named_parameters()
        if f".adapters.{name}." in f".{n}" or f"shared_parameters.{name}." in n or f".prefix_tunings.{name}." in f".{n}"
    ]


def shared_state(model, name: str) -> dict:
    """The adapter's shared parameters under the exact key a plain T5ForConditionalGeneration's
    state_dict uses (its base_model is the model itself, so there is no 'transformer.' prefix)."""
    pre = f"shared_parameters.{name}."
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.startswith(pre)}


def add_tensors_to_weights_file(path: Path, extra: dict):
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
        sd.update(extra)
        save_file(sd, str(path))  # the library also calls save_file(state_dict, file) without metadata
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        sd.update(extra)
        torch.save(sd, str(path))


def head_info(d: Path, model) -> dict:
    """AdapterHub save_adapter() from a static-head model (T5ForConditionalGeneration) also writes the LM head
    (head_config.json + pytorch_model_head.bin / model_head.safetensors). Record it and check that it is just
    the backbone's tied lm_head (== shared embedding), i.e. carries nothing adapter-specific."""
    files = sorted(p.name for p in d.iterdir() if "head" in p.name)
    wf = [d / n for n in ("pytorch_model_head.bin", "model_head.safetensors") if (d / n).exists()]
    if not wf:
        return {"head_files": files, "head_keys": {}}
    keys = tensor_keys(wf[0])
    sd = (
        load_file(str(wf[0]))
        if wf[0].suffix == ".safetensors"
        else torch.load(str(wf[0]), map_location="cpu", weights_only=True)
    )
    shared = model.get_input_embeddings().weight.detach()
    # A prefix's pool is not part of the base model, so the head save carries a copy of it too.
    pool = {k for k in sd if k.startswith("prefix_tuning.prefix_tunings.")}
    equal = set(sd) - pool == {"lm_head.weight"} and torch.equal(sd["lm_head.weight"], shared)
    if not equal:
        raise SystemExit(f"{d.name}: head file is not just the tied lm_head")
    info = {"head_files": files, "head_keys": keys, "head_is_backbone_shared_embedding": True}
    if pool:
        info["head_also_holds_prefix_pool_keys"] = sorted(pool)
    return info


def read_json(p: Path):
    with open(p, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------- steps


def build_backbone(out: Path, tok_dir: Path) -> dict:
    cfg = T5Config(**BACKBONE_CONFIG)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(tok_dir), safe_serialization=True)
    tok = ByT5Tokenizer()
    tok.save_pretrained(str(tok_dir))
    return {"in_memory_model": model, "tokenizer": tok}


def adapterhub_fixture(
    out: Path, tok, name: str, cfg_factory, use_safetensors: bool, seed: int, entries: dict, std: float = NOISE_STD
):
    log(f"[adapterhub] {name}")
    model = load_backbone()
    adapters.init(model)
    cfg = cfg_factory()
    torch.manual_seed(seed)  # the library's own init draws from the global RNG
    model.add_adapter(name, config=cfg)
    model.set_active_adapters(name)
    model.eval()
    model.float()
    perturbed = perturb(adapterhub_params(model, name), seed, std)
    d = out / name
    model.save_adapter(str(d), name, use_safetensors=use_safetensors)
    wfile = d / (ADAPTERHUB_SAFE_WEIGHTS if use_safetensors else ADAPTERHUB_WEIGHTS)
    saved = tensor_keys(wfile)

    # Every perturbed parameter except the shared ones must have been saved by the library (a prefix's pool is
    # saved under every layer that reaches it: any path will do).
    missing_non_shared = [
        n
        for n in perturbed
        if n not in saved
        and not n.startswith("shared_parameters.")
        and not any(k.endswith(n.split("prefix_tuning.", 1)[-1]) for k in saved if ".prefix_tunings." in n)
    ]
    if missing_non_shared:
        raise SystemExit(f"{name}: library did not save {missing_non_shared}")

    provenance = f"AdapterHub adapters {adapters.__version__} save_adapter() from a plain T5ForConditionalGeneration"
    rule_note = None
    is_phm = bool(getattr(cfg, "phm_layer", False))
    if is_phm and cfg["shared_phm_rule"]:
        shared = shared_state(model, name)
        absent = {k: v for k, v in shared.items() if k not in saved}
        if absent:
            if name == "compacter":
                # keep the buggy save exactly as the library wrote it, for the refusal test
                model.save_adapter(str(out / "compacter_missing_rule"), name, use_safetensors=use_safetensors)
            add_tensors_to_weights_file(wfile, absent)
            rule_note = (
                "library save dropped " + ", ".join(sorted(absent)) + "; make_fixtures.py added them to "
                f"{wfile.name} under the plain model's own state_dict key(s) (no 'transformer.' prefix), which "
                "the library's load_adapter() loads back into a plain T5ForConditionalGeneration"
            )
            provenance += "; shared phm rule tensor(s) added afterwards by make_fixtures.py (library bug)"
        else:
            rule_note = "library saved the shared phm rule itself (bug not present in this version)"
    cases = score_cases(model, tok)

    # Round trip through the library: fresh backbone, load_adapter, same numbers.
    m2 = load_backbone()
    adapters.init(m2)
    loaded = m2.load_adapter(str(d), set_active=True, use_safetensors=use_safetensors)
    m2.eval()
    assert loaded == name, loaded
    assert_same_cases(cases, score_cases(m2, tok), f"{name} library reload")
    f64 = add_float64_reference(m2, tok, cases, name)

    entries[name] = {
        "dir": name,
        "format": "adapterhub",
        "adapterhub_config_class": type(cfg).__name__,
        "noise": {"seed": seed, "std": std},
        "weights_file": wfile.name,
        "provenance": provenance,
        "shared_phm_rule_note": rule_note,
        "library_config": read_json(d / "adapter_config.json"),
        "keys": tensor_keys(wfile),
        "dtypes": tensor_dtypes(wfile),
        **head_info(d, model),
        "float32_vs_float64_max_abs": f64,
        "cases": cases,
    }
    return model


def adapterhub_special_compacters(out: Path, tok, entries: dict, compacter_model):
    name = "compacter"
    # 1) compacter_missing_rule: written by adapterhub_fixture() with the buggy save.
    d = out / "compacter_missing_rule"
    wfile = d / ADAPTERHUB_WEIGHTS
    keys = tensor_keys(wfile)
    assert not any("shared_parameters" in k for k in keys), "expected the buggy save to drop phm_rule"
    # What the library itself does with it: it loads it silently, keeping a freshly initialised rule.
    m2 = load_backbone()
    adapters.init(m2)
    m2.load_adapter(str(d), set_active=True)
    m2.eval()
    silently = score_cases(m2, tok)
    entries["compacter_missing_rule"] = {
        "dir": "compacter_missing_rule",
        "format": "adapterhub",
        "adapterhub_config_class": "CompacterConfig",
        "weights_file": wfile.name,
        "provenance": "exactly what AdapterHub adapters save_adapter() writes for the 'compacter' fixture's "
        "model (plain T5ForConditionalGeneration): the shared phm_rule is silently dropped",
        "expect_refusal": True,
        "expected_error": "config has shared_phm_rule=true but the weights file has no "
        "shared_parameters.compacter.phm_rule (with or without a 'transformer.' prefix)",
        "library_config": read_json(d / "adapter_config.json"),
        "keys": keys,
        "dtypes": tensor_dtypes(wfile),
        **head_info(d, compacter_model),
        "cases": None,
        "library_silent_load_loglik_NOT_A_REFERENCE": [c["loglik"] for c in silently],
    }

    # 2) compacter_adaptermodel: the same adapter saved from adapters' own T5AdapterModel, which keeps the
    #    shared rule, and prefixes every key with 'transformer.'.
    log("[adapterhub] compacter_adaptermodel")
    am = T5AdapterModel.from_pretrained("backbone")
    am.add_adapter(name, config=CompacterConfig())
    am.eval()
    src = {
        k: v
        for k, v in compacter_model.state_dict().items()
        if f".adapters.{name}." in k or k.startswith(f"shared_parameters.{name}.")
    }
    tgt = am.state_dict()
    with torch.no_grad():
        for k, v in src.items():
            tgt["transformer." + k].copy_(v)
    d = out / "compacter_adaptermodel"
    am.save_adapter(str(d), name)
    wfile = d / ADAPTERHUB_WEIGHTS
    keys = tensor_keys(wfile)
    sd = torch.load(str(wfile), map_location="cpu", weights_only=True)
    assert set(sd) == {"transformer." + k for k in src}, "unexpected key set from T5AdapterModel"
    for k, v in src.items():
        assert torch.equal(sd["transformer." + k], v)
    # Numbers: load it with the library into a plain T5ForConditionalGeneration (the loader strips the
    # 'transformer.' prefix there) and score.
    m2 = load_backbone()
    adapters.init(m2)
    m2.load_adapter(str(d), set_active=True)
    m2.eval()
    cases = score_cases(m2, tok)
    assert_same_cases(entries["compacter"]["cases"], cases, "compacter_adaptermodel vs compacter")
    f64 = add_float64_reference(m2, tok, cases, "compacter_adaptermodel")
    entries["compacter_adaptermodel"] = {
        "dir": "compacter_adaptermodel",
        "format": "adapterhub",
        "adapterhub_config_class": "CompacterConfig",
        "weights_file": wfile.name,
        "provenance": "the 'compacter' fixture's tensors saved by save_adapter() from adapters.T5AdapterModel "
        "(keeps the shared rule; every key carries the 'transformer.' prefix); scores = library "
        "load_adapter() of this dir into a plain T5ForConditionalGeneration",
        "same_weights_as": "compacter",
        "float32_vs_float64_max_abs": f64,
        "library_config": read_json(d / "adapter_config.json"),
        "keys": keys,
        "dtypes": tensor_dtypes(wfile),
        **head_info(d, compacter_model),
        "cases": cases,
    }


def adapterhub_post_add_fails(out: Path, entries: dict):
    """residual_before_ln="post_add" is accepted by the config and saved, but AdapterHub's own forward fails on
    T5 (Adapter.pre_forward only sets the residual for "post_add" when the layer passes a layer_norm, which
    T5's layers never do). Saved so the refusal can be tested; the failure is asserted here."""
    name = "seq_bn_post_add"
    log(f"[adapterhub] {name}")
    model = load_backbone()
    adapters.init(model)
    model.add_adapter(name, config=SeqBnConfig(residual_before_ln="post_add"))
    model.set_active_adapters(name)
    model.eval()
    d = out / name
    model.save_adapter(str(d), name)
    ids = torch.tensor([[5, 6, 1]])
    try:
        model(input_ids=ids, labels=ids)
    except UnboundLocalError as e:
        error = f"{type(e).__name__}: {e}"
    else:
        raise SystemExit(f"{name}: AdapterHub's forward no longer fails on T5; serve it instead of refusing it")
    wfile = d / ADAPTERHUB_WEIGHTS
    entries[name] = {
        "dir": name,
        "format": "adapterhub",
        "adapterhub_config_class": "SeqBnConfig",
        "weights_file": wfile.name,
        "provenance": f"AdapterHub adapters {adapters.__version__} save_adapter(); the library's forward on T5 "
        f"raises {error}",
        "expect_refusal": True,
        "kronserve_refuses": "residual_before_ln",
        "library_config": read_json(d / "adapter_config.json"),
        "keys": tensor_keys(wfile),
        "dtypes": tensor_dtypes(wfile),
        **head_info(d, model),
        "cases": None,
    }


def peft_fixture(
    out: Path,
    tok,
    name: str,
    cfg_factory,
    seed: int,
    std: float,
    entries: dict,
    trained: str = "lora_",
    scorer=score_cases,
    notes: dict | None = None,
):
    """A PEFT adapter: the parameters whose names hold `trained` perturbed, scored by `scorer`, saved, reloaded."""
    log(f"[peft] {name}")
    base = load_backbone()
    torch.manual_seed(seed)  # PEFT's init (lora_A, the prompt encoder) draws from the global RNG
    pm = get_peft_model(base, cfg_factory())
    pm.eval()
    perturb([(n, p) for n, p in pm.named_parameters() if trained in n], seed, std)
    cases = scorer(pm, tok)
    d = out / name
    pm.save_pretrained(str(d))
    wfile = d / "adapter_model.safetensors"
    # Round trip through PEFT.
    pm2 = PeftModel.from_pretrained(load_backbone(), str(d)).eval()
    assert_same_cases(cases, scorer(pm2, tok), f"{name} PEFT reload")
    f64 = add_float64_reference(pm2, tok, cases, name)
    notes = notes or {"on": "lora_A (after PEFT's kaiming init) and lora_B (zero-init)"}
    entries[name] = {
        "dir": name,
        "format": "peft",
        "noise": {"seed": seed, "std": std, "on": notes["on"]},
        "float32_vs_float64_max_abs": f64,
        "weights_file": wfile.name,
        "provenance": f"PEFT {peft.__version__} PeftModel.save_pretrained()",
        **{k: v for k, v in notes.items() if k != "on"},
        "library_config": read_json(d / "adapter_config.json"),
        "keys": tensor_keys(wfile),
        "dtypes": tensor_dtypes(wfile),
        "cases": cases,
    }


def adapterhub_ejected_prefix(out: Path, tok, entries: dict, prefix_model):
    """The `prefix` fixture's model after `eject_prefix_tuning`: the MLP replaced by its output (a flat
    `control_trans`), saved as `prefix_ejected`; its numbers must be the `prefix` fixture's."""
    name, d = "prefix", out / "prefix_ejected"
    log("[adapterhub] prefix_ejected")
    eject_prefix(prefix_model, name)
    prefix_model.eval()
    cases = score_cases(prefix_model, tok)
    assert_same_cases(entries[name]["cases"], cases, "prefix_ejected vs prefix")
    prefix_model.save_adapter(str(d), name)
    # The save keeps `"flat": false` in adapter_config.json beside the flat weights, so the library's own
    # load_adapter rebuilds an MLP and drops them: the reload is checked from a copy that says `"flat": true`.
    assert read_json(d / "adapter_config.json")["config"]["flat"] is False
    fixed = out / "_prefix_ejected_flat_true"
    shutil.copytree(d, fixed)
    cfg = read_json(fixed / "adapter_config.json")
    cfg["config"]["flat"] = True
    (fixed / "adapter_config.json").write_text(json.dumps(cfg))
    m2 = load_backbone()
    adapters.init(m2)
    m2.load_adapter(str(fixed), set_active=True)
    m2.eval()
    shutil.rmtree(fixed)
    assert_same_cases(cases, score_cases(m2, tok), "prefix_ejected library reload (flat: true)")
    f64 = add_float64_reference(m2, tok, cases, "prefix_ejected")
    wfile = d / ADAPTERHUB_WEIGHTS
    entries["prefix_ejected"] = {
        "dir": "prefix_ejected",
        "format": "adapterhub",
        "adapterhub_config_class": "PrefixTuningConfig",
        "noise": entries[name]["noise"],
        "weights_file": wfile.name,
        "provenance": f"the 'prefix' fixture's model after ejection (adapters {adapters.__version__}'s own "
        "eject_prefix_tuning fails on this backbone, d_model != heads x d_kv; make_fixtures.eject_prefix does "
        "what PrefixTuningGroup.eject does), then save_adapter(); the save says flat: false beside flat weights "
        "(the library's own reload then drops them): read by key shapes",
        "library_config": read_json(d / "adapter_config.json"),
        "keys": tensor_keys(wfile),
        "dtypes": tensor_dtypes(wfile),
        **head_info(d, prefix_model),
        "float32_vs_float64_max_abs": f64,
        "cases": cases,
    }


def eject_prefix(model, name: str) -> None:
    """`model.eject_prefix_tuning(name)`, done by hand where adapters 1.3.0's own fails: `PrefixTuning.eject` views its
    output with the hidden size (d_model), which only fits when d_model = heads x d_kv (t5-small, t5-base; not this
    backbone, 128 vs 2 x 32). The replacement is what `PrefixTuningGroup.eject` does: each location's module becomes a
    FlatPrefixTuning whose `control_trans` is the MLP's output, flattened."""
    from adapters.methods.prefix_tuning import FlatPrefixTuning, PrefixTuning

    for group in (m.prefix_tunings[name] for m in model.modules() if hasattr(m, "prefix_tunings")):
        for location, module in list(group.items()):
            if not isinstance(module, PrefixTuning):
                continue
            with torch.no_grad():
                tokens = torch.arange(module.config.prefix_length).unsqueeze(0)
                weights = module.control_trans(module.wte(tokens)).reshape(-1)
            flat = FlatPrefixTuning(
                module.n_layers, module.n_heads, module.input_size, module.config.replace(flat=True),
                module.n_embd_per_head,
            )  # fmt: skip
            flat.control_trans = torch.nn.Parameter(weights)
            group[location] = flat


def manual_greedy(model, enc) -> list:
    """Greedy ids by re-running the teacher-forced forward on the whole decoder prefix at every step (no cache):
    PEFT's own generate ignores or mis-masks a T5 prefix, its forward does not."""
    ids = [0]
    for _ in range(MAX_NEW_TOKENS):
        logits = model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, decoder_input_ids=torch.tensor([ids])
        ).logits
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == 1:
            break
    return ids


def peft_prefix_cases(model, tok) -> list:
    return score_cases(model, tok, manual_greedy)


def main():
    # PEFT keeps target_modules in a set: pin the hash seed so adapter_config.json is byte-reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--allow-other-versions", action="store_true")
    args = ap.parse_args()

    versions = check_versions(strict=not args.allow_other_versions)
    torch.set_num_threads(1)  # steadier float summation order between runs
    transformers.logging.set_verbosity_error()

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.chdir(out)

    built = build_backbone(out, out / "backbone")
    tok = ByT5Tokenizer.from_pretrained("backbone")
    entries = {}

    bare = load_backbone()
    bare_cases = score_cases(bare, tok)
    assert_same_cases(bare_cases, score_cases(built["in_memory_model"], tok), "bare reload")
    bare_f64 = add_float64_reference(built["in_memory_model"], tok, bare_cases, "bare")
    entries["bare"] = {
        "dir": "backbone",
        "format": "hf_t5_backbone",
        "weights_file": "model.safetensors",
        "provenance": f"T5ForConditionalGeneration(T5Config(...)) after torch.manual_seed(0), "
        f"save_pretrained(safe_serialization=True), transformers {transformers.__version__}; "
        "ByT5Tokenizer().save_pretrained()",
        "library_config": read_json(out / "backbone" / "config.json"),
        "keys": tensor_keys(out / "backbone" / "model.safetensors"),
        "dtypes": tensor_dtypes(out / "backbone" / "model.safetensors"),
        "float32_vs_float64_max_abs": bare_f64,
        "cases": bare_cases,
    }

    compacter_model = None
    for name, factory, safe, seed, *std in ADAPTERHUB_FIXTURES:
        m = adapterhub_fixture(out, tok, name, factory, safe, seed, entries, *std)
        if name == "compacter":
            compacter_model = m
    adapterhub_special_compacters(out, tok, entries, compacter_model)
    for name, option in KRONSERVE_REFUSES.items():
        entries[name]["kronserve_refuses"] = option
    adapterhub_post_add_fails(out, entries)
    for name, factory, seed, std in PEFT_FIXTURES:
        peft_fixture(out, tok, name, factory, seed, std, entries)
    prefix_model = None
    for name, factory, safe, seed, std in ADAPTERHUB_PREFIX_FIXTURES:
        m = adapterhub_fixture(out, tok, name, factory, safe, seed, entries, std)
        if name == "prefix":
            prefix_model = m
    adapterhub_ejected_prefix(out, tok, entries, prefix_model)
    prefix_notes = {
        "on": "every prompt_encoder parameter",
        "greedy": "manual greedy loop over PEFT's teacher-forced forward (no cache); PEFT's generate is not used",
    }
    for name, factory, seed, std in PEFT_PREFIX_FIXTURES:
        peft_fixture(out, tok, name, factory, seed, std, entries, "prompt_encoder", peft_prefix_cases, prefix_notes)

    # Every adapter must clearly move the numbers away from the bare backbone.
    for name, e in entries.items():
        if name == "bare" or not e.get("cases"):
            continue
        delta = max(abs(a["loglik"] - b["loglik"]) for a, b in zip(e["cases"], bare_cases))
        e["max_abs_loglik_delta_vs_bare"] = delta
        if delta < 0.5:
            raise SystemExit(f"{name}: adapter barely changes outputs (max |dloglik| = {delta})")

    for e in entries.values():
        e["files"] = file_info(out / e["dir"])

    expected = {
        "generator": "scripts/golden/make_fixtures.py",
        "versions": versions,
        "backbone_config_kwargs": BACKBONE_CONFIG,
        "backbone_seed": 0,
        "noise": f"every adapter parameter += N(0, {NOISE_STD}) from torch.Generator().manual_seed(seed), "
        "parameters visited in sorted name order",
        "scoring": {
            "dtype": "float32",
            "tokenizer": "ByT5Tokenizer (backbone/), input and target tokenized separately, both end with EOS=1",
            "loglik": "sum over target tokens (EOS included) of log_softmax(model(input_ids, attention_mask, "
            "labels=target_ids).logits) gathered at target_ids; one example at a time, no padding",
            "greedy": f"model.generate(input_ids, attention_mask, max_new_tokens={MAX_NEW_TOKENS}, num_beams=1, "
            "do_sample=False).sequences[0] incl. the leading decoder_start_token_id 0; greedy_text = "
            "decode(skip_special_tokens=True)",
        },
        "fixtures": entries,
    }
    with open(out / "expected.json", "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, sort_keys=False)
        f.write("\n")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            log(f"{p.stat().st_size:>9}  {p.relative_to(out)}")
    log("done:", out)


if __name__ == "__main__":
    main()
