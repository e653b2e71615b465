"""Scale-invariance detection on real HF classes and small torch models; the plan switch that routes them."""

import pytest
import torch
from torch import nn

from archopt_plugins import build_optimizer, plan
from archopt_plugins.monitor import blocks
from archopt_plugins.roles.scale_invariance import detect_scale_invariance
from tiny_models import ConvNet, causal_lm_loss, tiny_llama, tiny_olmo2, tiny_qwen3


def _flags(model, inputs=None):
    report = detect_scale_invariance(model, inputs)
    return {fqn: inv.block_rows for fqn, inv in report.invariant.items()}, report


def test_qwen3_per_head_qk_norm_flags_q_and_k_per_head_and_nothing_else():
    flags, report = _flags(tiny_qwen3())
    expected = {f"model.layers.{i}.self_attn.{p}_proj.weight": 8 for i in range(2) for p in "qk"}
    assert flags == expected, report.rejected
    assert "4 candidates, 4 confirmed" in report.note


def test_olmo2_whole_qk_norm_and_norm_before_residual():
    flags, _ = _flags(tiny_olmo2())
    # q/k: RMSNorm over all heads at once; o_proj and down_proj feed post_*_layernorm *before* the
    # residual add in OLMo2, so they are invariant too (as whole matrices). v, gate, up are not.
    expected = {}
    for i in range(2):
        layer = f"model.layers.{i}."
        expected.update({layer + "self_attn.q_proj.weight": 32, layer + "self_attn.k_proj.weight": 16,
                         layer + "self_attn.o_proj.weight": 32, layer + "mlp.down_proj.weight": 32})
    assert flags == expected


def test_pre_norm_llama_and_post_norm_bert_have_none():
    assert _flags(tiny_llama())[0] == {}
    import transformers as t

    torch.manual_seed(0)
    bert = t.BertForMaskedLM(t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64))
    assert _flags(bert)[0] == {}


class PostNorm(nn.Module):
    """A post-norm block LN(x + W·h): the residual add between W and the norm breaks invariance."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(16, 32, bias=False)
        self.last = nn.Linear(32, 16, bias=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.last(torch.relu(self.inner(x))))


class SideUse(nn.Module):
    """W feeds a norm *and* the output directly: structure proposes it, the probe must refuse it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16, bias=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        y = self.proj(x)
        return self.norm(y) + 0.5 * y


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_gn = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.conv_bias_gn = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 8)
        self.lin_ln = nn.Linear(8, 12, bias=False)
        self.ln = nn.LayerNorm(12)
        self.lin_bias_ln = nn.Linear(12, 12)
        self.ln2 = nn.LayerNorm(12)
        self.lin_relu_ln = nn.Linear(12, 12, bias=False)
        self.ln3 = nn.LayerNorm(12)

    def forward(self, x):
        x = self.gn2(self.conv_bias_gn(torch.relu(self.gn(self.conv_gn(x))))).mean(dim=(2, 3))
        x = self.ln2(self.lin_bias_ln(self.ln(self.lin_ln(x))))
        return self.ln3(torch.relu(self.lin_relu_ln(x)))


def test_torch_modules_blocks_biases_and_residuals():
    assert _flags(PostNorm(), torch.randn(5, 16))[0] == {}
    flags, report = _flags(SideUse(), torch.randn(5, 16))
    assert flags == {} and "its output is used elsewhere" in report.rejected["proj.weight"]
    flags, report = _flags(ConvNet(), torch.randn(4, 3, 8, 8))
    assert flags == {"conv.weight": 1}  # BatchNorm: per output channel; its mean removes the conv bias
    flags, report = _flags(Mixed(), torch.randn(4, 3, 6, 6))
    assert flags == {"conv_gn.weight": 4, "lin_ln.weight": 12}
    assert "has a bias before GroupNorm" in report.rejected["conv_bias_gn.weight"]
    assert "has a bias before LayerNorm" in report.rejected["lin_bias_ln.weight"]
    assert "lin_relu_ln.weight" not in report.rejected  # the ReLU output is new memory: no edge at all


def test_detection_leaves_the_model_untouched():
    model = ConvNet()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    assert detect_scale_invariance(model, inputs).invariant  # it did run its probe forwards
    assert not model.training and not model.bn.training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k  # weights and BatchNorm running statistics


def test_zero_weights_and_missing_probe_inputs_are_reported_not_flagged():
    model = Mixed()
    with torch.no_grad():
        model.lin_ln.weight.zero_()
    flags, report = _flags(model, torch.randn(4, 3, 6, 6))
    assert "lin_ln.weight" not in flags and "all zeros" in report.rejected["lin_ln.weight"]
    flags, report = _flags(Mixed())
    assert flags == {} and "pass probe_inputs" in report.note


def test_plan_flags_and_summary():
    p = plan(tiny_qwen3(), "muon")
    q = p.entry("model.layers.0.self_attn.q_proj.weight")
    v = p.entry("model.layers.0.self_attn.v_proj.weight")
    assert (q.scale_invariant, q.invariant_block_rows, q.rule) == (True, 8, "muon")
    assert (v.scale_invariant, v.invariant_block_rows) == (False, 0)
    text = p.summary()
    assert "scale-invariant" in text and "per 8 rows" in text and "4 candidates, 4 confirmed" in text
    p = plan(tiny_olmo2(), "muon", scale_invariant="off")
    assert not any(e.scale_invariant for e in p.entries) and "scale-invariant" not in p.summary()


def test_switch_routes_invariant_weights_and_keeps_their_block_norms():
    model = tiny_qwen3()
    opt = build_optimizer(model, "muon", scale_invariant="spherical", spherical_lr=0.05, compute_dtype="float32",
                          overrides={"model.layers.1.self_attn.k_proj.weight": {"rule": "muon"}})
    rules = {e.fqn: (e.rule, e.hparams.get("block_rows")) for e in opt.plan.entries}
    assert rules["model.layers.0.self_attn.q_proj.weight"] == ("spherical", 8)
    assert rules["model.layers.1.self_attn.k_proj.weight"] == ("muon", None)  # an override's rule wins
    assert rules["model.layers.0.self_attn.v_proj.weight"] == ("muon", None)
    assert opt.plan.entry("model.layers.0.self_attn.q_proj.weight").hparams["lr"] == 0.05
    q = model.model.layers[0].self_attn.q_proj.weight
    norms = torch.linalg.vector_norm(blocks(q, None, 8), dim=1)
    start = q.detach().clone()
    for i in range(3):
        causal_lm_loss(model, seed=i).backward()
        opt.step()
        opt.zero_grad()
    assert torch.allclose(torch.linalg.vector_norm(blocks(q, None, 8), dim=1), norms, rtol=1e-5)
    assert not torch.equal(start, q)


def test_equilibrium_switch_inherits_the_base_rule_and_errors_are_loud():
    p = plan(tiny_qwen3(), "adamw", scale_invariant="equilibrium", lr=2e-3, weight_decay=0.1, betas=(0.8, 0.99))
    hp = p.entry("model.layers.0.self_attn.k_proj.weight").hparams
    assert (hp["mode"], hp["equilibrium_of"], hp["lr"], hp["weight_decay"], hp["momentum"], hp["direction"]) == (
        "equilibrium", "adamw", 2e-3, 0.1, 0.8, "momentum")
    with pytest.raises(ValueError, match=r"'scale_invariant': invalid value 'always'; expected one of"):
        plan(tiny_qwen3(), "muon", scale_invariant="always")
    with pytest.raises(ValueError, match=r"q_proj.weight.*mode='equilibrium'.*weight_decay=0"):
        plan(tiny_qwen3(), "muon", scale_invariant="equilibrium")
    with pytest.raises(ValueError, match=r"spherical_\* keywords \['lr'\] configure the spherical rule, which no"):
        plan(tiny_llama(), "muon", scale_invariant="spherical", spherical_lr=0.1)
    with pytest.raises(ValueError, match=r"needs the nn.Module"):
        plan(list(tiny_qwen3().named_parameters()), "muon", scale_invariant="spherical")
    with pytest.raises(ValueError, match=r"no probe batch \(pass probe_inputs"):
        plan(Mixed(), "muon", scale_invariant="spherical")
    flagged = plan(Mixed(), "muon", scale_invariant="spherical", probe_inputs=torch.randn(2, 3, 6, 6))
    assert flagged.entry("conv_gn.weight").rule == "spherical"
    assert flagged.entry("conv_gn.weight").hparams["block_rows"] == 4


def test_monitor_measures_invariant_blocks_of_the_whole_matrix_under_a_per_head_view():
    from archopt_plugins.monitor import GeometryMonitor

    model = tiny_olmo2()
    opt = build_optimizer(model, "muon", per_head=True, weight_decay=0.1, compute_dtype="float32")
    q = opt.plan.entry("model.layers.0.self_attn.q_proj.weight")
    assert q.structure.per_head and q.invariant_block_rows == 32  # the rule sees heads; invariance is whole
    monitor = GeometryMonitor(opt, per_param=True)
    causal_lm_loss(model).backward()
    monitor.before_step()
    opt.step()
    metrics = monitor.after_step()
    assert metrics["geometry/scale_invariant/equilibrium_angular_update"] == pytest.approx((2 * 0.02 * 0.1) ** 0.5)
    assert 0 < metrics["geometry/param/model.layers.0.self_attn.q_proj.weight/angular_update"] < 1
