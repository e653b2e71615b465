"""archopt in a plain Accelerate loop: same steps as without Accelerate, exact save/load_state resume,
and loud refusals of the DeepSpeed plugin and FSDP1 (config inspection; the DeepSpeed runs come with its adapter)."""

from types import SimpleNamespace

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

import archopt_plugins as ao  # noqa: E402
from archopt_plugins.integrations.accelerate import build_optimizer, check_accelerator  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

HP = dict(lr=0.02, adamw_lr=0.01, weight_decay=0.1, compute_dtype="float32")


def batches(n):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (4, 12), generator=gen) for _ in range(n)]


def train(model, optimizer, data, accelerator=None):
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        (accelerator.backward(loss) if accelerator else loss.backward())
        optimizer.step()
        optimizer.zero_grad()
    return loss


def test_accelerate_loop_matches_plain_loop_and_resumes_exactly(tmp_path, capsys):
    accelerator = accelerate.Accelerator(cpu=True)
    data = batches(6)

    model = tiny_llama(seed=0)
    optimizer = build_optimizer(accelerator, model, "muon", **HP)
    assert "ArchOpt plan 'muon'" in capsys.readouterr().out
    model, optimizer = accelerator.prepare(model, optimizer)
    train(model, optimizer, data[:3], accelerator)
    accelerator.save_state(str(tmp_path / "state"))
    train(model, optimizer, data[3:], accelerator)

    ref = tiny_llama(seed=0)
    train(ref, ao.build_optimizer(ref, "muon", **HP), data)
    for (name, a), b in zip(ref.named_parameters(), accelerator.unwrap_model(model).parameters()):
        assert torch.equal(a, b), name

    accelerator = accelerate.Accelerator(cpu=True)  # a new run: load_state restores what the first saved
    resumed = tiny_llama(seed=7)  # other weights: load_state must restore them and the optimizer
    opt2 = build_optimizer(accelerator, resumed, "muon", log_plan=False, **HP)
    resumed, opt2 = accelerator.prepare(resumed, opt2)
    accelerator.load_state(str(tmp_path / "state"))
    train(resumed, opt2, data[3:], accelerator)
    for (name, a), b in zip(ref.named_parameters(), accelerator.unwrap_model(resumed).parameters()):
        assert torch.equal(a, b), name


def _fake(kind, ds_config=None, fsdp_version=2):
    return SimpleNamespace(distributed_type=kind,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config or {}),
                                                 fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version)))


def test_accelerate_plugins_that_would_drop_or_break_the_optimizer_are_refused():
    with pytest.raises(ValueError, match=r"conflicts with the DeepSpeed config's \"optimizer\" block \(type 'AdamW'\)"):
        check_accelerator(_fake("DEEPSPEED", {"optimizer": {"type": "AdamW"}}), "muon")
    with pytest.raises(ValueError, match=r"DeepSpeed plugin is not supported yet"):
        check_accelerator(_fake("DEEPSPEED", {"zero_optimization": {"stage": 2}}), "muon")
    with pytest.raises(ValueError, match=r"under FSDP1 is not supported"):
        check_accelerator(_fake("FSDP", fsdp_version=1), "muon")
    check_accelerator(_fake("FSDP"), "muon")  # FSDP2: the sharding engine (tests/integrations/test_hf_fsdp2.py)
    check_accelerator(_fake("MULTI_CPU"), "muon")  # DDP needs nothing
