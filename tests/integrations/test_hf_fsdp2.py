"""FSDP2 under the HF Trainer with ``--optim archopt_muon``: the same weights as one process.

CPU: accelerate never enables FSDP on CPU, so the model is sharded the other way transformers
offers, ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))`` (``fully_shard`` on
the layers; the Trainer then leaves the model as it is), and the stock Trainer trains it on 2 gloo
processes. The optimizer sees ``Shard(0)`` DTensors; the sharding engine gathers each matrix to
its owner, so the result must match one process with the whole batch (DESIGN.md's bar).

GPU (marked): the accelerate route, ``--fsdp`` (FSDP2 by default), where the Trainer builds the
optimizer before sharding and accelerate swaps its parameters for DTensors afterwards.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaForCausalLM, TrainingArguments  # noqa: E402

from archopt_plugins.integrations.hf import disable, enable  # noqa: E402
from archopt_plugins.integrations.hf.launcher import run_script  # noqa: E402
from hf_stock_train import InOrderTrainer, TokenDataset  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PARITY = 5e-5  # DESIGN.md: sharded vs single process after 10 steps, fp32 matrix math
OPTIM = ["--optim", "archopt_muon", "--optim_args", "compute_dtype=float32,adamw_lr=0.01", "--learning_rate", "0.02",
         "--weight_decay", "0.1", "--max_steps", "10", "--logging_steps", "5", "--report_to", "none",
         "--save_strategy", "no", "--disable_tqdm", "true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parity(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).norm() / a[k].float().norm()) for k in a)


def _moved(after: dict, before: dict) -> float:
    return max(float((after[k] - before[k]).norm() / before[k].norm()) for k in after)


@pytest.mark.slow
def test_trainer_fsdp2_two_cpu_processes_matches_one_process(tmp_path):
    model_dir = tmp_path / "init"
    tiny_llama(seed=0).save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(HERE / "hf_fsdp2_train.py"), str(model_dir), str(tmp_path / "fsdp2.pt"),
           "--output_dir", str(tmp_path / "fsdp2"), "--per_device_train_batch_size", "2", "--use_cpu", *OPTIM]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "executor ShardedExecutor mode exact" in output, output[-4000:]
    assert output.count("ArchOpt plan 'muon'") == 1, output[-4000:]

    # One process, the whole batch of 4, from the same saved weights and the same data order.
    enable()
    try:
        from transformers import HfArgumentParser

        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "4", "--use_cpu", *OPTIM])
        model = LlamaForCausalLM.from_pretrained(model_dir)
        InOrderTrainer(model=model, args=args, train_dataset=TokenDataset(64, 16, 64)).train()
    finally:
        disable()
    single = {n: p.detach() for n, p in model.named_parameters()}
    sharded = torch.load(tmp_path / "fsdp2.pt")
    init = dict(LlamaForCausalLM.from_pretrained(model_dir).named_parameters())
    assert _moved(single, {k: v.detach() for k, v in init.items()}) > 100 * PARITY
    parity = _parity(single, sharded)
    assert parity <= PARITY, f"FSDP2 vs one process: {parity:.2e} (bar {PARITY:.0e})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_fsdp2_through_accelerate_on_gpu_matches_one_process(tmp_path):
    gpus = min(2, torch.cuda.device_count())
    script = str(HERE / "hf_stock_train.py")
    common = [*OPTIM, "--sequential_sampler", "true", "--seq_len", "16"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
           "--master_port", str(_free_port()), "-m", "archopt_plugins.cli", "hf-run", script,
           "--output_dir", str(tmp_path / "fsdp2"), "--per_device_train_batch_size", str(4 // gpus), "--fsdp",
           *common]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert run_script(script, ["--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "4",
                               *common]) == 0
    from safetensors.torch import load_file

    parity = _parity(load_file(str(tmp_path / "single" / "model.safetensors")),
                     load_file(str(tmp_path / "fsdp2" / "model.safetensors")))
    assert parity <= PARITY, f"FSDP2 ({gpus} GPU) vs one process: {parity:.2e} (bar {PARITY:.0e})"
