"""The pytest side of the two-process tests: launch a worker as users launch their scripts, collect its results.

``launch`` runs ``accelerate launch --config_file examples/multi_gpu/<engine>.yaml <worker> ...`` on two CPU
processes (gloo); each rank of a worker writes ``rank<k>.json`` to ``--out`` (``{"error": traceback}`` on failure),
and ``launch`` returns both ranks' results after checking that both exist and none failed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "multi_gpu"
LAUNCH_TIMEOUT_S = 420
LAUNCHER_VARS = ("ACCELERATE_", "FSDP_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zero3_test_config(tmp: Path, **overrides: Any) -> Path:
    """examples/multi_gpu/zero3.json, the two test-only keys (tests/integration/test_distributed.py), ``overrides``.

    ``stage3_param_persistence_threshold: 0``: else ZeRO-3 keeps these tiny weights unpartitioned.
    ``zero_allow_untested_optimizer: true``: DeepSpeed's CPU build has no fused Adam; torch's AdamW is used.
    """
    config = json.loads((EXAMPLES / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config["zero_allow_untested_optimizer"] = True
    config.update(overrides)
    path = tmp / "zero3_test.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def launch(
    engine: str,
    worker: Path,
    out: Path,
    worker_args: Sequence[str] = (),
    deepspeed_config: Path | None = None,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """Run ``worker`` on two CPU processes with ``engine``'s example config; return both ranks' results.

    The worker gets ``--out out`` and ``worker_args``; ZeRO-3 reads ``deepspeed_config`` (default: the example
    plus the test-only keys).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / f"{engine}.yaml")]
    if engine == "zero3":
        cmd += ["--deepspeed_config_file", str(deepspeed_config or zero3_test_config(out))]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), str(worker)]
    cmd += ["--out", str(out), *worker_args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    full_env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", **(env or {}))
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, start_new_session=True, **pipes)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{engine}: no result after {LAUNCH_TIMEOUT_S} s (hung collective?)\n{output[-4000:]}")
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    errors = [r["error"] for r in results if "error" in r]
    assert proc.returncode == 0 and len(results) == 2 and not errors, "\n".join(errors) + output[-4000:]
    return sorted(results, key=lambda r: r["rank"])


def save_tiny_model(path: Path) -> Path:
    """The tiny Llama of tests/conftest.py and its character tokenizer, saved where workers can load them."""
    from ..conftest import make_tiny_model
    from ..grpo_utils import make_tiny_tokenizer

    make_tiny_model().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def once_per_engine(run: Callable[[str], list[dict]]) -> Callable[[str], list[dict]]:
    """``get(engine)``: ``run(engine)``'s results (both ranks), launched once and cached, a failure included (it is
    raised again, not rerun); skips ZeRO-3 where DeepSpeed is not installed. For module-scoped fixtures."""
    cache: dict[str, list[dict] | BaseException] = {}

    def get(engine: str) -> list[dict]:
        if engine == "zero3" and not deepspeed_available():
            pytest.skip("deepspeed is not installed (pip install -e '.[test]')")
        if engine not in cache:
            try:
                cache[engine] = run(engine)
            except BaseException as exc:  # noqa: BLE001  (kept and raised for every test that asks)
                cache[engine] = exc
        if isinstance(cache[engine], BaseException):
            raise cache[engine]
        return cache[engine]

    return get
