"""DeepSpeed cases, run on every rank of one torchrun launch (``deepspeed_runner.py``), CPU + gloo.

Each case returns a JSON-able dict (rank 0's is kept). The tiny Llama, its data and the parity metric
are the sharding engine's (``tests/distributed/parity_util.py``): 10 steps, global batch 4 split over
the ranks, fp32 matrix math; DeepSpeed's default ``gradient_clipping`` (1.0) is turned off because the
single-process reference does not clip.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parity_util import batches, guarded, hparams, local_part, names, parity, reference
from tiny_models import tiny_llama

CASES: dict[str, Any] = {}
STAGES = (0, 1, 2, 3)
GLOBAL = 4  # sequences per step over all ranks (parity_util's global batch)


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def llama():
    return tiny_llama(tied=True, layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seed=0)


def ds_config(name: str, hp: dict, stage: int, bf16: bool = False, **extra) -> dict:
    config = {"train_micro_batch_size_per_gpu": GLOBAL // dist.get_world_size(), "gradient_accumulation_steps": 1,
              "optimizer": {"type": type_name(name), "params": dict(hp)}, "zero_optimization": {"stage": stage},
              "gradient_clipping": 0.0, "steps_per_print": 10**9}
    if bf16:
        config["bf16"] = {"enabled": True}
    config.update(extra)
    return config


def type_name(name: str) -> str:
    from archopt_plugins.integrations.deepspeed import type_name as tn

    return tn(name)


def initialize(model, config):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return engine


def train(engine, data) -> list[float]:
    losses = []
    for ids in data:
        part = local_part(ids, dist.get_rank(), dist.get_world_size())
        loss = engine(input_ids=part, labels=part).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def full_params(engine) -> dict[str, torch.Tensor]:
    """fp32 masters of every parameter, complete (collective: DeepSpeed's own helpers)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters():
        t = safe_get_full_fp32_param(p)
        out[n] = (p.detach().float() if t is None else t.float()).clone()
    return out


def _run(name: str, stage: int, make=llama, bf16: bool = False, **extra) -> tuple[dict, Any]:
    engine = initialize(make(), ds_config(name, hparams(name), stage, bf16, **extra))
    train(engine, batches())
    return full_params(engine), engine


@case
def parity_fp32():
    """Every name x ZeRO 0/1/2/3 against the single-process run."""
    out: dict[str, dict] = {}
    for stage in STAGES:
        for name in names():
            def one():
                ref = reference(llama, name, hparams(name)) if dist.get_rank() == 0 else None
                got, engine = _run(name, stage)
                flagged = [n for n, p in engine.module.named_parameters() if hasattr(p, "use_muon")]
                if ref is not None:
                    worst, where = parity(ref, got)
                    return {"parity": worst, "worst": where, "wrapper": type(engine.optimizer).__name__,
                            "use_muon": flagged}

            out.setdefault(str(stage), {})[name] = guarded(one)
    return out


def _zero_init_llama():
    """The reference's initial weights, built under deepspeed.zero.Init (ZeRO-3 placeholders from the start)."""
    import deepspeed

    source = llama().state_dict()
    with deepspeed.zero.Init(config_dict_or_path=ds_config("muon", {}, 3)):
        model = llama()
    assert all(p.numel() == 0 or p.ds_status is not None for p in model.parameters())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(source[n])
    model._archopt_shapes_at_init = shapes  # what DeepSpeed showed before initialize
    return model


@case
def zero_init():
    """Every name under ZeRO-3 with the model built inside deepspeed.zero.Init."""
    out = {}
    for name in names():
        def one():
            ref = reference(llama, name, hparams(name)) if dist.get_rank() == 0 else None
            model = _zero_init_llama()
            flat = sorted({s for s in model._archopt_shapes_at_init.values()})
            engine = initialize(model, ds_config(name, hparams(name), 3))
            roles = {e.fqn: (e.role, list(e.shape)) for e in engine.basic_optimizer.plan.entries}
            train(engine, batches())
            got = full_params(engine)
            if ref is not None:
                worst, where = parity(ref, got)
                return {"parity": worst, "worst": where, "shapes_seen": [list(s) for s in flat],
                        "roles": roles}

        out[name] = guarded(one)
    return out


@case
def bf16():
    """bf16 training: every ZeRO wrapper gives the same fp32 masters; loose against the fp32 reference."""
    out = {}
    for name in ("muon",):
        def one():
            ref = reference(llama, name, hparams(name)) if dist.get_rank() == 0 else None
            runs = {}
            for label, stage, extra in (("zero1_bf16_optimizer", 1, {"data_types": {"grad_accum_dtype": "fp32"}}),
                                        ("zero1", 1, {}), ("zero2", 2, {}), ("zero3", 3, {}), ("zero0", 0, {})):
                got, engine = _run(name, stage, bf16=True, **extra)
                runs[label] = (got, type(engine.optimizer).__name__)
            if ref is None:
                return None
            base = runs["zero2"][0]
            return {label: {"wrapper": wrapper, "vs_zero2": parity(base, got)[0], "vs_fp32_reference": parity(ref, got)[0]}
                    for label, (got, wrapper) in runs.items()}

        out[name] = guarded(one)
    return out


def _shared() -> Path:
    return Path(os.environ["ARCHOPT_SHARED_DIR"])


@case
def checkpoint_resume():
    """engine.save_checkpoint after 5 steps, a fresh engine loads it and runs 5 more: bitwise the 10-step run."""
    out = {}
    data = batches()
    for stage in (0, 2, 3):
        for name in ("muon", "shampoo"):
            def one():
                whole = initialize(llama(), ds_config(name, hparams(name), stage))
                train(whole, data)
                expected = full_params(whole)
                first = initialize(llama(), ds_config(name, hparams(name), stage))
                train(first, data[:5])
                folder = _shared() / f"ds_ckpt_{stage}_{name}"
                first.save_checkpoint(str(folder), tag="step5")
                if stage == 3:  # handed to the world-1 launch: another world size and ZeRO stage
                    from archopt_plugins.integrations.deepspeed import save_resharded

                    save_resharded(first, _shared() / f"resharded_{name}_step5")
                second = initialize(llama(), ds_config(name, hparams(name), stage))
                second.load_checkpoint(str(folder), tag="step5")
                train(second, data[5:])
                got = full_params(second)
                worst, where = parity(expected, got)
                return {"parity": worst, "worst": where}

            out[f"zero{stage}_{name}"] = guarded(one)
    return out


@case
def resharded_load():
    """(world 1) continue a ZeRO-3 world-2 run from save_resharded under ZeRO-1: the single-process result."""
    from archopt_plugins.integrations.deepspeed import load_resharded

    out = {}
    data = batches()
    for name in ("muon", "shampoo"):
        def one():
            ref = reference(llama, name, hparams(name))
            engine = initialize(llama(), ds_config(name, hparams(name), 1))
            load_resharded(engine, _shared() / f"resharded_{name}_step5")
            steps_loaded = engine.global_steps
            train(engine, data[5:])
            worst, where = parity(ref, full_params(engine))
            return {"parity": worst, "worst": where, "global_steps_loaded": steps_loaded}

        out[name] = guarded(one)
    return out


@case
def refusals():
    """Loud errors: optimizer offload, an unknown type, a plain ArchOpt as client optimizer under ZeRO."""
    import deepspeed

    from archopt_plugins import build_optimizer

    messages = {}
    attempts = {
        "offload": lambda: initialize(llama(), ds_config("muon", {}, 2, zero_optimization={
            "stage": 2, "offload_optimizer": {"device": "cpu"}})),
        "unknown_type": lambda: initialize(llama(), {**ds_config("muon", {}, 1),
                                                     "optimizer": {"type": "ArchOptMuonX", "params": {}}}),
        "bad_value": lambda: initialize(llama(), ds_config("muon", {"compute_dtype": "float8"}, 1)),
    }
    for label, attempt in attempts.items():
        try:
            attempt()
            messages[label] = "no error"
        except (ValueError, TypeError) as err:
            messages[label] = f"{type(err).__name__}: {err}"
    model = llama()
    config = ds_config("muon", {}, 2)
    del config["optimizer"]
    try:
        deepspeed.initialize(model=model, config=config, optimizer=build_optimizer(model, "muon"))
        messages["client"] = "no error"
    except ValueError as err:
        messages["client"] = f"ValueError: {err}"
    return messages


@case
def hf_trainer():
    """The HF Trainer with deepspeed=<ds_config with an ArchOptMuon entry>, ZeRO-2: the single-process run."""
    return _hf_trainer_run(optim_flag=False)


@case
def hf_trainer_optim_flag():
    """The same through --optim archopt_muon and a ds_config without an "optimizer" block."""
    from archopt_plugins.integrations.hf import disable, enable

    enable()
    try:
        return _hf_trainer_run(optim_flag=True)
    finally:
        disable()


def _hf_trainer_run(optim_flag: bool) -> dict | None:
    from transformers import Trainer, TrainingArguments

    name = "muon"
    data = batches()
    rows = torch.cat(data)  # the Trainer's global batch i = rows 4i..4i+3; rank r gets its r-th per-device part

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return rows.shape[0]

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    ref = reference(llama, name, hparams(name, lr=0.02)) if dist.get_rank() == 0 else None
    config = ds_config(name, {**hparams(name), "lr": "auto"}, 2)
    config["train_micro_batch_size_per_gpu"] = "auto"
    flag = {}
    if optim_flag:  # the optimizer comes from --optim / --optim_args instead of the ds_config
        del config["optimizer"]
        flag = {"optim": "archopt_muon", "optim_args": ",".join(f"{k}={v}" for k, v in hparams(name).items())}
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(out_dir, deepspeed=copy.deepcopy(config), per_device_train_batch_size=2,
                                 learning_rate=0.02, max_steps=len(data), lr_scheduler_type="constant",
                                 logging_steps=5, report_to="none", save_strategy="no", disable_tqdm=True,
                                 use_cpu=True, weight_decay=0.0, max_grad_norm=0.0, **flag)
        trainer = InOrder(model=llama(), args=args, train_dataset=Rows())
        trainer.train()
        engine = trainer.model_wrapped
        optimizer = type(engine.basic_optimizer).__name__
        got = full_params(engine)
    if ref is None:
        return None
    worst, where = parity(ref, got)
    return {"parity": worst, "worst": where, "optimizer": optimizer, "wrapper": type(engine.optimizer).__name__}


@case
def hf_trainer_overrides():
    """ArchOptTrainer(archopt_overrides=...) under --deepspeed: the overrides reach the optimizer
    DeepSpeed builds (an embedding at lr 0 stays put while the matrices move)."""
    from archopt_plugins.integrations.hf import ArchOptTrainer, ArchOptTrainingArguments

    rows = torch.cat(batches())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return rows.shape[0]

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    model = llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as out_dir:
        args = ArchOptTrainingArguments(out_dir, deepspeed=config, optim="archopt_muon", learning_rate=0.02,
                                        optim_args="compute_dtype=float32", per_device_train_batch_size=2,
                                        max_steps=3, report_to="none", save_strategy="no", disable_tqdm=True,
                                        use_cpu=True, max_grad_norm=0.0)
        trainer = ArchOptTrainer(model=model, args=args, train_dataset=Rows(),
                                 archopt_overrides={"embedding": {"lr": 0.0}})
        trainer.train()
        got = full_params(trainer.model_wrapped)
    moved = {n: bool((got[n] - before[n]).abs().max() > 0) for n in got}
    return {"embedding_moved": moved["model.embed_tokens.weight"],
            "q_moved": moved["model.layers.0.self_attn.q_proj.weight"]}
