"""Scale-invariance detection, the spherical rule and the monitor on a CUDA device (bf16 Newton–Schulz
by default there). Skipped where no CUDA device is present."""

import pytest
import torch

from archopt_plugins import build_optimizer
from archopt_plugins.monitor import GeometryMonitor, blocks
from archopt_plugins.roles.scale_invariance import detect_scale_invariance
from tiny_models import tiny_qwen3

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_detection_on_cuda_matches_cpu_and_restores_both_rngs():
    cpu = {f: i.block_rows for f, i in detect_scale_invariance(tiny_qwen3()).invariant.items()}
    model = tiny_qwen3().cuda()
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    cuda = {f: i.block_rows for f, i in detect_scale_invariance(model).invariant.items()}
    assert cuda == cpu and len(cuda) == 4
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)


def test_spherical_switch_with_bf16_newton_schulz_keeps_block_norms_and_monitors():
    model = tiny_qwen3().cuda()
    opt = build_optimizer(model, "muon", scale_invariant="spherical", spherical_lr=0.05)  # compute_dtype auto: bf16
    q = model.model.layers[0].self_attn.q_proj.weight
    norms = torch.linalg.vector_norm(blocks(q, None, 8), dim=1)
    monitor = GeometryMonitor(opt)
    for i in range(3):
        ids = torch.randint(0, 64, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(i))
        model(input_ids=ids, labels=ids).loss.backward()
        monitor.before_step()
        opt.step()
        metrics = monitor.after_step()
        opt.zero_grad()
    assert torch.allclose(torch.linalg.vector_norm(blocks(q, None, 8), dim=1), norms, rtol=1e-5)
    assert metrics["geometry/scale_invariant/angular_update"] > 0
    assert metrics["geometry/scale_invariant/equilibrium_angular_update"] == pytest.approx(
        torch.atan(torch.tensor(0.05)).item(), rel=1e-6)
