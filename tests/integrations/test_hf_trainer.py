"""The HF Trainer with archopt optimizers, one process: both ways in, the real model's plan, the
no-decay convention, the plan printed once, exact resume, and the hf-run launcher.

Tiny transformers models built from configs (no downloads), a handful of steps each.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

import archopt_plugins as ao  # noqa: E402
from archopt_plugins.cli import main as archopt_main  # noqa: E402
from archopt_plugins.integrations.hf import ArchOptTrainer, ArchOptTrainingArguments, disable, enable  # noqa: E402
from hf_stock_train import InOrderTrainer, TokenDataset  # noqa: E402
from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402

SCRIPT = __import__("pathlib").Path(__file__).with_name("hf_stock_train.py")
FP32 = "compute_dtype=float32"  # exactness comparisons need fp32 Newton–Schulz (DESIGN.md)


@pytest.fixture
def enabled():
    enable()
    yield
    disable()


def trainer_args(tmp_path, cls=TrainingArguments, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return cls(**base)


def rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pb = dict(b.named_parameters())
    with torch.no_grad():
        return max(float((p - pb[n]).norm() / p.norm()) for n, p in a.named_parameters())


def test_trainer_step_equals_a_hand_written_archopt_loop(enabled, tmp_path, capsys):
    """TrainingArguments(optim="archopt_muon") + the stock Trainer == build_optimizer in a plain loop:
    --learning_rate, --weight_decay and string --optim_args arrive typed and in the right place."""
    args = trainer_args(tmp_path, optim="archopt_muon", optim_args=f"momentum=0.9,adamw_lr=0.01,{FP32}",
                        learning_rate=0.02, weight_decay=0.1, max_steps=4, lr_scheduler_type="constant",
                        max_grad_norm=0.0)
    data = TokenDataset(16, 12, 64)
    model = tiny_llama(seed=0)
    trainer = InOrderTrainer(model=model, args=args, train_dataset=data)
    trainer.train()

    ref = tiny_llama(seed=0)
    opt = ao.build_optimizer(ref, "muon", lr=0.02, weight_decay=0.1, momentum=0.9, adamw_lr=0.01,
                             compute_dtype="float32")
    assert trainer.optimizer.optimizer.plan.entries == opt.plan.entries  # (accelerate wraps it)
    for step in range(4):
        ids = data.ids[4 * step: 4 * step + 4]
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = rel_diff(ref, tiny_llama(seed=0))
    assert moved > 1e-2  # the comparison below is not trivially satisfied
    assert rel_diff(ref, model) < 1e-5
    assert capsys.readouterr().out.count("ArchOpt plan 'muon'") == 1  # printed once


def test_plan_sees_the_real_model_tied_embeddings_gqa_and_no_decay(enabled, tmp_path):
    args = trainer_args(tmp_path, optim="archopt_muon", learning_rate=0.02, weight_decay=0.1)
    model = tiny_llama(tied=True, kv_heads=2)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(8, 12, 64))
    plan = trainer.create_optimizer().plan
    emb = plan.entry("model.embed_tokens.weight")
    assert emb.role == "embedding" and emb.aliases == ("lm_head.weight",) and emb.rule == "adamw"
    k = plan.entry("model.layers.0.self_attn.k_proj.weight")
    assert (k.role, k.rule, k.shape) == ("attn_k", "muon", (16, 32))  # 2 kv heads of 8
    assert plan.entry("model.layers.0.self_attn.q_proj.weight").hparams["weight_decay"] == 0.1
    assert plan.entry("model.norm.weight").hparams["weight_decay"] == 0.0


def test_stock_trainer_decay_convention_is_kept_exactly(enabled, tmp_path):
    """AdamW everywhere on GPT-2 (biases, LayerNorms, fused QKV, tied head): weight decay exactly
    where the stock Trainer would apply it."""
    args = trainer_args(tmp_path, optim="archopt_adamw", learning_rate=1e-3, weight_decay=0.05)
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(8, 12, 64))
    plan = trainer.create_optimizer().plan
    decay = set(trainer.get_decay_parameter_names(model))
    assert any(n.endswith("bias") for n, _ in model.named_parameters())
    for name, _ in model.named_parameters():
        assert plan.entry(name).hparams["weight_decay"] == (0.05 if name in decay else 0.0), name


class NoEmbeddingDecayTrainer(ArchOptTrainer):
    def get_decay_parameter_names(self, model):
        return [n for n in super().get_decay_parameter_names(model) if "embed" not in n]


def test_subclass_trainer_honours_its_own_decay_rule_and_overrides(tmp_path, capsys):
    args = trainer_args(tmp_path, cls=ArchOptTrainingArguments, optim="archopt_adamw", learning_rate=1e-3,
                        weight_decay=0.05)
    model = tiny_llama()
    trainer = NoEmbeddingDecayTrainer(model=model, args=args, train_dataset=TokenDataset(8, 12, 64),
                                      archopt_overrides={"mlp_in": {"lr": 3e-4}})
    plan = trainer.create_optimizer().plan
    assert plan.entry("model.embed_tokens.weight").hparams["weight_decay"] == 0.0  # the subclass's rule
    assert plan.entry("model.layers.0.self_attn.q_proj.weight").hparams["weight_decay"] == 0.05
    assert plan.entry("model.layers.0.mlp.up_proj.weight").hparams["lr"] == 3e-4
    assert "weight_decay=0 for 1 parameter(s) the Trainer excludes from decay" in capsys.readouterr().out
    # an explicit override of the same key wins over the Trainer's rule
    trainer = NoEmbeddingDecayTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(8, 12, 64),
                                      archopt_overrides={"embedding": {"weight_decay": 0.2}})
    assert trainer.create_optimizer().plan.entry("model.embed_tokens.weight").hparams["weight_decay"] == 0.2


def test_subclass_trainer_leaves_stock_optimizers_alone(tmp_path):
    args = trainer_args(tmp_path, cls=ArchOptTrainingArguments, optim="adamw_torch", learning_rate=1e-3)
    trainer = ArchOptTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(8, 12, 64))
    assert type(trainer.create_optimizer()) is torch.optim.AdamW
    with pytest.raises(ValueError, match="archopt_overrides given but optim is"):
        ArchOptTrainer(model=tiny_llama(), args=args, archopt_overrides={"embedding": {"lr": 1.0}})


@pytest.mark.parametrize("route", ["enable", "subclass"])
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, route):
    if route == "enable":
        enable()
    cls, trainer_cls = (TrainingArguments, Trainer) if route == "enable" else (ArchOptTrainingArguments,
                                                                             ArchOptTrainer)
    try:
        def run(out, resume=None, seed=0):
            args = trainer_args(out, cls=cls, optim="archopt_muon", optim_args=f"adamw_lr=0.01,{FP32}",
                                learning_rate=0.02, weight_decay=0.1, max_steps=6, save_strategy="steps",
                                save_steps=3, warmup_steps=2)
            model = tiny_llama(seed=seed)
            trainer = trainer_cls(model=model, args=args, train_dataset=TokenDataset(40, 12, 64))
            trainer.train(resume_from_checkpoint=resume)
            losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
            return losses, model

        full, model_full = run(tmp_path / "full")
        resumed, model_resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"), seed=5)
    finally:
        disable()
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1-3 come from the checkpoint's state
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # bitwise-equal losses
    for (name, a), b in zip(model_full.named_parameters(), model_resumed.parameters()):
        assert torch.equal(a, b), name


def test_hf_run_launcher_runs_a_stock_script_unchanged(tmp_path, capsys):
    out = tmp_path / "run"
    code = archopt_main(["hf-run", str(SCRIPT), "--output_dir", str(out), "--optim", "archopt_muon",
                         "--optim_args", "ns_steps=4,adamw_betas=0.9,0.95", "--learning_rate", "0.02",
                         "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                         "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true"])
    assert code == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    printed = capsys.readouterr().out
    assert printed.count("ArchOpt plan 'muon'") == 1 and "attn_k" in printed
    # the launcher left the process as it found it
    from archopt_plugins.integrations.hf import is_enabled

    assert not is_enabled()


@pytest.mark.parametrize("name", ao.available_optimizers())
def test_every_available_name_trains_in_the_stock_trainer(enabled, tmp_path, name):
    args = trainer_args(tmp_path, optim=f"archopt_{name}", learning_rate=1e-3, max_steps=2)
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(8, 12, 64))
    trainer.train()
    assert trainer.optimizer.optimizer.plan.name == name
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
