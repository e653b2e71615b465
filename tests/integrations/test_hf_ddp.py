"""DDP through ``accelerate launch`` (2 CPU processes, gloo) running a stock Trainer script unchanged
under ``archopt hf-run``: the same weights as one process with the whole batch (DESIGN.md's parity
bar, fp32 Newton–Schulz), and the plan printed once. One launch (~10 s of start-up) for all checks.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
safetensors = pytest.importorskip("safetensors.torch")

from archopt_plugins.integrations.hf.launcher import run_script  # noqa: E402

SCRIPT = Path(__file__).with_name("hf_stock_train.py")
ROOT = Path(__file__).resolve().parents[2]
PARITY = 5e-5  # DESIGN.md: sharded vs single process after 10 steps, fp32 matrix math


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_args(out: Path, per_device_batch: int) -> list[str]:
    return ["--output_dir", str(out), "--optim", "archopt_muon", "--optim_args", "compute_dtype=float32,adamw_lr=0.01",
            "--learning_rate", "0.02", "--weight_decay", "0.1", "--max_steps", "10",
            "--per_device_train_batch_size", str(per_device_batch), "--logging_steps", "5", "--use_cpu",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--sequential_sampler", "true"]


@pytest.mark.slow
def test_trainer_ddp_two_cpu_processes_matches_one_process(tmp_path):
    # Two ranks with 2 sequences each see, step by step, the 4 sequences one process sees (in-order
    # sampler; accelerate gives rank r the r-th per-device batch), and DDP averages the gradients.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "archopt_plugins.cli", "hf-run", str(SCRIPT), *script_args(tmp_path / "ddp", 2)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert output.count("ArchOpt plan 'muon'") == 1, output[-4000:]  # process 0 only

    assert run_script(str(SCRIPT), script_args(tmp_path / "single", 4)) == 0
    ddp = safetensors.load_file(str(tmp_path / "ddp" / "model.safetensors"))
    single = safetensors.load_file(str(tmp_path / "single" / "model.safetensors"))
    torch.manual_seed(0)  # the script's initial weights, to show the runs moved far beyond the tolerance
    from transformers import LlamaConfig, LlamaForCausalLM

    init = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                                        pad_token_id=None)).state_dict()
    moved = max(float((single[k] - init[k]).norm() / init[k].norm()) for k in single)
    parity = max(float((ddp[k] - single[k]).norm() / single[k].norm()) for k in single)
    print(f"DDP parity {parity:.2e}, movement {moved:.2e}")
    assert moved > 100 * PARITY
    assert parity <= PARITY, f"DDP vs one process: {parity:.2e} (bar {PARITY:.0e})"
