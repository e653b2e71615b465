"""The recipe schema: one YAML file describes a whole pretraining run.

Sections (each a pydantic model that rejects unknown keys, so a typo is an error, never ignored):

- ``model``      family (``llama`` | ``gpt2`` | ``mixtral``) and sizes; built from a transformers config
- ``data``       ``stdlib`` (the embedded default: this interpreter's standard-library sources) or user
                 files: ``text``, ``jsonl``, ``megatron`` (indexed ``.bin``/``.idx``)
- ``tokenizer``  ``byte`` (default, vocabulary 256), ``bpe`` (trained locally with ``tokenizers``), or
                 ``pretokenized`` (Megatron data: ids as stored, ``vocab_size`` stated)
- ``optimizer``  a name from ``available_optimizers()``, ``hparams`` and ``overrides`` exactly as
                 ``build_optimizer(model, name, **hparams, overrides=...)`` takes them
- ``schedule``   steps, warmup, decay shape
- ``batch``      micro and global batch sizes (gradient accumulation follows), sequence length
- ``backend``    single | ddp | fsdp2 | hsdp | deepspeed | megatron (see ``backends.py`` for which run)
- ``launch``     processes per node, nodes, rendezvous, elastic restarts, Slurm settings
- ``checkpoint`` / ``logging`` / ``evaluation`` / ``baseline`` (AdamW, optionally over an LR grid)

Field rules live here (types, ranges, choices); rules that relate fields to each other (TP divides
heads, batch sizes divide, a backend that is not available) live in ``validate.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_FAMILIES = ("llama", "gpt2", "mixtral")
DATA_SOURCES = ("stdlib", "text", "jsonl", "megatron")
TOKENIZERS = ("byte", "bpe", "pretokenized")
BACKEND_KINDS = ("single", "ddp", "fsdp2", "hsdp", "deepspeed", "megatron")


class Section(BaseModel):
    # forbid: an unknown key is a typo until proven otherwise; validate_default: defaults obey the rules too;
    # strict: no silent coercion (a boolean is not a batch size, "16" is not 16; YAML already types values)
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


class ModelSection(Section):
    family: Literal["llama", "gpt2", "mixtral"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; None: = num_heads")
    intermediate_size: int = Field(384, ge=1)
    max_seq_len: int = Field(256, ge=8)
    tie_embeddings: bool = True
    num_experts: int | None = Field(None, ge=2, description="mixtral only")
    experts_per_token: int | None = Field(None, ge=1, description="mixtral only")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="gpt2 only (llama/mixtral have none)")


class DataSection(Section):
    source: Literal["stdlib", "text", "jsonl", "megatron"] = "stdlib"
    paths: list[str] = Field(default_factory=list,
                             description="text/jsonl: files or globs; megatron: path prefixes (without .bin/.idx)")
    jsonl_field: str = Field("text", min_length=1)
    max_bytes: int | None = Field(16_000_000, ge=1, description="cap on training text read (stdlib/text/jsonl)")
    holdout_percent: int = Field(5, ge=1, le=50, description="documents held out for validation (by hash)")


class TokenizerSection(Section):
    kind: Literal["byte", "bpe", "pretokenized"] = "byte"
    vocab_size: int | None = Field(None, ge=2, le=2**31 - 1,
                                   description="bpe: target size; pretokenized: ids are < vocab_size")
    train_bytes: int = Field(4_000_000, ge=1000, description="bpe: bytes of training text the merges learn from")


class OptimizerSection(Section):
    name: str = "muon"
    hparams: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ScheduleSection(Section):
    steps: int = Field(300, ge=1)
    warmup_steps: int = Field(20, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    final_lr_fraction: float = Field(0.1, ge=0.0, le=1.0)


class BatchSection(Section):
    micro_batch_size: int = Field(16, ge=1, description="sequences per process per forward/backward")
    global_batch_size: int = Field(16, ge=1, description="sequences per optimizer step over all processes")
    seq_len: int = Field(128, ge=2)


class BackendSection(Section):
    kind: Literal["single", "ddp", "fsdp2", "hsdp", "deepspeed", "megatron"] = "single"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    zero_stage: int | None = Field(None, ge=0, le=3, description="deepspeed only")
    tensor_parallel: int = Field(1, ge=1, description="megatron only")
    shard_degree: int | None = Field(None, ge=1, description="hsdp only: processes a parameter is sharded over")
    threads: int = Field(0, ge=0, description="torch CPU threads per process (0: torch's default)")


class SlurmSection(Section):
    partition: str | None = None
    account: str | None = None
    time: str = Field("04:00:00", pattern=r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
    gpus_per_node: int | None = Field(None, ge=0, description="None: nproc_per_node when device is cuda, else 0")
    cpus_per_task: int = Field(8, ge=1)
    container_image: str | None = None


class LaunchSection(Section):
    nproc_per_node: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    rdzv_endpoint: str = Field("127.0.0.1:29500", pattern=r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
    rdzv_id: str = Field("archopt", pattern=r"^[A-Za-z0-9_.\-]+$")
    max_restarts: int = Field(0, ge=0, description="torchrun elastic restarts; each resumes from the last checkpoint")
    slurm: SlurmSection = Field(default_factory=SlurmSection)


class CheckpointSection(Section):
    every_steps: int = Field(0, ge=0, description="0: only the final checkpoint")
    keep_last: int = Field(2, ge=1)


class LoggingSection(Section):
    out_dir: str = Field("runs/recipe", min_length=1)
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
    log_every: int = Field(1, ge=1)
    geometry_every: int = Field(0, ge=0, description="GeometryMonitor every k steps (0: off): angles, update RMS")


class EvaluationSection(Section):
    every_steps: int = Field(25, ge=1)
    batches: int = Field(8, ge=1)
    ood: list[str] = Field(default_factory=list, description="out-of-distribution sets (see corpora.OOD_SETS)")


class BaselineSection(Section):
    enabled: bool = True
    name: str = "adamw"
    hparams: dict[str, Any] = Field(default_factory=dict)
    lr_grid: list[float] = Field(default_factory=lambda: [1e-3], min_length=1, max_length=32)


class Recipe(Section):
    name: str = Field("recipe", pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    batch: BatchSection = Field(default_factory=BatchSection)
    backend: BackendSection = Field(default_factory=BackendSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    baseline: BaselineSection = Field(default_factory=BaselineSection)

    # -- derived quantities the runner and the launcher share ---------------------------------------
    @property
    def world_size(self) -> int:
        return self.launch.nproc_per_node * self.launch.nodes

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.backend.tensor_parallel

    @property
    def grad_accum(self) -> int:
        return self.batch.global_batch_size // (self.batch.micro_batch_size * self.data_parallel_size)

    @property
    def vocab_size(self) -> int:
        if self.tokenizer.kind == "byte":
            return 256
        return int(self.tokenizer.vocab_size or 0)

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch_size * self.batch.seq_len
