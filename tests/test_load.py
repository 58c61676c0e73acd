"""Load admission (server/load.py): the cores a container may use, real CPU
readings, and the rule that admits a session from scripted readings."""
from __future__ import annotations

import os
import time

import pytest

from server.load import (
    PRIOR_SESSION_CORES,
    WINDOW_S,
    CpuMeter,
    CpuReading,
    LoadAdmission,
    cpu_quota_cores,
    usable_cores,
)


def two_core_admission(headroom: float = 0.3) -> LoadAdmission:
    meter = CpuMeter()
    meter.cores = 2.0
    return LoadAdmission(meter, headroom)


def feed(admission: LoadAdmission, start: float, seconds: int, sessions: int, server: float, other: float,
         last: CpuReading | None = None) -> CpuReading:
    """One reading a second for ``seconds`` s from ``start`` with ``server`` and
    ``other`` busy cores; returns the last reading (to continue from)."""
    last = last or CpuReading(start, 0.0, 0.0)
    if last.at == start:
        admission.observe(last, sessions)
    for k in range(1, seconds + 1):
        last = CpuReading(start + k, last.busy + server + other, last.server + server)
        admission.observe(last, sessions)
    return last


def test_cgroup_quota_caps_the_usable_cores(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert cpu_quota_cores(tmp_path) is None and usable_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_cores(tmp_path) is None
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # docker run --cpus=0.5 (cgroup v2)
    assert cpu_quota_cores(tmp_path) == 0.5 and usable_cores(tmp_path) == 1.0
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")  # cgroup v1, 1.5 cores
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota_cores(tmp_path) == 1.5 and usable_cores(tmp_path) == min(affinity, 1.5)


def test_meter_reads_this_process_tree_and_the_machine():
    meter = CpuMeter()
    before = meter.read(0.0)
    end = time.process_time() + 0.2
    while time.process_time() < end:  # 0.2 s of this process's own CPU
        pass
    after = meter.read(1.0)
    assert meter.cores >= 1
    assert after.server - before.server >= 0.15
    assert after.busy - before.busy >= 0.15


def test_first_session_always_admitted_then_prior_cost_until_measured():
    admission = two_core_admission()
    assert admission.refusal(0) is None and admission.session_cores == PRIOR_SESSION_CORES
    feed(admission, 0.0, 8, sessions=0, server=0.0, other=1.9)  # the machine is busy with other work
    assert admission.refusal(0) is None  # nothing of ours runs that a session could slow down
    assert admission.session_cores == PRIOR_SESSION_CORES
    assert "fully booked" in admission.refusal(1)


def test_learns_the_session_cost_from_a_steady_window_only():
    admission = two_core_admission()
    last = feed(admission, 0.0, 8, sessions=1, server=0.4, other=0.2)
    assert admission.session_cores == pytest.approx(0.4)
    assert admission.other_cores() == pytest.approx(0.2)
    assert admission.free_sessions(1) == 2  # floor((2 - 0.3 - 0.2) / 0.4) = 3 in all
    # A second session starts: until the count has held a whole window the cost stays as learned.
    last = feed(admission, last.at, int(WINDOW_S) - 1, sessions=2, server=1.2, other=0.2, last=last)
    assert admission.session_cores == pytest.approx(0.4)
    feed(admission, last.at, 60, sessions=2, server=1.2, other=0.2, last=last)
    assert admission.session_cores == pytest.approx(0.6)
    assert admission.free_sessions(2) == 0 and "2 session(s) at about 0.60 core" in admission.refusal(2)


def test_a_short_burst_of_server_work_does_not_count_as_session_cost():
    admission = two_core_admission()
    last = feed(admission, 0.0, 30, sessions=2, server=0.8, other=0.1)
    last = feed(admission, last.at, 3, sessions=2, server=1.8, other=0.1, last=last)  # a portrait being prepared
    feed(admission, last.at, 25, sessions=2, server=0.8, other=0.1, last=last)
    assert admission.session_cores == pytest.approx(0.4, abs=0.02)
    assert admission.refusal(2) is None  # 0.1 + 3 x 0.4 + 0.3 <= 2
