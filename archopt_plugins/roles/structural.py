"""Roles of every trainable parameter of an ``nn.Module``, from the module tree's structure.

Order of evidence, strongest first:

1. module kind — embeddings, norms, convs, linear maps and their biases (``module_kinds``);
2. context — linear maps inside an attention module (``attention``), expert weights and routers
   of MoE blocks (``moe``), the in/out maps of an MLP block (one map reads the block's width, the
   last writes it back), the model's output head (HF's ``get_output_embeddings``, or a linear
   tied to / shaped like the input embedding);
3. names, for the few parameters no module kind explains (``names``).

Tied parameters (one tensor under several names) appear once, under their first name, with the
other names as aliases; a tied embedding/output head keeps the ``embedding`` role.
"""

from __future__ import annotations

from torch import nn

from .attention import attention_roles, multihead_attention_roles
from .dims import model_hidden_size
from .module_kinds import (conv_structure, is_attention, is_conv, is_embedding, is_norm, linear_children,
                           linear_info)
from .moe import moe_roles
from .names import role_from_name
from .types import ParamRole, ParamStructure, RoleMap


def _mlp_roles(module: nn.Module) -> list[tuple[object, str, ParamStructure]]:
    """in/out maps of an MLP block: its first map reads width d, its last writes d, one map widens."""
    children = [info for _, info in linear_children(module)]
    if len(children) < 2:
        return []
    width = children[0].fan_in
    if children[-1].fan_out != width or all(c.fan_out == width for c in children):
        return []
    found = []
    for index, info in enumerate(children):
        last = index == len(children) - 1
        role = "mlp_out" if last or (info.fan_out == width and info.fan_in != width) else "mlp_in"
        found.append((info.weight, role, ParamStructure(transposed=info.transposed)))
    return found


def _output_head(model: nn.Module, claimed: dict[int, ParamRole]) -> object | None:
    """The output head's weight tensor, or None when the model has none we can identify."""
    if any(c.__name__ == "LanguageModule" for c in type(model).__mro__):
        # Megatron-core language models (GPTModel …) keep their head in ``output_layer``, a
        # ColumnParallelLinear whose weight is None when it is tied to the word embeddings.
        return getattr(getattr(model, "output_layer", None), "weight", None)
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        weight = getattr(head, "weight", None)
        return weight
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    linears = [info for m in model.modules() if (info := linear_info(m)) is not None]
    for info in linears:
        for emb in embeddings:
            if info.weight is emb.weight:
                return info.weight
    for info in reversed(linears):
        for emb in embeddings:
            if info.fan_out == emb.num_embeddings and info.fan_in == emb.embedding_dim:
                return info.weight
    if not embeddings and linears:
        last = linears[-1]
        entry = claimed.get(id(last.weight))
        # A classifier's last linear: only when no block context (attention, MLP) claimed it.
        if entry is not None and entry.role == "hidden":
            return last.weight
    return None


def roles_from_module(model: nn.Module) -> RoleMap:
    entries: dict[int, ParamRole] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) in entries:
            entries[id(p)].aliases += (fqn,)
        else:
            entries[id(p)] = ParamRole(fqn=fqn, param=p, role="", structure=ParamStructure())

    def assign(tensor, role: str, structure: ParamStructure = ParamStructure()) -> None:
        entry = entries.get(id(tensor))
        if entry is not None:
            entry.role, entry.structure = role, structure

    # 1. module kinds. An embedding table stays an embedding when a linear head reuses it (tying).
    embedding_ids = {id(m.weight) for m in model.modules() if is_embedding(m)}
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if is_embedding(module):
            assign(module.weight, "embedding")
        elif is_norm(module):
            for p in own.values():
                assign(p, "norm")
        elif is_conv(module):
            assign(module.weight, "conv", conv_structure(module))
        elif (info := linear_info(module)) is not None and id(info.weight) not in embedding_ids:
            assign(info.weight, "hidden", ParamStructure(transposed=info.transposed))
        elif isinstance(module, nn.MultiheadAttention):
            mha = multihead_attention_roles(module)
            for name, p in own.items():
                if name in mha:
                    assign(p, *mha[name])
        for name, p in own.items():
            if name == "bias" and p.ndim == 1 and not is_norm(module):
                assign(p, "bias")

    # 2. context: MLP blocks, then attention (wins over MLP shape rules), then MoE (wins over both)
    for module in model.modules():
        if not is_attention(module):
            for tensor, role, structure in _mlp_roles(module):
                assign(tensor, role, structure)
    for module in model.modules():
        if is_attention(module):
            for info, role, structure in attention_roles(module, model):
                assign(info.weight, role, structure)
    for tensor, role, structure in moe_roles(model, model_hidden_size(model)):
        assign(tensor, role, structure)

    head = _output_head(model, entries)
    if head is not None and id(head) in entries:
        if id(head) not in embedding_ids:  # a tied head keeps the embedding role: one tensor, one rule
            assign(head, "output", ParamStructure())

    # 3. names for what no module kind explained
    for entry in entries.values():
        if not entry.role:
            entry.role, entry.structure = role_from_name(entry.fqn, entry.param)
    return RoleMap(params=list(entries.values()), source="module")
