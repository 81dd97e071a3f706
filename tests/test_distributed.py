"""GeoRA under DDP, FSDP2 and DeepSpeed ZeRO-3: two CPU processes per engine, launched as users launch them.

Each engine runs once (``accelerate launch --config_file examples/multi_gpu/<engine>.yaml``, gloo on CPU) the worker
``tests/distributed/worker_grpo.py``: GeoRA initialisation, TRL GRPOTrainer for 2 steps with
``peft_config=GeoRAConfig(...)``, gathering, saving and reloading. Both ranks write JSON; the tests below assert on
it. accelerate silently falls back to plain DDP or to independent processes in several CPU set-ups (all exit 0), so
every engine test first asserts that the intended engine really ran.

The ZeRO-3 run uses examples/multi_gpu/zero3.json plus two test-only keys: ``stage3_param_persistence_threshold: 0``
(else ZeRO-3 keeps these tiny weights unpartitioned and nothing would be tested) and
``zero_allow_untested_optimizer: true`` (DeepSpeed's CPU build has no fused Adam; the Trainer's torch AdamW is used).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from peft_geora import GeoRAConfig
from peft_geora.distributed import broadcast_from_rank0, full_shape, gathered

from .conftest import make_tiny_model
from .grpo_utils import make_tiny_tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "multi_gpu"
WORKER = ROOT / "tests" / "distributed" / "worker_grpo.py"
LAUNCH_TIMEOUT_S = 420
ENGINES = ("ddp", "fsdp2", "zero3")
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}
EXPECTED_WRAPPER = {"ddp": "DistributedDataParallel", "fsdp2": "FSDPPeftModel", "zero3": "DeepSpeedEngine"}
SHARDED = {"ddp": "plain", "fsdp2": "dtensor", "zero3": "zero3"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _zero3_test_config(tmp: Path) -> Path:
    config = json.loads((EXAMPLES / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config["zero_allow_untested_optimizer"] = True
    path = tmp / "zero3_test.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def launch(engine: str, model_dir: Path, out: Path) -> list[dict]:
    """Run the worker on two CPU processes with ``engine``'s example config; return both ranks' results."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / f"{engine}.yaml")]
    if engine == "zero3":
        cmd += ["--deepspeed_config_file", str(_zero3_test_config(out))]
    cmd += ["--num_processes", "2", "--main_process_port", str(_free_port()), str(WORKER)]
    cmd += ["--engine", engine, "--model", str(model_dir), "--out", str(out)]
    launcher_vars = ("ACCELERATE_", "FSDP_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """``launched(engine)``: that engine's two results, launched once per module (a failure is kept, not rerun)."""
    cache: dict[str, list[dict] | BaseException] = {}

    def get(engine: str) -> list[dict]:
        if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed is not installed (pip install -e '.[test]')")
        if engine not in cache:
            try:
                cache[engine] = launch(engine, tiny_model_dir, tmp_path_factory.mktemp(engine))
            except BaseException as exc:
                cache[engine] = exc
        if isinstance(cache[engine], BaseException):
            raise cache[engine]
        return cache[engine]

    return get


@pytest.fixture(params=ENGINES)
def run(request, launched) -> tuple[str, list[dict]]:
    return request.param, launched(request.param)


def test_the_intended_engine_ran(run):
    engine, ranks = run
    for result in ranks:
        facts = result["facts"]
        assert facts["distributed_type"] == EXPECTED_TYPE[engine]
        assert facts["num_processes"] == facts["world_size"] == 2 and facts["backend"] == "gloo"
        assert facts["wrapper"] == EXPECTED_WRAPPER[engine]
        assert facts["fsdp2_module"] == (engine == "fsdp2")
        assert facts.get("zero_stage") == (3 if engine == "zero3" else None)
        for probe in (result["probe_after_train"], result["factor_after_train"]):  # a base weight, a GeoRA factor
            assert probe["kind"] == SHARDED[engine]
            if engine != "ddp":
                assert probe["local_numel"] < probe["full_numel"]
    assert [r["rank"] for r in ranks] == [0, 1]


def test_init_on_full_weights_is_identical_on_every_rank(run):
    engine, (rank0, rank1) = run
    for result in (rank0, rank1):
        assert result["is_geora"] == "GeoRAConfig"
        assert result["init_anchors_equal_reference"]  # == a single-process GeoRA init of the same weights, bitwise
        if engine == "zero3":  # partitioned at load, gathered for the SVD, still partitioned afterwards
            for probe in (result["probe_at_load"], result["probe_after_init"]):
                assert probe["kind"] == "zero3" and probe["status"] == "NOT_AVAILABLE" and probe["local_numel"] == 0
                assert probe["partition_numel"] < probe["full_numel"]
        else:  # FSDP2 and DDP: GeoRA runs before the model is sharded / wrapped, on full weights
            assert result["probe_after_init"]["kind"] == "plain"
    assert rank0["init_anchor_digests"] == rank1["init_anchor_digests"]
    assert rank0["solver_digests"] == rank1["solver_digests"]  # every solver, without any broadcast


def test_training_moves_only_the_factors_and_ranks_agree(run):
    engine, (rank0, rank1) = run
    assert rank0["full_digests"] == rank1["full_digests"]  # gathered params and buffers, bit for bit
    for result in (rank0, rank1):
        assert result["base_untouched"] and result["anchors_unchanged"] and result["factors_trained"]
    # beta > 0: the KL reference is the disabled adapter, equal to the policy at step 1
    assert len(rank0["kl"]) == 2 and rank0["kl"][0] == 0.0 and rank0["kl"][1] > 0


def test_invariants_hold_on_the_gathered_weights(run):
    engine, ranks = run
    for result in ranks:
        plain = result["plain"]
        assert plain["plain_vs_engine_logits"] <= 1e-6  # the engine computes the plain model's function
        assert plain["disabled_vs_base_bitwise"]
        assert len(plain["deltas"]) == 14
        for delta in plain["deltas"]:  # merged W - W == s (B A - B0 A0), and the delta is not trivially 0
            assert delta["delta_norm"] > 1e-3
            assert delta["merged_minus_w_vs_delta"] <= 1e-6
        if "engine_disabled_vs_base" in result:
            assert result["engine_disabled_vs_base"] <= 1e-6


def test_adapter_saved_on_rank0_reloads_exactly(run):
    _, ranks = run
    for result in ranks:
        assert result["plain"]["reload_tensors"] == 56  # 14 modules x (A, B) x (delta, anchor)
        assert result["plain"]["reload_bitwise"] and result["plain"]["reload_logits_bitwise"]


def test_zero3_refuses_a_weight_it_could_not_gather(launched):
    ranks = launched("zero3")
    for result in ranks:
        assert "was not gathered" in result["ungathered"]["error"]
        assert "(64, 64)" in result["ungathered"]["error"]
        assert result["ungathered"]["lora_layers_left"] == 0  # rolled back
        assert result["broadcast_from_rank0"] == [1.0, 1.0, 1.0]  # rank 0's anchors win
        assert result["zero3_reload_probe"]["kind"] == "zero3" and result["zero3_reload_factors_equal"]


def test_zero3_partitioned_factors_keep_their_shapes(launched):
    ranks = launched("zero3")
    assert all(result["repr_after_train"] is True for result in ranks)


def test_fsdp2_refuses_an_already_sharded_model(launched):
    ranks = launched("fsdp2")
    for result in ranks:
        after = result["after_sharding"]
        assert after["probe"]["kind"] == "dtensor" and after["probe"]["local_numel"] < after["probe"]["full_numel"]
        assert "already sharded" in after["error"] and "before fully_shard" in after["error"]
        assert after["lora_layers_left"] == 0


# ---- in-process: no launcher needed ----


def test_zero3_weight_without_a_process_group_is_refused():
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this pytest process")
    model = make_tiny_model()
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.ds_id, weight.ds_shape = 0, weight.shape  # what ZeRO-3 leaves on a partitioned parameter
    with pytest.raises(RuntimeError, match="'model.layers.0.self_attn.q_proj' is partitioned by DeepSpeed ZeRO-3"):
        get_peft_model(model, GeoRAConfig(r=4))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_helpers_leave_plain_tensors_alone():
    weight = torch.randn(6, 4)
    with gathered(weight) as full:
        assert full is weight
    assert full_shape(weight) == (6, 4)
    (same,) = broadcast_from_rank0([weight], like=weight)
    assert same is weight
