"""The agent's CPU threading: how many torch threads, and how long OpenMP workers spin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from provider_agent.threads import AGENT_SPIN_COUNT, PARALLEL_MIN_BLOCK_BYTES, auto_threads, limit_openmp_spinning

MiB = 1024 * 1024


def test_small_blocks_get_one_thread():
    assert auto_threads(0, cores=8) == 1
    assert auto_threads(PARALLEL_MIN_BLOCK_BYTES - 1, cores=8) == 1


def test_large_blocks_get_a_thread_per_share_up_to_the_cores():
    assert auto_threads(2 * PARALLEL_MIN_BLOCK_BYTES, cores=8) == 2
    assert auto_threads(12 * MiB + MiB // 2, cores=2) == 2  # a hidden-512 llama block on a 2-core machine
    assert auto_threads(800 * MiB, cores=16) == 16
    assert 1 <= auto_threads(800 * MiB) <= (os.cpu_count() or 1)


def test_negative_block_bytes_are_refused():
    with pytest.raises(ValueError, match="block_bytes"):
        auto_threads(-1, cores=2)


def test_spinning_is_limited_when_nobody_chose(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # restored afterwards
    environ: dict[str, str] = {}
    assert limit_openmp_spinning(environ) is True
    assert environ == {"GOMP_SPINCOUNT": str(AGENT_SPIN_COUNT)}


@pytest.mark.parametrize("chosen", [{"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "PASSIVE"}])
def test_an_operators_choice_is_kept(monkeypatch, chosen):
    monkeypatch.delitem(sys.modules, "torch")
    environ = dict(chosen)
    assert limit_openmp_spinning(environ) is False
    assert environ == chosen


def test_nothing_is_set_once_torch_is_loaded():
    import torch  # noqa: F401  (libgomp has read its settings: changing them now would be a lie)

    environ: dict[str, str] = {}
    assert limit_openmp_spinning(environ) is False and environ == {}


def test_the_entry_point_sets_it_before_torch_loads():
    code = (
        "import os, sys\n"
        "from provider_agent import cli\n"
        "sys.argv = ['hivemart-provider', '--help']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == f"torch not loaded {AGENT_SPIN_COUNT}"
