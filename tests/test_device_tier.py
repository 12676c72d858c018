"""The device tier: each adapter is computed from its compact form exactly as the method's dense definition says,
mixed batches of layouts included; eviction follows LRU within the byte budget and never takes a held or pinned
version; weights the serving dtype cannot hold are refused before anything is resident."""

from __future__ import annotations

import itertools

import pytest
import torch

from kronserve.compact import compact
from kronserve.engine import Engine
from kronserve.errors import InvalidAdapter, PinRefused
from kronserve.formats.native import dumps
from kronserve.kernels import ACTIVATIONS
from kronserve.plan import Route

from .conftest import held_slots, make_adapter

PHM_OPTIONS = [  # every PHM-family option: factorized rule, rank > 1, dense W, per-layer rule, every placement
    dict(zip(("factorized_rule", "rank", "shared_rule", "placement"), combo, strict=True))
    for combo in itertools.product((False, True), (1, 2, None), (True, False), ("houlsby", "pfeiffer", "parallel"))
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def dense_reference(adapter, site: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The adapter from its spec's dense form (`spec.dense`, checked against torch.kron in tests/methods)."""
    spec, d = adapter.spec, adapter.spec.dense(adapter.tensors, site)
    z = {"houlsby": f, "pfeiffer": x + f, "parallel": x}[spec.placement]
    return ACTIVATIONS[spec.activation](z @ d.down_w + d.down_b) @ d.up_w + d.up_b


def engine_in(backbone, dtype: torch.dtype, device: str = "cpu", **kwargs) -> Engine:
    backbone.model.to(device, dtype)
    backbone.dtype, backbone.device = dtype, torch.device(device)
    return Engine(backbone, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_compact_phm_equals_the_dense_reference_for_every_option(backbone, dtype: torch.dtype, device: str) -> None:
    engine = engine_in(backbone, dtype, device)
    adapters = []
    for i, options in enumerate(PHM_OPTIONS):
        method = "phm" if options["rank"] is None else "compacter"
        a = make_adapter(backbone, f"t{i}", method, seed=i, std=0.2, **options)
        engine.load(a)
        adapters.append(a)
    slots = held_slots(engine, [a.task for a in adapters] + [None])  # one mixed batch, a bare row included
    g = torch.Generator().manual_seed(0)
    x, f = (torch.randn(len(slots), 3, engine.geometry.d_model, generator=g) for _ in range(2))
    with torch.inference_mode():
        for plan in (engine.device.plan(Route.of(slots, device)),):
            for site in ("encoder.0.mh", "decoder.1.ffn"):
                index = engine.device.names.sites.index(site)
                got = plan.delta(index, x.to(device, dtype), f.to(device, dtype)).float().cpu()
                for row, a in enumerate(adapters):
                    want = dense_reference(a, site, x[row], f[row])
                    tol = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
                    torch.testing.assert_close(got[row], want, rtol=0, atol=tol, msg=f"{a.spec} at {site}")
                assert torch.equal(got[-1], torch.zeros_like(got[-1]))  # the bare row adds exactly nothing


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_layouts_in_one_plan_each_get_their_own(backbone, device: str) -> None:
    engine = engine_in(backbone, torch.float32, device)
    kinds = [("c", "compacter", {}), ("h", "houlsby", {}), ("p", "pfeiffer", {}), ("l", "lora", {"rank": 4})]
    loaded = {t: make_adapter(backbone, t, m, seed=i, **o) for i, (t, m, o) in enumerate(kinds)}
    for a in loaded.values():
        engine.load(a)
    tasks = ["c", "h", None, "p", "c", "l"]
    slots = held_slots(engine, tasks)
    x, f = torch.randn(6, 2, 128), torch.randn(6, 2, 128)
    site = "encoder.1.ffn"
    plan = engine.device.plan(Route.of(slots, device))
    got = plan.delta(engine.device.names.sites.index(site), x.to(device), f.to(device)).cpu()
    for row, task in enumerate(tasks):
        if task in ("c", "h", "p"):
            want = dense_reference(loaded[task], site, x[row], f[row])
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
        else:  # the bare row and LoRA (no bottleneck here) add exactly 0
            assert torch.equal(got[row], torch.zeros_like(got[row]))


def test_weights_the_dtype_cannot_hold_are_refused_before_anything_is_resident(backbone) -> None:
    engine = engine_in(backbone, torch.float16)
    good = make_adapter(backbone, "good", "houlsby")
    engine.load(good)
    bad = make_adapter(backbone, "bad", "houlsby")
    bad.tensors["encoder.0.ffn.up.bias"][0] = 1e6  # over float16's 65504
    with pytest.raises(InvalidAdapter, match=r"encoder\.0\.ffn\.up_b: .* not finite in torch\.float16"):
        compact(bad, torch.float16)
    with pytest.raises(InvalidAdapter):
        engine.load(bad)
    assert engine.registry.peek("bad") is None and engine.registry.resident() == 1


def lru_engine(backbone, adapters: int) -> tuple[Engine, int]:
    size = make_adapter(backbone, "probe", "compacter").spec.param_count(backbone.fingerprint.geometry) * 4
    engine = Engine(backbone, device_adapter_mb=adapters * size / 2**20)
    for i in range(6):
        engine.load(make_adapter(backbone, f"t{i}", "compacter", seed=i))
    return engine, size


def test_eviction_is_lru_within_the_budget_and_never_takes_a_held_version(backbone) -> None:
    engine, size = lru_engine(backbone, adapters=2)
    before = {t: engine.score([t], ["in"], ["out"]).scores[0] for t in ("t0", "t1", "t2")}
    assert engine.device.used_bytes == 2 * size and engine.device.count() == 2
    (held,) = held_slots(engine, ["t0"])  # t0 is held (a running request)
    for t in ("t3", "t4", "t5"):
        engine.score([t], ["in"], ["out"])
        assert engine.device.resident(engine.registry.get("t0").key) is not None
    assert engine.device.used_bytes == 2 * size
    engine.release([held])
    engine.score(["t1"], ["in"], ["out"])  # t0 is now the least recently used: it goes
    assert engine.device.resident(engine.registry.get("t0").key) is None
    for t, score in before.items():  # reloaded rows (and pools resized meanwhile) answer as before
        assert engine.score([t], ["in"], ["out"]).scores[0] == pytest.approx(score, abs=1e-6)


def test_a_pinned_task_stays_under_pressure_and_unpinning_returns_it_to_lru(backbone) -> None:
    engine, _ = lru_engine(backbone, adapters=2)
    engine.pin("t0")
    key = engine.registry.get("t0").key
    for t in ("t1", "t2", "t3", "t4"):
        engine.score([t], ["in"], ["out"])
        assert engine.device.resident(key) is not None
    engine.pin("t1")
    with pytest.raises(PinRefused, match="device budget"):
        engine.pin("t2")  # three pinned would not fit two adapters' budget
    engine.unpin("t0")
    engine.unpin("t1")
    for t in ("t3", "t4"):
        engine.score([t], ["in"], ["out"])
    assert engine.device.resident(key) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_mixed_batch_on_cuda_generates_what_each_request_generates_alone(tiny_dir, dtype: torch.dtype) -> None:
    from kronserve.backbone import load_backbone

    bb = load_backbone(str(tiny_dir), device="cuda", dtype=str(dtype).removeprefix("torch."))
    engine = Engine(bb, device_adapter_mb=0.05)  # a few adapters' room: loads and evictions on the GPU
    kinds = [("compacter", {}), ("compacter++", {}), ("phm", {}), ("houlsby", {}), ("lora", {"rank": 4})]
    tasks = []
    for i, (method, options) in enumerate(kinds * 2):
        tasks.append(f"g{i}")
        engine.load(make_adapter(bb, f"g{i}", method, seed=i, std=0.3, **options))
    inputs = [f"input number {i}" for i in range(len(tasks))]
    alone = [engine.generate([t], [x], max_new_tokens=6).token_ids[0] for t, x in zip(tasks, inputs, strict=True)]
    assert engine.generate(tasks, inputs, max_new_tokens=6).token_ids == alone


def test_pins_from_many_threads_never_exceed_the_budget_the_step_loop_is_their_one_writer(backbone) -> None:
    """Twelve threads pin six tasks at once while a step loop owns the device: each check and its pin run together
    on the loop's thread, so exactly two (the budget's room) succeed and the others are refused."""
    from concurrent.futures import ThreadPoolExecutor

    from kronserve.loop import Bounds, DecodeLoop
    from kronserve.metrics import Metrics

    engine, size = lru_engine(backbone, adapters=2)
    loop = DecodeLoop(engine, Metrics(), Bounds(rows=8, pass_tokens=1000, cached_tokens=10_000, wait_s=0))
    loop.start()

    def pin(task: str) -> bool:
        try:
            engine.pin(task)
            return True
        except PinRefused:
            return False

    try:
        with ThreadPoolExecutor(12) as pool:
            pinned = list(pool.map(pin, [f"t{i % 6}" for i in range(12)]))
    finally:
        loop.stop()
    assert len({f"t{i % 6}" for i, ok in enumerate(pinned) if ok}) == 2
    assert engine.device.pinned_bytes() == 2 * size <= engine.device.budget


def test_a_pin_whose_weights_cannot_be_read_is_not_recorded(backbone, monkeypatch) -> None:
    engine, _ = lru_engine(backbone, adapters=2)

    def unreadable(entry):
        raise OSError("the store lost the file")

    monkeypatch.setattr(engine.registry, "fetch", unreadable)
    with pytest.raises(OSError):
        engine.pin("t0")
    assert not engine.device.pinned("t0") and engine.device.pinned_bytes() == 0


def test_a_pinned_tasks_bigger_new_version_is_refused_when_pins_would_pass_the_budget(backbone) -> None:
    """Re-uploading a pinned task is checked like a pin: refused (nothing changes: its version, its pin, its
    reservation) when its new size and the other pins pass the budget; accepted when it fits."""
    engine, size = lru_engine(backbone, adapters=2)
    engine.pin("t0")
    engine.pin("t1")
    bigger = dumps(make_adapter(backbone, "t0", "phm", seed=9))  # 16,512 bytes against 12,928
    before = engine.registry.get("t0")
    with pytest.raises(PinRefused, match="device budget"):
        engine.registry.upload("t0", bigger)
    assert engine.registry.get("t0") == before and engine.device.pinned("t0")
    assert engine.device.pinned_bytes() == 2 * size
    same_size = engine.registry.upload("t0", dumps(make_adapter(backbone, "t0", "compacter", seed=10)))
    assert engine.device.resident(same_size.key) is not None and engine.device.pinned_bytes() == 2 * size
    engine.unpin("t1")
    engine.registry.upload("t0", bigger)  # fits beside nothing else pinned: accepted, its reservation its size
    assert engine.device.pinned_bytes() == engine.device.reservation("t0") > size


def test_upload_with_pin_and_a_pin_before_the_task_exists_are_checked_at_upload(backbone) -> None:
    engine, size = lru_engine(backbone, adapters=2)
    engine.pin("t0")
    engine.pin("later")  # no such task yet: pinned, nothing reserved
    assert engine.device.pinned_bytes() == size
    with pytest.raises(PinRefused):
        engine.registry.upload("later", dumps(make_adapter(backbone, "later", "houlsby", seed=1)))
    with pytest.raises(PinRefused):
        engine.registry.upload("fresh", dumps(make_adapter(backbone, "fresh", "houlsby", seed=1)), pin=True)
    assert engine.registry.peek("later") is None and engine.registry.peek("fresh") is None
    assert not engine.device.pinned("fresh") and engine.device.reservation("later") == 0
    entry = engine.registry.upload("fresh", dumps(make_adapter(backbone, "fresh", "compacter", seed=1)), pin=True)
    assert engine.device.pinned("fresh") and engine.device.resident(entry.key) is not None
    assert engine.device.pinned_bytes() == 2 * size


def test_an_unchecked_new_version_that_does_not_fit_unpins_its_task(backbone, caplog) -> None:
    """A version that arrives from the store (another replica's upload) was never checked here: if it does not fit
    beside the other pins, its task is unpinned (logged) rather than take the device past its budget."""
    engine, size = lru_engine(backbone, adapters=2)
    engine.pin("t0")
    engine.pin("t1")
    engine.load(make_adapter(backbone, "t0", "houlsby", seed=3), version=2)
    assert not engine.device.pinned("t0") and engine.device.pinned_bytes() == size
    assert "unpinned 't0'" in caplog.text
