"""Tiny megatron-core GPTModels and the helpers the Megatron CPU smoke tests share (test-only).

Everything here runs inside ``megatron_cpu_shim.cpu_shim()`` on gloo. Two models:

* ``"llama"``: RMSNorm, rotary positions, GQA (4 heads in 2 query groups: fused ``linear_qkv`` per
  group), SwiGLU (``linear_fc1`` stores [gate_t; up_t] per TP rank), untied output layer;
* ``"gpt"``: the same without the gated MLP (GELU), with biases and with the output layer tied to
  the word embeddings — every TP shard of every weight is then a block of the unsharded one, so
  injected gradients must give bitwise results.

The single-process reference is the same model built at tensor-parallel size 1 from the same seed
(Megatron initializes the full master weight on CPU and slices it, so the weights are the same)
and trained by a plain ArchOpt on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 256, 12, 4, 10
# Sizes chosen so that at TP 2 × DP 2 the distributed optimizer's cut of the gradient buffer falls
# inside parameters (Megatron aligns parameters to 64 elements; a symmetric stack would be cut
# between layers): mid-row in the llama model's fc1, mid-row inside the attention projection's
# TP column block in the gpt model (a BlockRange piece).
HIDDEN, FFN = 48, 80
SEED = 1234


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, next-token labels) of the global batch, one per step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def setup_parallel(tp: int) -> None:
    """(Re)initialize Megatron's model-parallel state for tensor-parallel size ``tp`` (DP = world / tp)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(SEED)


def build_gpt(kind: str = "llama") -> torch.nn.Module:
    """The tiny GPTModel at the current tensor-parallel size (call ``setup_parallel`` first)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    glu = kind == "llama"
    config = TransformerConfig(
        num_layers=3, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=FFN,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=glu,
        activation_func=torch.nn.functional.silu if glu else torch.nn.functional.gelu,
        add_bias_linear=not glu, bias_dropout_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    torch.manual_seed(SEED)
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=not glu)


def loss_of(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None, labels=labels).float().mean()


def optimizer_config(name: str, **archopt_hparams: Any) -> Any:
    """OptimizerConfig for ``archopt_<name>``: fp32, no clipping (the reference does not clip), fp32 matrix math."""
    from megatron.core.optimizer import OptimizerConfig

    config = OptimizerConfig(optimizer=f"archopt_{name}", lr=0.02 if name == "muon" else 3e-3, weight_decay=0.01,
                             min_lr=0.0, clip_grad=0.0, bf16=False, use_distributed_optimizer=True)
    config.archopt_hparams = {"compute_dtype": "float32", **archopt_hparams}
    return config


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    return DistributedDataParallel(model.config, ddp_config, model)


def megatron_optimizer(ddp: torch.nn.Module, config: Any) -> Any:
    from megatron.core.optimizer import get_megatron_optimizer

    from archopt_plugins.integrations import megatron as archopt_megatron

    archopt_megatron.enable()
    return get_megatron_optimizer(config, [ddp])


def _split(param: torch.Tensor, tp: int) -> tuple[int | None, int]:
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return None, 1
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def tp_slice(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of an unsharded tensor, as Megatron slices its master weights."""
    dim, stride = _split(param, tp)
    if dim is None:
        return full
    chunks = torch.chunk(full, tp * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp], dim=dim)


def tp_unslice(shards: list[torch.Tensor], param: torch.Tensor, tp: int) -> torch.Tensor:
    """Inverse of :func:`tp_slice` over all TP ranks' shards."""
    dim, stride = _split(param, tp)
    if dim is None:
        return shards[0]
    pieces = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([pieces[t][j] for j in range(stride) for t in range(tp)], dim=dim)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters of a TP model (a collective over the TP group)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, param in model.named_parameters():
        local = param.detach().float().contiguous()
        if _split(param, tp)[0] is None:
            out[name] = local.clone()
            continue
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=group)
        out[name] = tp_unslice(shards, param, tp)
    return out


def reference(kind: str, name: str, config: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]],
                                                           dict[str, torch.Tensor]]:
    """Single-process run (TP 1, whole batch, plain ArchOpt): (initial params, per-step grads, final params)."""
    from archopt_plugins import build_optimizer
    from archopt_plugins.integrations.megatron.config import hparams_from_config
    from archopt_plugins.optim.executor import LocalExecutor

    setup_parallel(1)
    model = build_gpt(kind)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, name, **hparams_from_config(config, name))
    opt.executor = LocalExecutor()  # one process's math, although torch.distributed is initialized
    grads = []
    for tokens, labels in batches():
        loss_of(model, tokens, labels).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return initial, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def parity(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for n, a in ref.items():
        rel = float((a - got[n]).norm() / a.norm().clamp_min(1e-30))
        if rel > worst:
            worst, where = rel, n
    return worst, where
