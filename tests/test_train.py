"""The trainer: it learns, what it saves is what the server serves, and bad data is refused up front."""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import typer
from typer.testing import CliRunner

import kronserve_client
from kronserve.backbone import load_backbone
from kronserve.cli import train_command
from kronserve.engine import Engine
from kronserve.errors import InvalidRequest, KronserveError
from kronserve.formats.native import AdapterFile, load
from kronserve.methods import init_tensors, preset
from kronserve.plan import Route
from kronserve.t5_sites import base_norms
from kronserve.train import (
    Example,
    TrainablePlan,
    TrainConfig,
    TrainResult,
    open_session,
    read_examples,
    run_epoch,
    train,
    upload,
)

from .conftest import held_slots

CHANCE = 0.5  # the majority task's labels are balanced by symmetry (a-m and n-z have 13 letters each)


def majority_task(n: int, seed: int = 1) -> list[dict[str, str]]:
    """Five random letters; "yes" when most are in a-m. Needs every position, not one lucky token."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
        rows.append({"input": text, "target": "yes" if sum(c <= "m" for c in text) >= 3 else "no"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny T5 gains nothing from a second thread, and on a busy 2-core box OpenMP barriers can cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """Compacter with per-task layer norms: gradients through the Kronecker sums and the routed norms."""
    tmp = tmp_path_factory.mktemp("train")
    data = write_jsonl(tmp / "majority.jsonl", majority_task(300))
    # lr 5e-2: the paper's init starts the shared rule at N(0, 1e-4), so on this tiny random backbone the
    # adapter needs a larger step than the paper's 3e-3 on t5-base to leave zero within 15 epochs.
    config = TrainConfig(
        method="compacter", layer_norms=True, epochs=15, lr=5e-2, eval_fraction=0.2, device="cpu", progress=False
    )
    return train(str(tiny_dir), data, "majority", tmp / "majority.safetensors", config)


def test_training_lowers_the_loss_and_beats_chance_on_held_out_rows(trained: TrainResult) -> None:
    s = trained.summary()
    assert s["train_examples"] == 240 and s["eval_examples"] == 60
    assert s["final_train_loss"] < s["first_epoch_loss"] / 10
    assert s["best_eval_accuracy"] >= CHANCE + 0.3
    labels = [e.target for e in trained.eval_examples]
    assert max(labels.count("yes"), labels.count("no")) / len(labels) <= 0.6  # no majority class to coast on
    hits = sum(p == e.target for p, e in zip(trained.eval_predictions, trained.eval_examples, strict=True))
    assert hits / len(labels) == s["best_eval_accuracy"]
    assert s["params"] == trained.adapter.spec.param_count(trained.adapter.geometry)
    assert 1 <= s["best_epoch"] <= s["epochs_run"] <= 15


def test_server_reproduces_the_trainers_held_out_predictions(trained: TrainResult, tiny_dir: Path) -> None:
    backbone = load_backbone(str(tiny_dir), device="cpu")
    adapter = load(trained.path, backbone.fingerprint)
    assert adapter.task == "majority" and adapter.spec == trained.adapter.spec
    assert all(torch.equal(adapter.tensors[n], t) for n, t in trained.adapter.tensors.items())
    engine = Engine(backbone)
    engine.load(adapter)
    inputs = [e.input for e in trained.eval_examples]
    outputs = engine.generate(["majority"] * len(inputs), inputs, max_new_tokens=trained.max_new_tokens).outputs
    assert outputs == trained.eval_predictions


def test_only_the_adapter_trains(tiny_dir: Path) -> None:
    session = open_session(str(tiny_dir), TrainConfig(device="cpu"), preset("compacter++", layer_norms=True))
    model = session.backbone.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = session.plan.snapshot()
    optimizer = torch.optim.AdamW(session.plan.parameters(), lr=1e-2)
    run_epoch(session, optimizer, [Example(r["input"], r["target"]) for r in majority_task(8)], batch_size=4)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())
    changed = {n for n, t in session.plan.snapshot().items() if not torch.equal(t, before[n])}
    assert "phm_rule" in changed and "layer_norm.decoder.final" in changed
    assert changed == set(before)  # every tensor of the file gets a gradient


def test_summary_has_the_history_of_every_epoch_and_the_start(trained: TrainResult) -> None:
    s = trained.summary()
    assert [h["epoch"] for h in s["history"]] == list(range(1, s["epochs_run"] + 1))
    assert s["history"][0]["train_loss"] == s["first_epoch_loss"]
    assert s["history"][-1]["train_loss"] == s["final_train_loss"]
    best = s["history"][s["best_epoch"] - 1]
    assert (best["eval_accuracy"], best["eval_loss"]) == (s["best_eval_accuracy"], s["best_eval_loss"])
    assert s["start_eval_accuracy"] < CHANCE < s["best_eval_accuracy"] and s["improved"] is True
    assert s["start_eval_loss"] > best["eval_loss"] and s["steps"] == 15 * s["epochs_run"]  # 240 rows / 16


def test_max_steps_stops_mid_epoch(tiny_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", majority_task(40))  # 36 train rows: 3 steps an epoch at batch 16
    config = TrainConfig(epochs=5, max_steps=4, eval_fraction=0.1, device="cpu", progress=False)
    result = train(str(tiny_dir), data, "t", tmp_path / "a.safetensors", config)
    assert result.summary()["steps"] == 4 and result.summary()["epochs_run"] == 2
    with pytest.raises(InvalidRequest, match="max steps must be at least 1"):
        TrainConfig(max_steps=0).check()


def test_early_stopping_and_no_held_out_split(tiny_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", majority_task(24))
    stuck = TrainConfig(epochs=6, lr=1e-9, patience=2, eval_fraction=0.25, device="cpu", progress=False)
    result = train(str(tiny_dir), data, "t", tmp_path / "a.safetensors", stuck)
    assert [h.eval_accuracy for h in result.history] == [0.0, 0.0, 0.0]  # no gain after epoch 1: stop after 2 more
    assert result.summary()["epochs_run"] == 3 and 1 <= result.best_epoch <= 3
    blind = TrainConfig(epochs=2, eval_fraction=0.0, device="cpu", progress=False)
    result = train(str(tiny_dir), data, "t", tmp_path / "sub" / "b.safetensors", blind)
    assert result.summary()["best_eval_accuracy"] is None and result.best_epoch == 2 and not result.eval_examples
    assert result.improved is None and result.summary()["start_eval_accuracy"] is None  # nothing to judge by
    assert load(tmp_path / "sub" / "b.safetensors").tensors.keys() == result.adapter.tensors.keys()


PLAN_CASES = [
    ("compacter", {"layer_norms": True}),
    ("compacter++", {"placement": "pfeiffer", "factorized_rule": True}),
    ("phm", {"reduction_factor": 16, "activation": "relu"}),
    ("houlsby", {"placement": "parallel", "scaling": 0.5, "sites": ("mh", "cross", "ffn")}),
    ("pfeiffer", {"activation": "gelu"}),
    ("lora", {"targets": ("q", "v", "wo")}),
]


@pytest.mark.parametrize(("method", "overrides"), PLAN_CASES)
def test_trainable_plan_equals_the_servers_plan(backbone, method: str, overrides: dict) -> None:
    fp = backbone.fingerprint
    geometry = fp.geometry
    spec = preset(method, **overrides)
    norms = {k: v.float() for k, v in base_norms(backbone.model).items()}
    tensors = init_tensors(spec, geometry, seed=3, std=0.3, base_norms=norms)
    engine = Engine(backbone)
    engine.load(AdapterFile("t", spec, fp, tensors))
    (slot,) = held_slots(engine, ["t"])
    served = engine.device.plan(Route.of([slot, slot]))
    mine = TrainablePlan(spec, geometry, tensors, torch.device("cpu"))
    d = geometry.d_model
    for i, _ in enumerate(geometry.all_sites()):
        assert mine.acts_at(i) == served.acts_at(i)
        if served.acts_at(i):
            x, f = torch.randn(2, 5, d), torch.randn(2, 5, d)
            torch.testing.assert_close(mine.delta(i, x, f), served.delta(i, x, f), atol=1e-5, rtol=1e-5)
    for i, name in enumerate(geometry.all_linears()):
        assert mine.lora_acts_at(i) == served.lora_acts_at(i)
        if served.lora_acts_at(i):
            x = torch.randn(2, 5, geometry.linear_shape(name)[0])
            torch.testing.assert_close(mine.lora_delta(i, x), served.lora_delta(i, x), atol=1e-5, rtol=1e-5)
    assert mine.use_norms == served.use_norms == spec.layer_norms
    if spec.layer_norms:
        for i, _ in enumerate(geometry.all_norms()):
            assert torch.equal(mine.norm_weight(i).expand(2, 1, d), served.norm_weight(i))


def test_csv_quoting_and_jsonl_line_separators_are_read_as_written(tmp_path: Path) -> None:
    csv_file = tmp_path / "q.csv"
    csv_file.write_text('input,target\n"a\nb, c",x\r\nd,"e ""q"""\n')
    assert read_examples(csv_file) == [Example("a\nb, c", "x"), Example("d", 'e "q"')]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"input": "a\u2028b", "target": "x"}\r\n\n{"input": "c", "target": "y"}')
    assert read_examples(jsonl) == [Example("a\u2028b", "x"), Example("c", "y")]


BAD_FILES = [
    ("absent.jsonl", None, "does not exist"),
    ("data.txt", "input,target\na,b\n", "must end in .jsonl or .csv"),
    ("empty.jsonl", "\n\n", "holds no examples"),
    ("header-only.csv", "input,target\n", "holds no examples"),
    ("blank.csv", "", r"columns input,target; missing \['input', 'target'\]"),
    ("cols.csv", "question,answer\na,b\n", r"missing \['input', 'target'\]"),
    ("short.csv", "input,target\na,b\nc\n", "short.csv line 3 has no 'target'"),
    ("notjson.jsonl", '{"input": "a", "target": "b"}\n{input: a}\n', "line 2 is not JSON"),
    ("list.jsonl", '["a", "b"]\n', "line 1 must be an object"),
    ("nokey.jsonl", '{"input": "a", "output": "b"}\n', "line 1 has no 'target'"),
    ("number.jsonl", '{"input": "a", "target": 3}\n', "'target' must be a string, got int"),
    ("latin1.csv", b"input,target\ncaf\xe9,x\n", "is not UTF-8"),
    ("one.jsonl", '{"input": "a", "target": "b"}\n', "leave none to train on"),
]


def test_an_output_directory_is_refused_up_front(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", majority_task(10))
    with pytest.raises(InvalidRequest, match="is a directory"):
        train("no-backbone-needed", data, "t", tmp_path)


@pytest.mark.parametrize(("name", "content", "match"), BAD_FILES)
def test_bad_data_is_refused_before_any_training(tmp_path: Path, name: str, content, match: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out.safetensors"
    with pytest.raises(InvalidRequest, match=match):
        train("no-backbone-needed", path, "t", out)  # the backbone is never loaded: data is checked first
    assert not out.exists()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (TrainConfig(epochs=0), "epochs must be at least 1"),
        (TrainConfig(lr=float("nan")), "learning rate"),
        (TrainConfig(eval_fraction=1.0), r"eval fraction must be in \[0, 1\)"),
        (TrainConfig(patience=0), "patience"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, config: TrainConfig, match: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", majority_task(10))
    with pytest.raises(InvalidRequest, match=match):
        train("no-backbone-needed", data, "t", tmp_path / "out.safetensors", config)


def fake_server(monkeypatch: pytest.MonkeyPatch, status: int, body: dict) -> list[httpx.Request]:
    """Route every `KronserveClient` the trainer builds to a scripted reply; returns the requests it saw."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    real = kronserve_client.KronserveClient

    def client(url: str, token: str | None = None) -> kronserve_client.KronserveClient:
        return real(url, token=token, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(kronserve_client, "KronserveClient", client)
    return seen


def test_command_trains_from_csv_writes_the_file_and_uploads_it(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d.csv"
    data.write_text("input,target\n" + "".join(f"{r['input']},{r['target']}\n" for r in majority_task(40)))
    out = tmp_path / "cli.safetensors"
    seen = fake_server(
        monkeypatch, 201, {"task": "maj", "version": 7, "method": "compacter++", "params": 1, "sha256": ""}
    )
    app = typer.Typer()
    app.command()(train_command)
    args = ["--backbone", str(tiny_dir), "--data", str(data), "--task", "maj", "--out", str(out), "--epochs", "2"]
    args += ["--upload", "http://kronserve.test", "--token", "tok"]
    # Two epochs on 36 rows learn nothing the held-out rows show: warned, and not uploaded unless forced.
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and seen == [] and out.is_file()
    assert json.loads(refused.stdout)["improved"] is False
    assert "never rose above the untrained adapter's (0.000)" in refused.stderr and "not uploaded" in refused.stderr
    result = CliRunner().invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    summary, uploaded = (json.loads(line) for line in result.stdout.splitlines())
    assert summary["method"] == "compacter++" and summary["epochs_run"] == 2 and summary["eval_examples"] == 4
    assert set(summary) >= {"first_epoch_loss", "final_train_loss", "best_eval_accuracy", "params"}
    assert "not uploaded" not in result.stderr and "never rose" in result.stderr
    assert uploaded == {"uploaded": "maj", "url": "http://kronserve.test", "version": 7}
    assert load(out).spec == preset("compacter++")
    (req,) = seen
    assert (req.method, req.url.path, req.headers["authorization"]) == ("PUT", "/v1/adapters/maj", "Bearer tok")
    assert out.read_bytes() in req.content


def test_failed_upload_says_where_the_file_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"weights")
    fake_server(monkeypatch, 401, {"error": "unauthorized", "detail": "bad token"})
    with pytest.raises(KronserveError, match=f"upload to http://x failed .*saved at {path}"):
        upload(path, "t", "http://x", None)


@pytest.mark.parametrize("method", ["prefix", "mam"])
def test_prefixes_train_through_their_mlp_and_the_server_reproduces_the_outputs(
    method: str, tiny_dir: Path, tmp_path: Path
) -> None:
    """The prefix trains as the papers train it (an MLP over an embedding), and only its output is saved: the
    native file's final prefixes, which the engine serves to the same held-out outputs."""
    data = write_jsonl(tmp_path / "d.jsonl", majority_task(64))
    config = TrainConfig(
        method=method, prefix_length=4, epochs=3, lr=1e-2, eval_fraction=0.25, device="cpu", progress=False
    )
    result = train(str(tiny_dir), data, "p", tmp_path / "p.safetensors", config)
    s = result.summary()
    assert s["final_train_loss"] < s["first_epoch_loss"]
    spec, geometry = result.adapter.spec, result.adapter.geometry
    assert set(result.adapter.tensors) == set(spec.tensor_shapes(geometry))  # no MLP weight in the file
    assert s["params"] > spec.param_count(geometry)  # the MLP trained is bigger than what is served
    engine = Engine(load_backbone(str(tiny_dir), device="cpu"))
    engine.load(load(result.path, engine.backbone.fingerprint))
    inputs = [e.input for e in result.eval_examples]
    outputs = engine.generate(["p"] * len(inputs), inputs, max_new_tokens=result.max_new_tokens).outputs
    assert outputs == result.eval_predictions
    bare = engine.score([None], ["abcde"], ["yes"]).scores[0]
    assert engine.score(["p"], ["abcde"], ["yes"]).scores[0] != pytest.approx(bare, abs=1e-3)
