"""A checkpoint of a bf16 model's optimizer resumes with float32 state, for every optimizer name.

torch.optim.Optimizer.load_state_dict casts floating-point state to its parameter's dtype; ArchOpt
keeps float32 moments for low-precision parameters, and must keep them after a resume.
"""

import pytest
import torch

from archopt_plugins import available_optimizers, build_optimizer
from tiny_models import causal_lm_loss, tiny_llama


@pytest.mark.parametrize("name", available_optimizers())
def test_bf16_model_state_stays_float32_after_load(name):
    model = tiny_llama().to(torch.bfloat16)
    opt = build_optimizer(model, name)
    causal_lm_loss(model).backward()
    opt.step()
    saved = opt.state_dict()
    dtypes = {(i, k): v.dtype for i, s in saved["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    assert any(d == torch.float32 for (_, k), d in dtypes.items() if k != "step")
    resumed = build_optimizer(model, name)
    resumed.load_state_dict(saved)
    after = resumed.state_dict()["state"]
    for (i, k), dtype in dtypes.items():
        assert after[i][k].dtype == dtype, (name, i, k)
    causal_lm_loss(model).backward()
    resumed.step()  # and it keeps stepping
