"""pytest glue for the benchmarks (pytest-benchmark).

* Collects ``bench_*.py`` in this folder, so ``pytest benchmarks`` (the Makefile's ``bench``
  target) runs them although pyproject's ``python_files`` only names ``test_*.py``.
* ``bench_report(name, ...)`` (session fixture) returns a shared :class:`report.Report`; at the end
  of the session every non-empty report is written as JSON and its ratio table printed.
  ``--bench-out PATH``: a ``.json`` file (used as is when the session has a single report) or a
  folder (``<folder>/<name>.json``); default ``benchmarks/results/<name>.json``.
* ``bench_run(benchmark, fn, setup=None)`` times ``fn`` in pedantic mode with a small
  self-calibrated round budget (keeps the whole run short on 2 cores) and returns ``(median, min)``
  in seconds (None when benchmarking is disabled).
* ``--bench-threads N`` (default 1, 0 = torch's default) sets torch's intra-op threads.
* ``--bench-device cpu|cuda`` (default cpu): where the model benchmarks (HF decode, training
  forward) put the model; fixture ``bench_device``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from report import Report  # noqa: E402

_REPORTS: dict[str, Report] = {}


def pytest_addoption(parser):
    group = parser.getgroup("monet benchmarks")
    group.addoption("--bench-out", default=None, metavar="PATH",
                    help="where to write the ratio JSON: a .json file or a folder "
                         "(default benchmarks/results/<report>.json)")
    group.addoption("--bench-budget", type=float, default=0.5, metavar="SECONDS",
                    help="approximate timing budget per benchmark (default 0.5 s)")
    group.addoption("--bench-threads", type=int, default=1, metavar="N",
                    help="torch intra-op threads while benchmarking; 0 keeps torch's default. Default 1: "
                         "on the shared 2-core VMs waking a second OpenMP thread often costs a 4-8 ms "
                         "scheduler tick, which swamps every op that enters a parallel region")
    group.addoption("--bench-device", default="cpu", metavar="DEVICE",
                    help="device for the model benchmarks (cpu or cuda; default cpu)")


def pytest_configure(config):
    n = config.getoption("--bench-threads", default=0)
    if n and n > 0:
        import torch

        torch.set_num_threads(n)


def pytest_collect_file(file_path, parent):
    # Explicitly named files are collected by pytest's python plugin already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == HERE
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_device(request):
    import torch

    device = torch.device(request.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: torch sees no CUDA device on this machine", returncode=4)
    return device


@pytest.fixture(scope="session")
def bench_report():
    def get(name: str, **kwargs) -> Report:
        if name not in _REPORTS:
            _REPORTS[name] = Report(name, **kwargs)
        return _REPORTS[name]

    return get


@pytest.fixture
def bench_run(request):
    budget = request.config.getoption("--bench-budget")

    def run(benchmark, fn, setup=None, max_rounds: int = 200):
        """Pedantic run: ~``budget`` seconds, at least 5 rounds; each round >= ~0.5 ms when no setup.

        Returns ``(median, min)`` per call in seconds, or None when benchmarking is disabled."""
        if setup is not None:
            setup()
        fn()  # warm-up (allocator, caches, lazy init)
        t = math.inf
        for _ in range(3):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        t = max(t, 1e-7)
        if setup is None:
            iterations = max(1, min(2000, int(5e-4 / t)))
            rounds = max(5, min(max_rounds, int(budget / (t * iterations))))
            benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
        else:
            t0 = time.perf_counter()
            setup()
            ts = time.perf_counter() - t0
            rounds = max(5, min(max_rounds, int(budget / (t + ts))))
            benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1)
        stats = benchmark.stats
        return None if not stats else (stats.stats.median, stats.stats.min)

    return run


def _out_path(config, name: str, n_reports: int) -> Path:
    opt = config.getoption("--bench-out")
    if opt is None:
        return HERE / "results" / f"{name}.json"
    p = Path(opt)
    if p.suffix == ".json":
        return p if n_reports == 1 else p.with_name(f"{p.stem}_{name}.json")
    return p / f"{name}.json"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reports = [r for r in _REPORTS.values() if r.cases]
    for rep in reports:
        path = rep.write(_out_path(config, rep.name, len(reports)))
        terminalreporter.write_sep("=", f"{rep.name}: median times and ratios (vs {rep.baseline})")
        terminalreporter.write_line(rep.table())
        terminalreporter.write_line(f"written to {path}")
