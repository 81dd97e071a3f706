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

import pytest

from ..distributed.launcher import ROOT, launch, once_per_engine

pytestmark = pytest.mark.slow

WORKER = ROOT / "tests" / "distributed" / "worker_grpo.py"
TRAINER_WORKER = ROOT / "tests" / "distributed" / "worker_trainer.py"
ENGINES = ("ddp", "fsdp2", "zero3")
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}
EXPECTED_WRAPPER = {"ddp": "DistributedDataParallel", "fsdp2": "FSDPPeftModel", "zero3": "DeepSpeedEngine"}
SHARDED = {"ddp": "plain", "fsdp2": "dtensor", "zero3": "zero3"}


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """``launched(engine)``: that engine's two results, launched once per module (a failure is kept, not rerun)."""

    def run(engine: str) -> list[dict]:
        out = tmp_path_factory.mktemp(engine)
        return launch(engine, WORKER, out, ["--engine", engine, "--model", str(tiny_model_dir)])

    return once_per_engine(run)


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


# the tiny Llama's projections as (in, out): hidden 64, intermediate 96, 2 of 4 heads for keys and values
PROJECTIONS = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (64, 32),
    "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (64, 96),
    "mlp.up_proj": (64, 96),
    "mlp.down_proj": (96, 64),
}
RANK = 4  # worker_grpo.py's GeoRAConfig(r=4)


def test_zero3_partitioned_factors_keep_their_shapes(launched):
    """After training, ZeRO-3 holds the deltas partitioned (nothing on a rank outside a forward); ``repr(model)``,
    which PEFT's ``disable_adapter()`` calls, still prints every factor's true shape (read from the anchors), and the
    anchors and the deltas' full shapes are (r x in) and (out x r)."""
    reprs, anchors = {}, {}
    for layer in range(2):
        for name, (n_in, n_out) in PROJECTIONS.items():
            module = f"base_model.model.model.layers.{layer}.{name}"
            reprs[f"{module}.lora_A.default"] = f"AnchoredA(in_features={n_in}, rank={RANK} (+{RANK} anchored))"
            reprs[f"{module}.lora_B.default"] = f"AnchoredB(rank={RANK} (+{RANK} anchored), out_features={n_out})"
            anchors[f"{module}.lora_A.default.anchor"] = [RANK, n_in]
            anchors[f"{module}.lora_B.default.anchor"] = [n_out, RANK]
    deltas = {name.removesuffix(".anchor") + ".delta": shape for name, shape in anchors.items()}
    for result in launched("zero3"):
        shapes = result["repr_after_train"]
        assert isinstance(shapes, dict), shapes  # else: the exception repr() raised
        assert shapes["factor_reprs"] == reprs
        # the whole model's repr prints the same lines (the two identical decoder layers once: "2 x LlamaDecoderLayer")
        assert set(shapes["model_repr_lines"]) == set(reprs.values())
        assert shapes["anchor_shapes"] == anchors and shapes["delta_full_shapes"] == deltas
        # partitioned: the shapes above are not read off local tensors
        assert shapes["delta_local_numel"] < sum(a * b for a, b in deltas.values())


def test_fsdp2_refuses_an_already_sharded_model(launched):
    ranks = launched("fsdp2")
    for result in ranks:
        after = result["after_sharding"]
        assert after["probe"]["kind"] == "dtensor" and after["probe"]["local_numel"] < after["probe"]["full_numel"]
        assert "already sharded" in after["error"] and "before fully_shard" in after["error"]
        assert after["lora_layers_left"] == 0


# ---- FSDP2: resuming a Trainer checkpoint (tests/distributed/worker_trainer.py, plain Trainer, LM loss) ----


@pytest.fixture(scope="module")
def fsdp2_resumed(tiny_model_dir, tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """Two launches with fsdp2.yaml (FULL_STATE_DICT): GeoRA r=4 trained 3 steps with a checkpoint per step, then a
    new launch that resumes from checkpoint-2 for the third step (base check ``"raise"``)."""
    model = ["--engine", "fsdp2", "--model", str(tiny_model_dir)]
    first = tmp_path_factory.mktemp("fsdp2_train")
    trained = launch("fsdp2", TRAINER_WORKER, first, ["--task", "train", *model])
    out = tmp_path_factory.mktemp("fsdp2_resume")
    resumed = launch("fsdp2", TRAINER_WORKER, out, ["--task", "resume", *model, "--first-run", str(first)])
    return trained, resumed


def test_fsdp2_resume_from_checkpoint_is_exact(fsdp2_resumed):
    trained, resumed = fsdp2_resumed
    assert trained[0]["checkpoints"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert trained[0]["final_digests"] == trained[1]["final_digests"]
    for result in resumed:
        assert result["facts"]["distributed_type"] == "FSDP" and result["facts"]["fsdp2_module"]
        assert result["steps_run"] == 1 and result["global_step"] == 3
        loaded = result["loaded_equal_checkpoint"]  # as the resumed run starts: the checkpoint's tensors
        assert len(loaded) == len(result["checkpoint_keys"]) == 56 and all(loaded.values())
        # after the third step: bit for bit the run that did not stop
        assert result["final_keys_match"] and len(result["final_bitwise"]) == 56, result["final_max_diff"]
        assert all(result["final_bitwise"].values()), result["final_max_diff"]


def test_fsdp2_resume_runs_the_base_check_on_the_shards(fsdp2_resumed):
    _, resumed = fsdp2_resumed
    for result in resumed:
        before, after = result["check_at_resume"]["before"], result["check_at_resume"]["after"]
        assert after["checks"] > before["checks"]
        assert after["fingerprints"] - before["fingerprints"] == 14  # every adapted layer's base weight, whole
        assert after["mismatched"] == []
        # SHARDED_STATE_DICT: accelerate's save_fsdp_model / load_fsdp_model (DCP) checks the same way
        before, after = result["check_at_sharded_load"]["before"], result["check_at_sharded_load"]["after"]
        assert after["fingerprints"] - before["fingerprints"] == 14 and after["mismatched"] == []
        assert result["sharded_load_unchanged"]


def test_fsdp2_gathered_reads_the_whole_dtensor_weight(fsdp2_resumed):
    _, resumed = fsdp2_resumed
    for result in resumed:
        assert result["probe"]["kind"] == "dtensor" and result["probe"]["local_numel"] < result["probe"]["full_numel"]
        assert result["gathered_is_full"]  # a plain tensor equal to the weight before sharding
        assert result["fingerprint_on_shards_equal"]  # == the fingerprint recorded at init, on the full weight


def test_fsdp2_resume_onto_a_changed_base_is_caught(fsdp2_resumed):
    _, resumed = fsdp2_resumed
    for result in resumed:  # one shard of q_proj's weight doubled, then the checkpoint loaded again
        message = result["changed_base"]
        assert message and "1 adapted module(s)" in message and "model.layers.0.self_attn.q_proj" in message


def test_single_process_reference_reproduces_fsdp2_training(fsdp2_resumed):
    """The machinery of tests/integration/test_distributed_precision.py: a single-process run on the engine's recorded
    global batches from its initial state (the Trainer's optimizer and clipping) matches a float32 FSDP2 run to
    rounding."""
    trained, _ = fsdp2_resumed
    for result in trained:
        assert result["engine_vs_fp32_reference"]["max"] < 1e-5


# ---- mixture-of-experts parameters under ZeRO-3 and FSDP2 (tests/distributed/worker_moe.py, tiny Qwen3-MoE, plain
# Trainer with GeoRADiagnosticsCallback) ----

MOE_WORKER = ROOT / "tests" / "distributed" / "worker_moe.py"


@pytest.fixture(scope="module")
def moe_launched(tmp_path_factory):
    """``moe_launched(engine)``: both ranks' results of worker_moe.py, launched once per engine and module."""

    def run(engine: str) -> list[dict]:
        from ..moe_models import build

        model_dir = tmp_path_factory.mktemp("tiny_qwen3_moe")
        build("qwen3_moe").save_pretrained(model_dir)
        out = tmp_path_factory.mktemp(f"{engine}_moe")
        return launch(engine, MOE_WORKER, out, ["--engine", engine, "--model", str(model_dir)])

    return once_per_engine(run)


@pytest.fixture
def zero3_moe(moe_launched) -> list[dict]:
    return moe_launched("zero3")


@pytest.fixture(params=["zero3", "fsdp2"])
def moe_run(request, moe_launched) -> tuple[str, list[dict]]:
    return request.param, moe_launched(request.param)


def test_zero3_moe_experts_partitioned_and_init_equals_single_process(zero3_moe):
    rank0, rank1 = zero3_moe
    for result in zero3_moe:
        assert result["facts"]["distributed_type"] == "DEEPSPEED" and result["facts"]["zero_stage"] == 3
        assert result["facts"]["world_size"] == 2
        for stage in ("probe_at_load", "probe_after_init", "probe_after_train"):
            for name, probe in result[stage].items():
                assert probe["kind"] == "zero3" and probe["partition_numel"] < probe["full_numel"], (stage, name)
                if stage != "probe_after_train":
                    assert probe["status"] == "NOT_AVAILABLE" and probe["local_numel"] == 0, (stage, name)
        targets = result["parameter_targets"]
        assert targets["model.layers.0.mlp.experts.base_layer"] == ["model.layers.0.mlp.experts.gate_up_proj", 4]
        assert targets["model.layers.0.mlp.experts"] == ["model.layers.0.mlp.experts.down_proj", 4]
        # 2 layers x (4 attention + gate_up + down + router) x (A, B) x (delta, anchor)
        assert result["init_factor_count"] == 56 and result["init_expert_factor_count"] == 16
        assert result["init_equal_reference"], result["init_unequal"]  # bitwise == a single-process init
    assert rank0["init_factor_digests"] == rank1["init_factor_digests"]


def test_moe_training_moves_the_expert_deltas_and_reloads_exactly(moe_run):
    engine, (rank0, rank1) = moe_run
    assert rank0["full_digests"] == rank1["full_digests"]
    for result in (rank0, rank1):
        if engine == "fsdp2":
            assert result["facts"]["distributed_type"] == "FSDP" and result["facts"]["fsdp2_module"]
            assert all(p["kind"] == "dtensor" for p in result["probe_after_train"].values())
            assert result["init_equal_reference"], result["init_unequal"]
        assert result["base_untouched"] and result["anchors_unchanged"]
        moved = result["expert_deltas_moved"]
        assert len(moved) == 8 and all(moved.values()), moved  # 2 layers x 2 parameters x (dA, dB)
        assert result["reload_tensors"] == 56 and result["reload_expert_tensors"] == 16
        assert result["reload_bitwise"] and result["reload_logits_bitwise"]


def test_moe_diagnostics_callback_gathers_on_every_rank(moe_run):
    """Rank 0 logs, at every step, the callback's numbers of every layer (experts and router included), gathered
    (ZeRO-3 partitions / FSDP2 shards); at the last step they equal the callback on a plain model of the final
    state."""
    engine, (rank0, rank1) = moe_run
    rows = {row["step"]: row for row in rank0["log_history"] if "loss" in row}
    assert set(rows) == {1, 2}
    for row in rows.values():
        assert row["geora/layers"] == 14.0, engine  # none skipped
        assert row["geora/relative_norm/mlp.experts.gate_up_proj"] > 0.0
    assert len(rank0["callback_per_expert"]) == 16 and rank1["callback_per_expert"] == []
    plain = rank0["callback_plain"]
    logged = {k: v for k, v in rows[2].items() if k.startswith("geora/") and k != "geora/seconds"}
    assert logged.keys() == {k for k in plain if k != "geora/seconds"}
    for key, value in logged.items():
        assert value == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
