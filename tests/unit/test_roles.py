"""Role detection on real transformers classes (built from configs) and on plain torch models."""

import pytest
import torch
from torch import nn

from archopt_plugins import plan
from archopt_plugins.roles import detect_roles
from tiny_models import ConvNet, tiny_gpt2, tiny_llama, tiny_mixtral

MATRIX_RULE_FREE = {"embedding", "output", "norm", "bias", "router", "vector"}


def _roles(model):
    return {p.fqn: p for p in detect_roles(model).params}


def test_llama_gqa_tied():
    model = tiny_llama(tied=True, heads=4, kv_heads=2)
    roles = _roles(model)
    emb = roles["model.embed_tokens.weight"]
    assert emb.role == "embedding" and emb.aliases == ("lm_head.weight",)
    assert "lm_head.weight" not in roles  # one tensor, one entry
    layer = "model.layers.0."
    assert roles[layer + "self_attn.q_proj.weight"].role == "attn_q"
    assert roles[layer + "self_attn.k_proj.weight"].role == "attn_k"
    assert roles[layer + "self_attn.v_proj.weight"].role == "attn_v"
    assert roles[layer + "self_attn.o_proj.weight"].role == "attn_out"
    assert roles[layer + "mlp.gate_proj.weight"].role == "mlp_in"
    assert roles[layer + "mlp.up_proj.weight"].role == "mlp_in"
    assert roles[layer + "mlp.down_proj.weight"].role == "mlp_out"
    assert roles[layer + "input_layernorm.weight"].role == "norm"
    assert roles["model.norm.weight"].role == "norm"
    assert len(roles) == len(list(model.parameters()))


def test_llama_untied_head_is_output():
    roles = _roles(tiny_llama(tied=False))
    assert roles["lm_head.weight"].role == "output"
    assert roles["model.embed_tokens.weight"].role == "embedding"


def test_gpt2_conv1d_is_transposed_and_fused_qkv_split_known():
    roles = _roles(tiny_gpt2(hidden=32, heads=4))
    qkv = roles["transformer.h.0.attn.c_attn.weight"]
    assert qkv.role == "attn_qkv" and qkv.structure.transposed
    split = qkv.structure.qkv
    assert (split.num_heads, split.num_kv_heads, split.head_dim, split.layout) == (4, 4, 8, "concat")
    assert roles["transformer.h.0.attn.c_proj.weight"].role == "attn_out"
    assert roles["transformer.h.0.mlp.c_fc.weight"].role == "mlp_in"
    assert roles["transformer.h.0.mlp.c_proj.weight"].role == "mlp_out"
    assert roles["transformer.h.0.attn.c_attn.bias"].role == "bias"
    assert roles["transformer.h.0.ln_1.bias"].role == "norm"
    assert roles["transformer.wpe.weight"].role == "embedding"
    assert roles["transformer.wte.weight"].aliases == ("lm_head.weight",)


def test_mixtral_stacked_experts_and_router():
    roles = _roles(tiny_mixtral(experts=4))
    experts = "model.layers.0.mlp.experts."
    for name in ("gate_up_proj", "down_proj"):
        entry = roles[experts + name]
        assert entry.role == "expert" and entry.structure.batch_dims == 1 and not entry.structure.transposed
    assert roles["model.layers.0.mlp.gate.weight"].role == "router"
    assert roles["lm_head.weight"].role == "output"


def test_listed_experts_with_linear_router():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 3, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(3))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.layers = nn.ModuleList(MoE() for _ in range(3))  # 3 layers = 3 experts: must not confuse

    roles = _roles(Model())
    assert roles["layers.0.gate.weight"].role == "router"
    assert roles["layers.1.experts.2.w1.weight"].role == "expert"
    assert roles["emb.weight"].role == "embedding"


def test_plain_torch_models():
    roles = _roles(ConvNet())
    assert roles["conv.weight"].role == "conv" and roles["conv.weight"].structure.flatten_kernel
    assert roles["bn.weight"].role == "norm"
    assert roles["fc.weight"].role == "hidden"
    assert roles["head.weight"].role == "output"
    assert roles["fc.bias"].role == "bias"

    layer = nn.TransformerEncoderLayer(32, 4, 64)
    roles = _roles(layer)
    assert roles["self_attn.in_proj_weight"].role == "attn_qkv"
    assert roles["self_attn.out_proj.weight"].role == "attn_out"
    assert roles["linear1.weight"].role == "mlp_in" and roles["linear2.weight"].role == "mlp_out"


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_mixtral])
def test_default_plan_never_gives_embeddings_or_head_a_matrix_rule(factory):
    p = plan(factory(), "muon")
    for e in p.entries:
        if e.role in MATRIX_RULE_FREE:
            assert e.rule == "adamw", e
        else:
            assert e.rule == "muon", e
    assert p.source == "module"


def test_named_params_and_plain_params():
    model = tiny_llama(tied=True)
    roles = {p.fqn: p.role for p in detect_roles(list(model.named_parameters())).params}
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "attn_q"
    assert roles["model.layers.0.mlp.down_proj.weight"] == "mlp_out"
    assert roles["model.norm.weight"] == "norm"

    shape_only = detect_roles(list(model.parameters()))
    assert shape_only.source == "shapes"
    assert {p.role for p in shape_only.params} == {"hidden", "vector"}
    assert "cannot be told" in plan(list(model.parameters())).summary()


def test_param_groups_carry_role_and_options():
    w, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.zeros(8))
    p = plan([{"params": [w], "role": "embedding"}, {"params": [b], "lr": 0.5}], "muon")
    assert p.entries[0].role == "embedding" and p.entries[0].rule == "adamw"
    assert p.entries[1].hparams["lr"] == 0.5


def test_frozen_params_are_left_out_and_all_frozen_is_an_error():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    assert "model.embed_tokens.weight" not in _roles(model)
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        detect_roles(model)


def test_bad_inputs():
    with pytest.raises(TypeError, match="got one tensor"):
        detect_roles(torch.zeros(3, requires_grad=True))
    w = nn.Parameter(torch.randn(2, 2))
    with pytest.raises(ValueError, match="claimed twice"):
        detect_roles([{"params": [w]}, {"params": [w]}])
    with pytest.raises(ValueError, match="unknown role 'embed'"):
        detect_roles([{"params": [w], "role": "embed"}])
    with pytest.raises(TypeError, match="mixed input"):
        detect_roles([w, ("a", w)])
