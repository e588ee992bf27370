"""gradstab across processes: the launcher :func:`gradstab.run_distributed`, and gradstab's clipping,
monitor, AGC, training loop and diagnosis under DDP and FSDP2, each compared with one process on the
union of the ranks' batches (float32, to 1e-5).

Every 2-process job runs through ``run_distributed`` (gloo on 127.0.0.1, bounded time, cleaned up). A job
costs seconds to start, so all the DDP checks share one job, and all the FSDP2 checks another.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
import time

import pytest
import torch
from torch.nn import functional as F

import gradstab as gs

sys.path.insert(0, os.path.dirname(__file__))
import distributed_workers as w  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)


def close(a, b, **tol):
    return torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), **(tol or TOL))


def assert_dicts_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by anyone) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def no_children_left() -> None:
    import multiprocessing

    assert multiprocessing.active_children() == []


# -- single-process references ----------------------------------------------------------------------------
def reference_clip(max_norm: float = 1.0, lr: float = 0.1) -> dict:
    model = w.make_model()
    x, y = w.union(WORLD)
    F.cross_entropy(model(x), y).backward()
    out = {"norm": float(gs.clip_grad_norm_(model.parameters(), max_norm)), "grads": w.full_grads(model)}
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)
    out["params"] = w.full_params(model)
    return out


def reference_accumulate(micro: int = 3, max_norm: float = 1.0, lr: float = 0.1, per_micro: bool = False) -> dict:
    model = w.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(micro):
        x, y = w.union(WORLD, step=k)
        (F.cross_entropy(model(x), y) / micro).backward()
        if per_micro:
            gs.clip_grad_norm_(model.parameters(), max_norm)
    norm = float(gs.clip_grad_norm_(model.parameters(), max_norm))
    opt.step()
    return {"norm": norm, "params": w.full_params(model)}


def reference_agc(clip_factor: float = 0.01) -> dict:
    model = w.make_model()
    x, y = w.union(WORLD)
    F.cross_entropy(model(x), y).backward()
    before = w.full_grads(model)
    gs.adaptive_clip_grad_(list(model.parameters()), clip_factor=clip_factor)
    return {"before": before, "grads": w.full_grads(model)}


def reference_monitor(steps: int = 2, lr: float = 0.1) -> gs.GradientMonitor:
    return w.monitored_sgd(w.make_model(), lambda t: w.union(WORLD, step=t), steps, lr)


def reference_train(steps: int = 3, **options) -> tuple[gs.History, dict]:
    model = w.make_model()
    micro = options.get("accumulate", 1)
    data = [w.union(WORLD, step=t) for t in range(steps * micro)]
    h = gs.train(model, data, lr=0.1, steps=steps, batch_size=WORLD * w.BATCH, momentum=0.0, seed=0,
                 activations=True, updates=True, **options)
    return h, w.full_params(model)


# -- the two jobs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp():
    results = gs.run_distributed(w.everything, WORLD, timeout=120, mode="ddp")
    no_children_left()
    return results


@pytest.fixture(scope="module")
def fsdp():
    results = gs.run_distributed(w.everything, WORLD, timeout=120, mode="fsdp2")
    no_children_left()
    return results


# -- launcher ----------------------------------------------------------------------------------------------
def test_results_come_back_by_rank_with_one_thread_each(monkeypatch):
    monkeypatch.setenv("GRADSTAB_THREADS", "2")  # still one thread per rank
    results = gs.run_distributed(w.echo, WORLD, timeout=60, offset=1.0)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == WORLD and r["sum"] == 3.0 and r["threads"] == 1 for r in results)
    close(results[1]["tensor"], torch.arange(3))  # tensors travel by value
    assert len({r["pid"] for r in results}) == WORLD and os.getpid() not in {r["pid"] for r in results}
    assert not any(alive(r["pid"]) for r in results)
    no_children_left()


def test_worker_given_as_file_path(tmp_path):
    path = tmp_path / "per_rank.py"
    path.write_text("import torch.distributed as dist\n\n"
                    "def work(rank, world_size, base):\n"
                    "    return base + rank * 10 + dist.get_world_size()\n")
    assert gs.run_distributed(f"{path}:work", 2, timeout=60, base=1) == [3, 13]
    assert gs.run_distributed(functools.partial(w.echo, offset=2.0), 1, timeout=60)[0]["sum"] == 2.0


def test_exception_on_a_rank_is_raised_with_its_traceback_and_nothing_is_left():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 raised ValueError: rank one fails on purpose") as info:
        gs.run_distributed(w.fail_on_one, WORLD, timeout=60)
    assert "fail_on_one" in str(info.value) and "Traceback" in str(info.value)
    assert time.monotonic() - start < 30  # rank 0 (asleep for 60 s) was killed, not waited for
    no_children_left()


def test_timeout_kills_every_rank(tmp_path):
    pidfile = str(tmp_path / "pid")
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] still running were killed"):
        gs.run_distributed(w.sleep_forever, WORLD, timeout=8, pidfile=pidfile)
    pids = [int(open(f"{pidfile}.{r}").read()) for r in range(WORLD) if os.path.exists(f"{pidfile}.{r}")]
    assert not any(alive(pid) for pid in pids)  # (a rank killed before it wrote its pid is gone too)
    no_children_left()


@pytest.mark.parametrize("kwargs, name", [
    (dict(worker=lambda rank, world: 0), "worker"),
    (dict(worker=42), "worker"),
    (dict(worker=functools.partial(lambda rank, world: 0)), "worker"),
    (dict(worker="no/such/file.py:work"), "worker"),
    (dict(worker="missing_colon.py"), "worker"),
    (dict(worker=w.echo, nprocs=0), "nprocs"),
    (dict(worker=w.echo, nprocs=1.5), "nprocs"),
    (dict(worker=w.echo, timeout=0), "timeout"),
    (dict(worker=w.echo, timeout=float("nan")), "timeout"),
    (dict(worker=w.echo, timeout="soon"), "timeout"),
    (dict(worker=w.echo, gen=(i for i in range(3))), "kwargs"),  # a generator does not pickle
])
def test_bad_input_raises_before_anything_starts(kwargs, name):
    worker = kwargs.pop("worker")
    with pytest.raises(ValueError, match=name):
        gs.run_distributed(worker, **kwargs)
    no_children_left()


# -- DDP ---------------------------------------------------------------------------------------------------
def test_ddp_clipped_update_equals_one_process_on_the_union(ddp):
    want = reference_clip()
    for rank in ddp:
        close(rank["clip"]["norm"], want["norm"])
        assert want["norm"] > 1.0  # the clip did bite
        assert_dicts_close(rank["clip"]["grads"], want["grads"])
        assert_dicts_close(rank["clip"]["params"], want["params"])


def test_ddp_accumulation_clips_once_after_the_last_micro_batch(ddp):
    once, every = reference_accumulate(), reference_accumulate(per_micro=True)
    for rank in ddp:
        close(rank["accumulate"]["norm"], once["norm"])
        assert_dicts_close(rank["accumulate"]["params"], once["params"])
        got = rank["accumulate_per_micro"]["params"]  # clipping each (rank-local) micro-batch: another update
        assert max(float((got[n] - once["params"][n]).abs().max()) for n in got) > 1e-3
    assert max(float((ddp[0]["accumulate_per_micro"]["params"][n] - every["params"][n]).abs().max())
               for n in every["params"]) > 1e-4  # and not even the single-process per-micro-batch update


def test_ddp_agc_equals_one_process(ddp):
    want = reference_agc()
    for rank in ddp:
        assert_dicts_close(rank["agc"]["before"], want["before"])
        assert_dicts_close(rank["agc"]["grads"], want["grads"])


def test_ddp_monitor_gives_single_process_numbers_and_names(ddp):
    mon = reference_monitor()
    for rank in ddp:
        got = rank["monitor"]
        assert got["names"] == mon.names  # no "module." prefix
        for kind in ("grad", "act_grad", "update_ratio"):
            close(got[kind], mon.history(kind))
        assert set(got["log"]) == set(mon.log_dict())


@pytest.mark.parametrize("wrapping", ["ddp", "fsdp"])
def test_train_history_equals_one_process_on_the_union(wrapping, request):
    for key, options in (("train", {}), ("train_clip", {"max_norm": 1.0}),
                         ("train_accumulate", {"max_norm": 1.0, "accumulate": 2})):
        h, params = reference_train(**options)
        for rank in request.getfixturevalue(wrapping):
            got = rank[key]
            assert got["names"] == h.layer_names and not got["diverged"]
            close(got["loss"], h.loss)
            close(got["grad_norm"], h.grad_norm)
            close(got["grad_norms"], h.grad_norms)
            close(got["act_grad_norms"], h.act_grad_norms)
            close(got["update_ratios"], h.update_ratios)
            assert_dicts_close(got["params"], params)


def test_ddp_diagnose_says_so(ddp):
    for rank in ddp:
        d = rank["diagnose"]
        assert d.get("parallel") == "DDP", d
        assert "parallel: DDP-wrapped, 2 ranks" in d["text"]


# -- FSDP2 -------------------------------------------------------------------------------------------------
def test_fsdp2_shard_norm_is_wrong_global_norm_is_single_process(fsdp):
    want = reference_clip()
    shard_norms = [rank["clip"]["shard_norm"] for rank in fsdp]
    assert abs(shard_norms[0] - shard_norms[1]) > 1e-3  # each rank sees another number
    for rank in fsdp:
        assert abs(rank["clip"]["shard_norm"] - want["norm"]) > 1e-2
        close(rank["clip"]["norm"], want["norm"])
        close(rank["clip"]["torch_norm"], want["norm"])  # torch's clip_grad_norm_ agrees
        assert_dicts_close(rank["clip"]["grads"], want["grads"])
        assert_dicts_close(rank["clip"]["torch_grads"], want["grads"])
        assert_dicts_close(rank["clip"]["params"], want["params"])
    close(sum(n**2 for n in shard_norms) ** 0.5, want["norm"])  # the global norm from the shards' squares


def test_fsdp2_agc_equals_one_process(fsdp):
    want = reference_agc()
    for rank in fsdp:
        assert_dicts_close(rank["agc"]["grads"], want["grads"])


def test_fsdp2_monitor_gives_single_process_numbers(fsdp):
    mon = reference_monitor()
    for rank in fsdp:
        got = rank["monitor"]
        assert got["names"] == mon.names
        for kind in ("grad", "act_grad", "update_ratio"):
            close(got[kind], mon.history(kind))


def test_fsdp2_on_part_of_the_model_mixes_dtensors_and_tensors(fsdp):
    mon = reference_monitor(steps=1)
    for rank in fsdp:  # the blocks' gradients are averaged over the ranks; the head's are the rank's own
        got = rank["partial"]
        close(got["grad"][0, :4], mon.history("grad")[0, :4])
        assert torch.isfinite(got["update_ratio"]).all() and got["norm"] > 0


def test_fsdp2_diagnose_says_sharded(fsdp):
    for rank in fsdp:
        d = rank["diagnose"]
        assert d.get("parallel") == "FSDP2", d
        assert "parallel: sharded (FSDP2" in d["text"]


def test_single_process_models_are_not_parallel():
    model = w.make_model()
    assert gs.distributed.parallel_kind(model) == ""
    assert gs.distributed.unwrap(model) is model and gs.distributed.data_parallel_group(model) is None
    d = gs.diagnose(copy.deepcopy(model), w.batch(0))
    assert d.parallel == "" and "parallel" not in str(d) and d.as_dict()["parallel"] == ""


def test_diagnose_weight_gradients_are_the_union_s_under_ddp_and_fsdp2(ddp, fsdp):
    d = gs.diagnose(w.make_model(), w.union(WORLD))
    for rank in (*ddp, *fsdp):
        close(rank["diagnose"]["grad_norm"], [h.grad_norm for h in d.layers])
        close(rank["diagnose"]["update_ratio"], d.update_ratio)


def test_float16_loss_scaling_on_a_sharded_model_is_refused():
    """Each rank's GradScaler would see only its own shards' inf/NaN, so ranks could skip different steps."""
    with pytest.raises(RuntimeError, match="ValueError: amp with loss_scaling on a sharded"):
        gs.run_distributed(w.train_fsdp_float16, nprocs=2, timeout=60)
    no_children_left()

