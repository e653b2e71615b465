"""GeometryCallback: the geometry monitor's per-role metrics in the Trainer's logs, at the right steps,
equal to the monitor run by hand on the same trajectory, and seen by the report_to loggers."""

import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import archopt_plugins as ao  # noqa: E402
from archopt_plugins.integrations.hf import GeometryCallback, disable, enable  # noqa: E402
from archopt_plugins.monitor import GeometryMonitor  # noqa: E402
from hf_stock_train import InOrderTrainer, TokenDataset  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

HP = dict(lr=0.02, weight_decay=0.1, adamw_lr=0.01, compute_dtype="float32")
METRICS = ("update_rms", "grad_norm", "effective_lr", "angular_update")


@pytest.fixture
def enabled():
    enable()
    yield
    disable()


class Recorder(TrainerCallback):
    """Stands where a report_to logger stands (registered before user callbacks)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def make_trainer(tmp_path, steps=4, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), optim="archopt_muon", learning_rate=HP["lr"],
                             weight_decay=HP["weight_decay"], optim_args="adamw_lr=0.01,compute_dtype=float32",
                             max_steps=steps, per_device_train_batch_size=4, lr_scheduler_type="constant",
                             max_grad_norm=0.0, logging_steps=100, save_strategy="no", use_cpu=True,
                             disable_tqdm=True, **kw)
    data = TokenDataset(16, 12, 64)
    return InOrderTrainer(model=tiny_llama(seed=0), args=args, train_dataset=data), data


def test_geometry_metrics_match_the_monitor_run_by_hand(enabled, tmp_path):
    trainer, data = make_trainer(tmp_path, report_to="none")
    recorder = Recorder()
    trainer.callback_handler.callbacks.insert(0, recorder)  # where report_to loggers sit
    GeometryCallback.install(trainer, every=2)  # goes ahead of them
    trainer.train()
    logged = {h["step"]: h for h in trainer.state.log_history if "geometry/attn_q/update_rms" in h}
    assert sorted(logged) == [2, 4]  # every 2nd optimizer step, logged at that step
    assert {s for s, logs in recorder.logs if "geometry/mlp_in/grad_norm" in logs} == {2, 4}

    # The same trajectory by hand (the Trainer reproduces this loop: test_hf_trainer.py), measured
    # with the monitor directly at every step.
    model = tiny_llama(seed=0)
    opt = ao.build_optimizer(model, "muon", **HP)
    monitor = GeometryMonitor(opt, every=1)
    by_hand = {}
    for step in range(1, 5):
        ids = data.ids[4 * (step - 1): 4 * step]
        model(input_ids=ids, labels=ids).loss.backward()
        monitor.before_step()
        opt.step()
        by_hand[step] = monitor.after_step()
        opt.zero_grad()
    for step in (2, 4):
        for role in ("attn_q", "attn_k", "mlp_out", "embedding", "norm"):
            for metric in METRICS:
                key = f"geometry/{role}/{metric}"
                want, got = by_hand[step][key], logged[step][key]
                if want != want:  # NaN where the metric has no meaning (e.g. a zero-norm block)
                    assert got != got, key
                else:
                    assert got == pytest.approx(want, rel=1e-4, abs=1e-12), (step, key)


def test_geometry_metrics_reach_tensorboard(enabled, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer, _ = make_trainer(tmp_path, steps=2, report_to="tensorboard")
    GeometryCallback.install(trainer, every=1)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/geometry/attn_q/update_rms", "train/geometry/embedding/effective_lr"} <= tags
    assert [e.step for e in events.Scalars("train/geometry/attn_q/angular_update")] == [1, 2]


def test_geometry_callback_after_the_loggers_warns(caplog):
    callback = GeometryCallback(every=5)
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(SimpleNamespace(report_to=["tensorboard"]), None, None)
    assert "will not receive the geometry metrics" in caplog.text
    with pytest.raises(ValueError, match=r"every must be a positive integer"):
        GeometryCallback(every=0)


def test_archopt_trainer_geometry_every(tmp_path):
    from archopt_plugins.integrations.hf import ArchOptTrainer, ArchOptTrainingArguments

    args = ArchOptTrainingArguments(output_dir=str(tmp_path), optim="archopt_muon", learning_rate=0.02,
                                    max_steps=3, per_device_train_batch_size=4, logging_steps=100,
                                    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = ArchOptTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(16, 12, 64), geometry_every=3)
    assert isinstance(trainer.callback_handler.callbacks[0], GeometryCallback)
    trainer.train()
    steps = [h["step"] for h in trainer.state.log_history if "geometry/attn_v/grad_norm" in h]
    assert steps == [3] and torch.isfinite(torch.tensor(trainer.state.log_history[0]["geometry/attn_v/grad_norm"]))
