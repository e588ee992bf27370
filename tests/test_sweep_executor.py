"""gs.sweep_grid on any concurrent.futures.Executor: a Dask LocalCluster, a process pool, a thread pool.

Every executor must give exactly the numbers of ``workers=1`` (same machine, same thread count), in job order."""
import functools
import logging
import multiprocessing
import signal
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

import gradstab as gs
from gradstab.device import cpu_settings

VARIANTS = {"plain": {}, "clip": {"max_norm": 0.5}}
GRID = dict(depths=[1, 2], lrs=[0.05, 0.5], variants=VARIANTS, steps=3, width=4)  # 2 depths x 2 variants x 2 lrs
LIMIT_S = 120  # bound on any one test here (a cluster start, a grid)


@contextmanager
def time_limit(seconds: int, what: str):
    """Raise TimeoutError in the main thread if the block takes longer than ``seconds`` (SIGALRM, POSIX)."""
    def expire(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def cpu_digits(digits):
    if digits.device.type != "cpu":
        pytest.skip("a split on a GPU runs in this process; executors are used on the CPU only")
    return digits


@pytest.fixture(scope="module")
def serial(digits):
    """The grid in this process, one sweep after another (``workers=1``): the reference."""
    return gs.sweep_grid(digits, **GRID)


def assert_identical(runs, reference):
    """Same configs in the same order, and bit-identical losses, per-layer norms and accuracies."""
    assert [h.config for h in runs] == [h.config for h in reference]
    assert [h.config["variant"] for h in runs] == ["plain", "plain", "clip", "clip"] * 2
    assert [h.config["depth"] for h in runs] == [1] * 4 + [2] * 4
    for run, ref in zip(runs, reference, strict=True):
        assert run.loss == ref.loss
        assert run.layer_names == ref.layer_names
        assert torch.equal(run.grad_norms, ref.grad_norms)
        assert run.grad_norm == ref.grad_norm
        assert (run.test_accuracy, run.train_accuracy) == (ref.test_accuracy, ref.train_accuracy)
        assert (run.diverged, run.diverged_step, run.reason) == (ref.diverged, ref.diverged_step, ref.reason)


@pytest.fixture(scope="module")
def dask_client():
    """A Dask LocalCluster of 2 worker processes with one thread each, on loopback only, no dashboard;
    closed when the module's tests are done (also after a failure)."""
    distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed "
                                      "(pip install -e .[dask]); the Dask executor test needs it")
    with time_limit(LIMIT_S, "starting a Dask LocalCluster"):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                           dashboard_address=None, scheduler_port=0, silence_logs=logging.ERROR)
    client = None
    try:
        client = distributed.Client(cluster, timeout=60)
        yield client
    finally:
        if client is not None:
            client.close(timeout=30)
        cluster.close(timeout=30)


def test_dask_local_cluster_gives_the_numbers_of_one_process(cpu_digits, serial, dask_client):
    with time_limit(LIMIT_S, "a sweep on the Dask cluster"):
        runs = gs.sweep_grid(cpu_digits, **GRID, executor=dask_client.get_executor())
    assert_identical(runs, serial)
    workers = dask_client.run(lambda: __import__("os").getpid())
    assert len(workers) == 2  # the jobs had two separate processes to go to


def test_process_pool_executor_gives_the_numbers_of_one_process(cpu_digits, serial):
    with time_limit(LIMIT_S, "a sweep on a process pool"):
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = gs.sweep_grid(cpu_digits, **GRID, executor=pool)
    assert_identical(runs, serial)


def test_each_job_takes_this_processs_cpu_settings_first(cpu_digits):
    """A worker started with other settings (3 threads, subnormals kept) is set to ours before it trains."""
    settings = cpu_settings()
    tiny = torch.tensor([1e-40])  # subnormal in float32: flushed to 0 when flush-denormal is on
    context = multiprocessing.get_context("spawn")
    with time_limit(LIMIT_S, "a sweep on a process pool"), ProcessPoolExecutor(
            1, mp_context=context, initializer=torch.set_num_threads, initargs=(settings["threads"] + 2,)) as pool:
        assert pool.submit(torch.get_num_threads).result() == settings["threads"] + 2
        gs.sweep_grid(cpu_digits, depths=[1], lrs=[0.05], variants={"plain": {}}, steps=1, width=4, executor=pool)
        assert pool.submit(torch.get_num_threads).result() == settings["threads"]
        flushed = pool.submit(functools.partial(torch.mul, tiny, 1.0)).result()
    assert bool(flushed == 0) == settings["flush_denormal"]


class Reversed(ThreadPoolExecutor):
    """Runs its jobs strictly in the reverse order of submission: job i starts only when job i+1 has finished
    (every job has its own thread; the last one submitted starts at once). ``finished`` records the order."""

    def __init__(self, jobs: int):
        super().__init__(max_workers=jobs)
        self.done = [threading.Event() for _ in range(jobs)]
        self.finished, self.count = [], 0

    def submit(self, fn, /, *args, **kwargs):
        i, self.count = self.count, self.count + 1

        def job():
            if i + 1 < len(self.done):
                assert self.done[i + 1].wait(LIMIT_S), f"job {i + 1} never finished"
            try:
                return fn(*args, **kwargs)
            finally:
                self.finished.append(i)
                self.done[i].set()

        return super().submit(job)


def test_results_come_back_in_job_order_when_jobs_finish_in_reverse(cpu_digits, serial):
    with time_limit(LIMIT_S, "a sweep on a thread pool"), Reversed(4) as pool:
        runs = gs.sweep_grid(cpu_digits, **GRID, executor=pool)
    assert pool.finished == [3, 2, 1, 0]  # the last job finished first
    assert_identical(runs, serial)


def test_a_thread_pool_gives_the_numbers_of_one_process(cpu_digits, serial):
    """Four threads at once: building a model draws from torch's global generator, so jobs that interleaved
    would get each other's weights; they run one at a time and the numbers are those of one process."""
    for _ in range(3):  # interleaving, where it happens, depends on timing: give it several chances
        with time_limit(LIMIT_S, "a sweep on a thread pool"), ThreadPoolExecutor(4) as pool:
            assert_identical(gs.sweep_grid(cpu_digits, **GRID, executor=pool), serial)


def test_unbalanced_grid_on_a_thread_pool_keeps_job_order(cpu_digits):
    """A long first job and short later ones on two threads: the short ones finish first."""
    variants = {"long": {"width": 16}, "short": {"steps": 1}}
    args = dict(depths=[3], lrs=[0.05], variants=variants, steps=40, width=4, seeds=(0,))
    with time_limit(LIMIT_S, "a sweep on a thread pool"), ThreadPoolExecutor(2) as pool:
        runs = gs.sweep_grid(cpu_digits, **args, executor=pool)
    assert [h.config["variant"] for h in runs] == ["long", "short"]
    assert [h.steps for h in runs] == [40, 1] and runs[0].config["width"] == 16


def test_a_failing_job_raises_here_and_the_pool_is_usable_after(cpu_digits):
    variants = {"plain": {}, "bad": {"width": -1}}
    with time_limit(LIMIT_S, "a sweep on a thread pool"), ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="width"):
            gs.sweep_grid(cpu_digits, depths=[1], lrs=[0.05], variants=variants, steps=2, width=4, executor=pool)
        assert len(gs.sweep_grid(cpu_digits, depths=[1], lrs=[0.05], variants={"plain": {}}, steps=2, width=4,
                                 executor=pool)) == 1


class Refuses(Executor):
    """An executor that must not be used (it fails every submission)."""

    def submit(self, fn, /, *args, **kwargs):
        raise AssertionError("sweep_grid submitted a job")


def test_executor_and_workers_together_are_refused(digits):
    with pytest.raises(ValueError, match=r"executor.*workers|workers.*executor"):
        gs.sweep_grid(digits, **GRID, workers=2, executor=Refuses())


@pytest.mark.parametrize("bad", [4, "dask", ProcessPoolExecutor, object()], ids=repr)
def test_a_non_executor_is_refused(digits, bad):
    with pytest.raises(ValueError, match="executor"):
        gs.sweep_grid(digits, **GRID, executor=bad)


def test_a_gpu_split_runs_here_whatever_the_executor(digits):
    if digits.device.type == "cpu":
        pytest.skip("needs GRADSTAB_TEST_DEVICE=cuda: on the CPU the executor is used")
    runs = gs.sweep_grid(digits, **{**GRID, "depths": [1]}, executor=Refuses())
    assert len(runs) == 4 and all(h.loss for h in runs)
