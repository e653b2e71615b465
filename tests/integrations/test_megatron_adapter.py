"""Megatron adapter in one process (CPU smoke tests under the test-only CUDA shim): roles of a real
GPTModel, the complete-tensor plan under TP, config refusals, enable()/disable() and the version gate.

The distributed behaviour (parity under TP and TP × DP, checkpoints) is in tests/distributed/test_megatron.py.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("megatron.core")

from archopt_plugins.integrations import megatron as archopt_megatron  # noqa: E402
from archopt_plugins.integrations.megatron.config import hparams_from_config  # noqa: E402
from archopt_plugins.integrations.megatron.layout import global_plan, piece_of  # noqa: E402
from archopt_plugins.shard.layout import Block, BlockRange, FlatRange  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_world1():
    """A one-process gloo group with Megatron's model-parallel state (TP 1), torn down afterwards."""
    import torch.distributed as dist

    from megatron_cpu_shim import cpu_shim

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    with cpu_shim():
        import megatron_models as mm

        mm.setup_parallel(1)
        try:
            yield mm
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            archopt_megatron.disable()
            if created:
                dist.destroy_process_group()


def test_gpt_roles_come_from_module_structure(megatron_world1):
    from archopt_plugins import plan

    mm = megatron_world1
    entries = {e.fqn: e for e in plan(mm.build_gpt("llama"), "muon").entries}
    assert entries["embedding.word_embeddings.weight"].role == "embedding"  # VocabParallelEmbedding
    assert entries["output_layer.weight"].role == "output"  # LanguageModule.output_layer, untied
    qkv = entries["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.role == "attn_qkv" and qkv.rule == "muon"
    assert (qkv.structure.qkv.num_heads, qkv.structure.qkv.num_kv_heads, qkv.structure.qkv.layout) == (4, 2, "grouped")
    assert entries["decoder.layers.0.self_attention.linear_proj.weight"].role == "attn_out"
    assert entries["decoder.layers.0.mlp.linear_fc1.weight"].role == "mlp_in"
    assert entries["decoder.layers.0.mlp.linear_fc2.weight"].role == "mlp_out"
    assert entries["decoder.final_layernorm.weight"].role == "norm"
    assert {entries[f].rule for f in ("embedding.word_embeddings.weight", "output_layer.weight")} == {"adamw"}
    tied = {e.fqn: e for e in plan(mm.build_gpt("gpt"), "muon").entries}
    assert "output_layer.weight" not in tied and tied["embedding.word_embeddings.weight"].role == "embedding"
    assert tied["decoder.layers.0.mlp.linear_fc1.bias"].role == "bias"


def test_complete_tensor_plan_and_pieces_under_tp():
    """TP-local shapes and the local QKV split become the complete ones; pieces land where they belong."""
    from archopt_plugins.planner.plan import Plan, PlanEntry
    from archopt_plugins.roles.types import ParamStructure, QKVSplit

    qkv = torch.nn.Parameter(torch.zeros(32, 24))  # one of two query groups per rank: (2 + 2) heads x 8 rows
    qkv.tensor_model_parallel, qkv.partition_dim = True, 0
    proj = torch.nn.Parameter(torch.zeros(24, 8))
    proj.tensor_model_parallel, proj.partition_dim = True, 1
    norm = torch.nn.Parameter(torch.zeros(24))
    local = Plan("muon", (PlanEntry("qkv", (32, 24), "attn_qkv", "muon", {}, structure=ParamStructure(
        qkv=QKVSplit(2, 1, 8, "grouped"))), PlanEntry("proj", (24, 8), "attn_out", "muon", {}),
        PlanEntry("norm", (24,), "norm", "adamw", {})), "module", {})
    full = {e.fqn: e for e in global_plan(local, {"qkv": qkv, "proj": proj, "norm": norm}, tp_size=2).entries}
    assert full["qkv"].shape == (64, 24) and full["qkv"].structure.qkv == QKVSplit(4, 2, 8, "grouped")
    assert full["proj"].shape == (24, 16) and full["norm"].shape == (24,)
    # TP rank 1, whole shards (DP 1) and distributed-optimizer ranges of them
    assert piece_of(proj, 1, 2, None) == Block((0, 8), (24, 8))
    assert piece_of(proj, 1, 2, (0, 192)) == Block((0, 8), (24, 8))
    assert piece_of(proj, 1, 2, (5, 100)) == BlockRange(Block((0, 8), (24, 8)), 5, 100)
    assert piece_of(qkv, 1, 2, (5, 100)) == FlatRange(32 * 24 + 5, 32 * 24 + 100)  # row block: contiguous
    assert piece_of(norm, 1, 2, (3, 7)) == FlatRange(3, 7)  # replicated over TP
    assert piece_of(norm, 0, 2, (7, 7)) == FlatRange(0, 0)  # nothing here


@pytest.mark.parametrize("changes, message", [
    ({"fp16": True, "bf16": False}, r"OptimizerConfig.fp16=True is not supported .* train in bf16"),
    ({"use_distributed_optimizer": False}, r"use_distributed_optimizer=False .* Set use_distributed_optimizer=True"),
    ({"use_layer_wise_distributed_optimizer": True}, r"use_layer_wise_distributed_optimizer=True is not supported"),
    ({"optimizer_cpu_offload": True}, r"optimizer_cpu_offload=True is not supported"),
    ({"lr": None}, r"OptimizerConfig.lr is None"),
    ({"optimizer": "archopt_sgdd"}, r"archopt has no optimizer 'sgdd'; use one of: .*archopt_muon"),
])
def test_unsupported_configs_raise_naming_the_field(megatron_world1, changes, message):
    mm = megatron_world1
    config = mm.optimizer_config("muon")
    for key, value in changes.items():
        setattr(config, key, value)
    model = mm.build_gpt("llama")
    with pytest.raises(ValueError, match=message):
        archopt_megatron.build_megatron_optimizer(config, [mm.wrap_ddp(model)])


def test_model_without_distributed_optimizer_buffers_is_refused(megatron_world1):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    mm = megatron_world1
    model = mm.build_gpt("llama")
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=False), model)
    with pytest.raises(ValueError, match=r"DistributedDataParallelConfig\(use_distributed_optimizer=True\)"):
        archopt_megatron.build_megatron_optimizer(mm.optimizer_config("muon"), [ddp])


def test_megatron_overrides_beyond_the_standard_ones_are_refused(megatron_world1):
    from megatron.core.optimizer import ParamKey, get_megatron_optimizer

    mm = megatron_world1
    archopt_megatron.enable()
    ddp = mm.wrap_ddp(mm.build_gpt("llama"))
    with pytest.raises(ValueError, match=r"config_overrides other than Megatron's standard ones .* overrides"):
        get_megatron_optimizer(mm.optimizer_config("muon"), [ddp], config_overrides={ParamKey(name="*.bias"): {
            "wd_mult": 0.5}})


def test_config_fields_map_to_archopt_keywords():
    from megatron.core.optimizer import OptimizerConfig

    config = OptimizerConfig(optimizer="archopt_muon", lr=0.02, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9,
                             adam_eps=1e-6)
    config.archopt_hparams = {"momentum": 0.9, "weight_decay": 0.0}  # explicit keywords win
    assert hparams_from_config(config, "muon") == {"lr": 0.02, "weight_decay": 0.0, "adamw_betas": (0.8, 0.9),
                                                  "adamw_eps": 1e-6, "momentum": 0.9}
    assert hparams_from_config(config, "adamw")["betas"] == (0.8, 0.9)


def test_enable_routes_archopt_names_and_leaves_megatron_names_alone(megatron_world1):
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    mm = megatron_world1
    archopt_megatron.disable()  # an earlier test may have enabled it
    original = mcore_optimizer._get_megatron_emerging_optimizer
    archopt_megatron.enable()
    archopt_megatron.enable()  # idempotent
    ddp = mm.wrap_ddp(mm.build_gpt("llama"))
    opt = get_megatron_optimizer(mm.optimizer_config("muon"), [ddp])
    inner = opt.chained_optimizers[0]
    assert type(inner).__name__ == "ArchOptDistributedOptimizer"
    assert inner.optimizer.archopt.plan.entry("decoder.layers.0.mlp.linear_fc1.weight").rule == "muon"
    adam = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
                                  [mm.wrap_ddp(mm.build_gpt("llama"))])
    assert type(adam.chained_optimizers[0]).__name__ == "DistributedOptimizer"
    archopt_megatron.disable()
    assert mcore_optimizer._get_megatron_emerging_optimizer is original


def test_one_process_step_matches_plain_archopt(megatron_world1):
    """TP 1 × DP 1 through Megatron's wrapper equals a plain ArchOpt on the same model (fp32)."""
    mm = megatron_world1
    config = mm.optimizer_config("muon")
    _, _, ref = mm.reference("llama", "muon", config)
    mm.setup_parallel(1)
    model = mm.build_gpt("llama")
    ddp = mm.wrap_ddp(model)
    opt = mm.megatron_optimizer(ddp, config)
    for tokens, labels in mm.batches():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        mm.loss_of(ddp, tokens, labels).backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
    worst, where = mm.parity(ref, {n: p.detach() for n, p in model.named_parameters()})
    assert worst <= 1e-6, (worst, where)


def test_unsupported_megatron_version_is_refused():
    with pytest.raises(archopt_megatron.UnsupportedMegatronVersion, match=r"supports megatron-core >=0.19,<0.20, "
                       r"found 0.15.0.*pip install 'megatron-core==0.19.2'"):
        archopt_megatron.check_megatron_version("0.15.0")
    assert archopt_megatron.check_megatron_version("0.19.2") == "0.19.2"


def test_shim_is_not_shipped():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder in ("archopt_plugins", "integrations"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name)) as f:
                        text = f.read()
                    assert "import megatron_cpu_shim" not in text and "from megatron_cpu_shim" not in text, name


def test_megatron_recipe_validates_and_scales_out_through_its_launch_section(tmp_path, monkeypatch):
    """The shipped Megatron recipe: valid as shipped (8 GPUs, TP 2 × DP 4); 4 nodes give 4 torchrun commands of
    8 processes each and TP 2 × DP 16 with fewer accumulation steps; a CPU run is refused outside the tests."""
    import yaml

    from archopt_plugins.recipe.errors import RecipeError
    from archopt_plugins.recipe.launch import node_commands
    from archopt_plugins.recipe.validate import load_recipe, validate_data

    path = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "gpu", "megatron_llama_tp2_8gpu.yaml")
    recipe = load_recipe(path)
    assert (recipe.backend.kind, recipe.data_parallel_size, recipe.grad_accum) == ("megatron", 4, 4)
    big = load_recipe(path, ["launch.nodes=4", "launch.rdzv_endpoint=head:29500"])
    assert (big.data_parallel_size, big.grad_accum) == (16, 1)
    commands = node_commands(big, tmp_path / "recipe.yaml", tmp_path, resume=False)
    assert len(commands) == 4 and all("--nproc-per-node=8" in c and "--nnodes=4" in c for c in commands)
    data = yaml.safe_load(open(path).read())
    data["backend"]["device"] = "cpu"
    monkeypatch.delenv("ARCHOPT_MEGATRON_CPU_SHIM", raising=False)  # set only while the test shim is active
    with pytest.raises(RecipeError, match=r"backend.device.*megatron-core needs CUDA"):
        validate_data(data)
