"""The cost model: per-rank memory of training a GPT under each strategy, phase by phase.

`estimate(...)` is the Python API (`phase_peaks(...)` its phases alone);
benchmarks/bench_memory.py checks the phase peaks against peak RSS per rank of real runs.

Notation: Ψ = number of parameters (a tied matrix counts once), N = ranks the model states are
sharded over (world_size; world_size / nodes for hsdp), "16-bit" = bf16 or fp16. Sizes in GB
are 1e9 bytes, as in the ZeRO paper.

Model states (Rajbhandari et al. 2019, "ZeRO", section 3 and figure 1). Mixed-precision Adam
keeps 16Ψ bytes: 16-bit parameters (2Ψ) and gradients (2Ψ), plus an fp32 master copy of the
parameters, Adam's momentum and variance (4Ψ + 4Ψ + 4Ψ = 12Ψ, the "optimizer state"). Per rank:

    strategy        params        grads         optim                        total (16-bit)
    single / ddp    4Ψ            4Ψ            8Ψ                           16Ψ
    zero1           2Ψ            2Ψ            12Ψ/N                        4Ψ + 12Ψ/N
    zero2           2Ψ            2Ψ/N          12Ψ/N                        2Ψ + 14Ψ/N
    zero3           2Ψ/N          2Ψ/N          12Ψ/N                        16Ψ/N
    zero3_offload   CPU: 2Ψ/N     CPU: 6Ψ/N     CPU: 12Ψ/N                   0 GPU + 20Ψ/N CPU
    fsdp, hsdp      4Ψ/N          4Ψ/N          8Ψ/N                         16Ψ/N
    fsdp_grad_op    4Ψ/N          4Ψ/N          8Ψ/N                         16Ψ/N (+ 2Ψ unsharded)

- single/ddp train the fp32 model under torch.autocast, so "parameters" are the fp32 weights
  themselves (no separate master copy) and gradients are fp32: the same 16Ψ, split 4/4/8.
- zero1/2/3 (DeepSpeed) cast the model to 16-bit; the optimizer owns the fp32 master partition.
  ZeRO-1 keeps whole 16-bit gradients between the micro-batches of an accumulation (without
  accumulation DeepSpeed reduces them into the owned partition at once, as ZeRO-2 does);
  ZeRO-2 reduce-scatters them into the owned partition as backward goes, and also keeps the
  whole gradient of the one parameter per group that straddles a partition boundary (not
  counted: +13% of the gradients on the 3M-parameter test model, nothing on a large one).
- ZeRO-3: `pretrain.engine` sets stage3_param_persistence_threshold=0, so every parameter is
  partitioned. DeepSpeed's own default (1e5) keeps smaller parameters (biases, norms, small
  matrices) whole on every rank: pass zero3_persistence_threshold=100_000 to count them.
- zero3_offload (as `pretrain.engine` configures it: offload_optimizer and offload_param to
  the CPU) keeps every model state in host memory (`cpu_bytes`), as measured: the 16-bit
  parameter partition (2Ψ/N), the 16-bit gradient partition (2Ψ/N), the fp32 gradient the
  optimizer steps on (4Ψ/N) and the fp32 master, momentum and variance (12Ψ/N). The GPU holds
  only what is gathered for the layers being computed (`buffers`). offload_params=False leaves
  the 16-bit parameter partition on the GPU (2Ψ/N there, 18Ψ/N on the CPU).
- FSDP2 (`fully_shard` per block + root, MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)): what it keeps is the sharded fp32 parameters (they are the master copy),
  sharded fp32 gradients and sharded optimizer state: 4 + 4 + 8 = 16Ψ/N. During forward and
  backward it all-gathers one block at a time into transient unsharded 16-bit parameters (plus
  the next block, prefetched); the root unit (embeddings, final norm, output projection) stays
  unsharded from the start of forward to the end of backward. fsdp_grad_op
  (reshard_after_forward=False, ZeRO-2-like) keeps every block unsharded from its forward until
  its backward, i.e. 2Ψ more at the end of forward. hsdp shards within a node and replicates
  across nodes: the fsdp formulas with N = world_size / nodes.
- fp32 training: parameters 4Ψ, gradients 4Ψ, Adam 8Ψ, no master copy (single, ddp, fsdp*) -
  with one measured exception: DeepSpeed's ZeRO optimizers (stages 1-3) clone their fp32
  partition even when the model already is fp32, so zero* keep 12Ψ/N of optimizer state in
  fp32 too (params 4Ψ, grads 4Ψ for zero1; 4Ψ/N grads for zero2; all /N for zero3).

Buffers (`buffers`, transient or communication memory, approximate and not part of the ZeRO
formulas): the 16-bit copies autocast makes of every Linear weight (single/ddp in 16-bit); DDP's
gradient buckets (a second fp32 copy of all gradients: torch's default
gradient_as_bucket_view=False); DeepSpeed's reduce bucket (reduce_bucket_size elements of
16-bit gradients, n_embd² by default) and the fp32 gradient partition created for the optimizer
step (4Ψ/N; ZeRO-3: one sub-group of bucket size at a time, with its 16-bit flattened copy);
ZeRO-3's gathered parameters (the largest module plus one prefetch bucket); FSDP's unsharded
root and two blocks, plus one unit's unsharded gradients (16-bit + fp32 for the reduce-scatter).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4): a GPT-2 layer stores ≈ s·b·h·(34 + 5·a·s/h) bytes with 16-bit activations
and dropout, without flash attention (s = sequence, b = micro-batch, h = n_embd, a = heads).
Counted tensor by tensor for this model (`pretrain.model`), per token and layer, with c = bytes
of an activation (2 in 16-bit, 4 in fp32) and r = bytes of the residual stream (4 when autocast
runs an fp32 model, i.e. single/ddp, else c):

    norms        2 · r·h                       LayerNorm input (RMSNorm: 2 · (4 + r)·h, fp32 math)
    attention    c · (h + (h_q + 2·h_kv) + h_q) c_attn input, q|k|v, SDPA output = c_proj
                                               input (h_q = a·head_dim: h unless head_size is
                                               set apart, as Qwen3's)
                 + (4 + c) · (h_q + h_kv)      q/k norm (qk_norm): fp32 copy (16-bit only) and
                                               output of q and k
                 + c · (h_q + h_kv) with RoPE  rotated q and k
                 + c · a·s without flash       the softmax probabilities [b, a, s, s]
    MLP          c · (h + 2·m)                 c_fc input, GELU input and output (m = MLP width)
                 c · (h + 4·m) for SwiGLU      c_fc input, gate|up, silu(gate), silu(gate)·up

In 16-bit with GPT-2's m = 4h that is 32·s·b·h per layer: Korthikanti's 34 less the two
residual dropout masks (dropout = 0) plus nothing for attention (flash/SDPA stores q, k, v, the
output and the log-sum-exp; the s² softmax term disappears). Dropout > 0 adds 1-byte masks
(2h per layer; a·s·(1 + c) more without flash). Once per micro-batch: token ids and targets
(16 bytes/token), the final norm's and the output projection's inputs, and the loss. The loss
never holds the [s, b, V] logits (16·s·b·V bytes of fp32 logits, log-softmax and their
gradients, 6.6 GB for GPT-2 at b = 8): `pretrain.model.LMHead` computes it and its gradient a
chunk of rows at a time, so it holds the fp32 weight gradient (4·V·h), the gradient of its
input (c·s·b·h) and one chunk of fp32 logits (LOSS_CHUNK_BYTES, plus a 16-bit copy and a
16-bit chunk weight gradient in 16-bit): `loss_bytes`.

With activation checkpointing (per block, non-reentrant) each layer keeps only its input,
r·s·b·h bytes (Korthikanti's 2sbh), and backward recomputes one block at a time: the peak is
L·r·s·b·h plus the larger of the loss (at the end of forward) and one block's full
activations plus its backward's gradient temporaries (r·h + c·m, 2·c·m for SwiGLU).

Checked against measurements: tests/distributed/test_plan_memory.py measures the model states
of every strategy of `pretrain.engine` (2 gloo ranks, tensor by tensor), and
tests/unit/test_plan.py measures the activation peak of GPT-2- and Llama-style models with
torch's MemTracker (fp32, autocast bf16, bf16 model; with and without checkpointing).

Not modelled: the CUDA context and allocator fragmentation (`usable_fraction` keeps 10% free by
default), NCCL buffers, torch.compile workspaces, pipeline or tensor parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pretrain.config import STRATEGIES
from pretrain.engine.precision import DTYPES
from pretrain.engine.strategies import MODES, STAGES, zero_bucket_elements
from pretrain.model import LOSS_CHUNK_BYTES, GPTConfig
from pretrain.plan.sizes import ModelSizes, model_sizes

PRECISIONS = tuple(DTYPES)  # fp32, bf16, fp16
DEEPSPEED = tuple(STAGES)  # what DeepSpeed runs: zero1, zero2, zero3, zero3_offload
FSDP = tuple(s for s in MODES if s in STRATEGIES)  # FSDP2's, to choose: fsdp, fsdp_grad_op, hsdp
# Strategies that run the fp32 model under torch.autocast (fp32 residual stream, 16-bit weight
# copies); the others hold 16-bit parameters for compute.
AUTOCAST = ("single", "ddp")

GB = 1e9
ZERO3_PERSISTENCE_THRESHOLD = 0  # stage3_param_persistence_threshold as pretrain.engine sets it
REDUCE_BUCKET_SIZE = 0  # elements; strategy.reduce_bucket_size's default: sized to the model


# ---------------------------------------------------------------------------------------------
# Model states
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelStates:
    """Per-rank bytes of parameters, gradients and optimizer state (and their CPU part)."""

    params: int
    grads: int
    optim: int
    cpu_bytes: int = 0
    shard_size: int = 1


def shard_size(strategy: str, world_size: int, nodes: int = 1) -> int:
    """Ranks the model states are split over: 1 (replicated), world_size, or the ranks of one
    node for hsdp."""
    check_layout(strategy, world_size, nodes)
    if strategy in ("single", "ddp"):
        return 1
    if strategy == "hsdp":
        return world_size // nodes
    return world_size


def check_layout(strategy: str, world_size: int, nodes: int) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if nodes < 1 or world_size % nodes:
        raise ValueError(
            f"nodes={nodes} must be >= 1 and divide world_size={world_size} "
            "(hsdp shards over the world_size / nodes ranks of a node)"
        )


def _bytes(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return 4 if precision == "fp32" else 2


def model_states(
    strategy: str,
    sizes: ModelSizes | int,
    world_size: int,
    precision: str,
    nodes: int = 1,
    *,
    offload_params: bool = True,
    zero3_persistence_threshold: int = ZERO3_PERSISTENCE_THRESHOLD,
    optimizer: str = "adamw",
) -> ModelStates:
    """Bytes per rank of parameters, gradients and Adam state for `strategy` (the table in the
    module docstring). `sizes` is a ModelSizes or just Ψ. optimizer="muon": the block matrices
    (Ψ_M, `ModelSizes.hidden_matrices`) keep one fp32 momentum buffer instead of Adam's two
    moments, 4 bytes less per element a rank owns (`muon_saving`)."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"unknown optimizer {optimizer!r}: choose adamw or muon")
    states = _adam_states(
        strategy,
        sizes,
        world_size,
        precision,
        nodes,
        offload_params=offload_params,
        zero3_persistence_threshold=zero3_persistence_threshold,
    )
    if optimizer == "adamw" or isinstance(sizes, int):
        return states
    saving = muon_saving(strategy, sizes, states.shard_size)
    if states.cpu_bytes and not states.optim:  # zero3_offload: the optimizer is in host memory
        states.cpu_bytes -= saving
    else:
        states.optim -= saving
    return states


def muon_saving(strategy: str, sizes: ModelSizes, n: int) -> int:
    """Bytes per rank Muon's one momentum saves over Adam's two moments: 4 per Muon element the
    rank owns (FSDP: its rows of each matrix, padded; ZeRO: a 1/N partition; else all)."""
    if strategy in ("single", "ddp"):
        return 4 * sizes.hidden_matrices
    if strategy in FSDP:
        return 4 * sum(-(-s[0] // n) * math.prod(s[1:]) for s in sizes.hidden_shapes)
    return 4 * -(-sizes.hidden_matrices // n)


def optimizer_comm_bytes(strategy: str, sizes: ModelSizes, n: int, optimizer: str) -> int:
    """Bytes a rank sends per optimizer step for the optimizer itself, beyond the strategy's own
    gradient and parameter collectives (and about as many received). AdamW: 0 (elementwise).
    Muon under a sharded strategy (n > 1 ranks per shard group): its exchange (pretrain/optim/
    muon.py) sends the pieces of the matrices other ranks own in fp32 and returns their
    orthogonalised pieces in bf16, (N-1)/N² · Ψ_M · (4 + 2) bytes with owners balanced (a rank
    holds Ψ_M/N, (N-1)/N of which other ranks own); replicated strategies send nothing (every
    rank orthogonalises every matrix). The owner also holds its matrices whole while it
    orthogonalises them: about 6 · Ψ_M/N bytes for the step (ZeRO-3: one sub-group's)."""
    if optimizer != "muon" or n <= 1 or strategy in ("single", "ddp"):
        return 0
    return (n - 1) * sizes.hidden_matrices * (4 + 2) // (n * n)


def _adam_states(
    strategy: str,
    sizes: ModelSizes | int,
    world_size: int,
    precision: str,
    nodes: int = 1,
    *,
    offload_params: bool = True,
    zero3_persistence_threshold: int = ZERO3_PERSISTENCE_THRESHOLD,
) -> ModelStates:
    if isinstance(sizes, int):
        sizes = ModelSizes.from_psi(sizes)
    n = shard_size(strategy, world_size, nodes)
    w = _bytes(precision)  # bytes of a parameter/gradient as the strategy computes with it
    psi = sizes.total

    def part(elems: int) -> int:  # elements of a flat partition of `elems` (padded to n)
        return -(-elems // n)

    if strategy in ("single", "ddp"):
        # fp32 model (autocast in 16-bit): params and grads fp32, Adam momentum + variance.
        return ModelStates(4 * psi, 4 * psi, 8 * psi, shard_size=n)
    if strategy in FSDP:
        # FSDP2 shards every parameter on dim 0, padded to a multiple of n.
        local = sum(-(-s[0] // n) * math.prod(s[1:]) if s else 1 for s in sizes.shapes)
        return ModelStates(4 * local, 4 * local, 8 * local, shard_size=n)
    # DeepSpeed ZeRO: the fp32 master partition + momentum + variance, 12 bytes per owned element
    # (a separate fp32 copy even when the model is fp32: DeepSpeed clones it).
    optim = 12 * part(psi)
    if strategy == "zero1":
        return ModelStates(w * psi, w * psi, optim, shard_size=n)
    if strategy == "zero2":
        return ModelStates(w * psi, w * part(psi), optim, shard_size=n)
    # ZeRO-3 partitions each parameter separately; small ones also stay whole on every rank.
    params = sum(w * part(math.prod(s)) for s in sizes.shapes)
    params += sum(
        w * math.prod(s) for s in sizes.shapes if math.prod(s) <= zero3_persistence_threshold
    )
    if strategy == "zero3":
        return ModelStates(params, w * part(psi), optim, shard_size=n)
    # zero3_offload: host memory holds the fp32 master, momentum and variance, the fp32
    # gradient the CPU step reads, the 16-bit gradient partition and (offload_params) the 16-bit
    # parameter partition.
    cpu = optim + 4 * part(psi) + w * part(psi)
    if offload_params:
        cpu += params
        params = 0
    return ModelStates(params, 0, 0, cpu_bytes=cpu, shard_size=n)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def _per_token(cfg: GPTConfig, seq_len: int, c: int, r: int, flash: bool) -> tuple[int, int, int]:
    """(one layer's stored activations, the final norm + head inputs + token ids, one fp32
    logit row) in bytes per token; the tensor inventory of the module docstring."""
    C, H = cfg.n_embd, cfg.n_head
    cq, ckv = H * cfg.head_dim, cfg.kv_heads * cfg.head_dim  # q and k/v widths (C unless
    m = cfg.mlp_hidden_size  # head_size is set apart from n_embd / n_head)
    if cfg.norm == "rmsnorm":
        norm = (4 + r) * C + 4  # fp32 input copy + normalised output, 1/rms
    else:
        norm = r * C + 8  # input, mean and 1/std
    attn = c * (C + (cq + 2 * ckv) + cq) + 4 * H  # + fp32 log-sum-exp per head
    if cfg.qk_norm:  # RMSNorm of q and k: an fp32 copy (16-bit), the output, 1/rms per head
        attn += ((4 if c != 4 else 0) + c) * (cq + ckv) + 4 * (H + cfg.kv_heads)
    if cfg.pos_emb == "rope":
        attn += c * (cq + ckv)
    if not flash:
        attn += c * H * seq_len
        if cfg.dropout > 0:
            attn += H * seq_len * (1 + c)
    mlp = c * C + (4 if cfg.mlp == "swiglu" else 2) * c * m
    drop = 2 * C if cfg.dropout > 0 else 0
    layer = 2 * norm + attn + mlp + drop
    head = 16 + norm + c * C + (C if cfg.dropout > 0 else 0)
    return layer, head, 4 * cfg.padded_vocab_size


def loss_bytes(cfg: GPTConfig, tokens: int, c: int, autocast_copies: bool) -> int:
    """Peak bytes of the chunked cross-entropy of `tokens` positions (`pretrain.model.LMHead`,
    at the end of its forward, where it also computes its gradients): the fp32 weight gradient
    [V, C], the gradient of the hidden states [N, C] (c bytes), one chunk of fp32 logits and
    their softmax [rows, V] (plus a c-byte copy for the backward matmuls in 16-bit) and, in
    16-bit, one chunk's weight gradient [V, C] before it is added in fp32. Under autocast over
    an fp32 model (`autocast_copies`) the weight and the hidden states are cast copies too."""
    V, C = cfg.padded_vocab_size, cfg.n_embd
    rows = min(tokens, max(1, LOSS_CHUNK_BYTES // (4 * cfg.vocab_size)))
    total = 4 * V * C + c * tokens * C + 4 * rows * cfg.vocab_size
    if c != 4:
        total += c * rows * cfg.vocab_size + c * cfg.vocab_size * C
    if autocast_copies and c != 4:
        total += c * cfg.vocab_size * C + c * tokens * C
    return total


def activation_bytes(
    cfg: GPTConfig,
    micro_batch: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: bool,
    *,
    fp32_residual: bool = False,
    flash_attention: bool = True,
) -> int:
    """Peak bytes of activations (and the loss) of one micro-batch on one rank.

    fp32_residual: autocast over an fp32 model (the residual stream and norm inputs are fp32);
    flash_attention: SDPA's fused kernels (no s x s probabilities stored)."""
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch}, {seq_len}")
    c = _bytes(precision)
    r = 4 if fp32_residual else c
    layer, head, _ = _per_token(cfg, seq_len, c, r, flash_attention)
    tokens = micro_batch * seq_len
    loss = loss_bytes(cfg, tokens, c, fp32_residual)
    if not activation_checkpointing:
        return tokens * (cfg.n_layer * layer + head) + loss
    kept = cfg.n_layer * r * cfg.n_embd  # each block's input
    # Backward of the block being recomputed: its full activations, the gradient of the block
    # output and, net, one more MLP-width gradient (two for SwiGLU) while the MLP's backward
    # runs. The loss is done by then (its backward runs first).
    grad_temps = r * cfg.n_embd + (2 if cfg.mlp == "swiglu" else 1) * c * cfg.mlp_hidden_size
    recompute = layer + grad_temps
    return max(tokens * (kept + head) + loss, tokens * (kept + recompute))


def buffer_bytes(
    strategy: str,
    sizes: ModelSizes,
    world_size: int,
    precision: str,
    nodes: int = 1,
    *,
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE,
) -> int:
    """Transient and communication memory per rank (approximate; see the module docstring)."""
    n = shard_size(strategy, world_size, nodes)
    w = _bytes(precision)
    psi = sizes.total
    part = -(-psi // n)
    unit = max(sizes.root, sizes.block)
    if strategy in AUTOCAST:
        # autocast's 16-bit copy of every Linear weight but the output projection's (the loss
        # makes that one, `loss_bytes`).
        copies = 2 * (sizes.linear_weights - sizes.head) if precision != "fp32" else 0
        bucket = 4 * psi if strategy == "ddp" and world_size > 1 else 0
        return copies + bucket
    # DeepSpeed allocates its reduce bucket at full size, however small the model.
    elems = zero_bucket_elements(sizes.width, reduce_bucket_size)
    bucket = w * elems
    if strategy in ("zero1", "zero2"):
        return bucket + 4 * part  # + the fp32 gradient partition built for the step
    if strategy in ("zero3", "zero3_offload"):
        # The module being computed, gathered, and one prefetch bucket.
        gathered = w * (sizes.largest_module + elems)
        # The step flattens one sub-group's gradients (16-bit) into an fp32 copy; offloaded, the
        # fp32 gradient lives on the CPU.
        step = (w + 4) * zero3_sub_group(sizes, n, elems) if strategy == "zero3" else 0
        return gathered + bucket + step
    # FSDP2: unsharded root + current and prefetched block (fsdp, hsdp) or every block
    # (fsdp_grad_op), plus one unit's unsharded gradients (compute dtype + fp32 reduce copy).
    if strategy == "fsdp_grad_op":
        unsharded = w * psi
    else:
        unsharded = w * (sizes.root + 2 * sizes.block)
    grads = (w + 4) * unit if w != 4 else 4 * unit
    return unsharded + grads


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes per rank. `total` is what the accelerator must hold; `cpu_bytes` is host memory
    (zero3_offload's optimizer)."""

    strategy: str
    world_size: int
    shard_size: int
    precision: str
    activation_checkpointing: bool
    params: int
    grads: int
    optim: int
    activations: int
    buffers: int
    cpu_bytes: int = 0
    optimizer_comm_bytes: int = 0
    """Bytes sent per optimizer step by the optimizer itself (Muon's: `optimizer_comm_bytes`)."""
    staging: int = 0
    """Host memory of a background save's staging copy (`async_save`; in the train and save
    peaks), set by `estimate`."""
    total: int = field(init=False)
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    """The peak of each phase (init, train, save, resume), set by `estimate`."""

    def __post_init__(self) -> None:
        self.total = self.params + self.grads + self.optim + self.activations + self.buffers

    @property
    def peak(self) -> int:
        """The largest accelerator peak of any phase: what must fit."""
        return max((p.device for p in self.phases.values()), default=self.total)

    @property
    def host_peak(self) -> int:
        """The largest host-memory peak of any phase."""
        return max((p.host for p in self.phases.values()), default=self.cpu_bytes)

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer state on the accelerator (the ZeRO formulas)."""
        return self.params + self.grads + self.optim


def estimate(
    model_cfg: GPTConfig,
    strategy: str,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: bool,
    nodes: int = 1,
    *,
    flash_attention: bool = True,
    offload_params: bool = True,
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE,
    zero3_persistence_threshold: int = ZERO3_PERSISTENCE_THRESHOLD,
    device: str = "cuda",
    async_save: bool = False,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Per-rank memory of training `model_cfg` with `strategy` on `world_size` ranks (`nodes`
    nodes, for hsdp), micro-batches of `micro_batch` x `seq_len` tokens, Adam(W); `.phases`
    holds the peak of each phase of the run (`_phases`), on `device` ("cuda" or "cpu"), with
    checkpoints written in the background when `async_save`; optimizer="muon": Muon's state
    and exchange (`model_states`, `optimizer_comm_bytes`)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: choose cuda or cpu")
    if seq_len > model_cfg.block_size:
        raise ValueError(
            f"seq_len={seq_len} is longer than model.block_size={model_cfg.block_size}"
        )
    sizes = model_sizes(model_cfg)
    states = model_states(
        strategy,
        sizes,
        world_size,
        precision,
        nodes,
        offload_params=offload_params,
        zero3_persistence_threshold=zero3_persistence_threshold,
        optimizer=optimizer,
    )
    acts = activation_bytes(
        model_cfg,
        micro_batch,
        seq_len,
        precision,
        activation_checkpointing,
        fp32_residual=precision == "fp32" or strategy in AUTOCAST,
        flash_attention=flash_attention,
    )
    buffers = buffer_bytes(
        strategy,
        sizes,
        world_size,
        precision,
        nodes,
        reduce_bucket_size=reduce_bucket_size,
    )
    e = MemoryEstimate(
        strategy=strategy,
        world_size=world_size,
        shard_size=states.shard_size,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        params=states.params,
        grads=states.grads,
        optim=states.optim,
        activations=acts,
        buffers=buffers,
        cpu_bytes=states.cpu_bytes,
        optimizer_comm_bytes=optimizer_comm_bytes(strategy, sizes, states.shard_size, optimizer),
    )
    e.phases = _phases(e, sizes, device, reduce_bucket_size, async_save)
    return e


def zero3_sub_group(sizes: ModelSizes, n: int, elems: int) -> int:
    """Elements of ZeRO-3's largest optimizer sub-group on a rank: sub_group_size (= the
    bucket, as pretrain.engine sets it), or one parameter's partition if larger, at most the
    rank's whole partition."""
    return min(-(-sizes.total // n), max(elems, -(-sizes.largest_param // n)))


# ---------------------------------------------------------------------------------------------
# Peaks of each phase of a run: initialisation, training, saving, resuming
# ---------------------------------------------------------------------------------------------


@dataclass
class PhasePeak:
    """Peak bytes per rank during one phase: on the accelerator (`device`) and in host memory
    (`host`: offloaded states, checkpoint staging). On a CPU-only machine they are one memory:
    `total`."""

    device: int
    host: int = 0

    @property
    def total(self) -> int:
        return self.device + self.host


PHASES = ("init", "train", "save", "resume")


def phase_peaks(
    model_cfg: GPTConfig,
    strategy: str,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: bool = False,
    nodes: int = 1,
    **kw: Any,
) -> dict[str, PhasePeak]:
    """`estimate(...).phases`: the per-rank peak of each phase of a run (see `_phases`)."""
    e = estimate(
        model_cfg, strategy, world_size, micro_batch, seq_len, precision,
        activation_checkpointing, nodes, **kw,
    )  # fmt: skip
    return e.phases


def _phases(
    e: MemoryEstimate, sizes: ModelSizes, device: str, bucket: int, async_save: bool = False
) -> dict[str, PhasePeak]:
    """Per-rank peaks of the four phases of a run under `pretrain.engine` (`device` "cuda" or
    "cpu"), each the memory held plus the phase's largest transient:

        init    `Engine.build`: the parameters as the strategy keeps them (sharded where it
                shards: created on the meta device, or partitioned by DeepSpeed as created),
                DeepSpeed's fp32 masters and preallocated buffers, DDP's buckets, plus one full
                fp32 parameter (each rank computes one initial value at a time)
        train   `estimate(...).total`, plus AdamW's temporaries on CPU (torch's per-tensor
                AdamW makes two fp32 temporaries the size of the tensor it steps: a parameter,
                or DeepSpeed's flat partition or ZeRO-3 sub-group; on CUDA the fused AdamW
                makes none)
        save    the states after a step (torch strategies free their gradients) plus one
                checkpoint item (DCP copies a view to write it; on CUDA that copy is in host
                memory): every rank writes only its own part
        (async_save: train and save also hold the staging copy, `staging_bytes`; a save
        then writes from it, with no item copied)
        resume  the init state, the optimizer state created to be loaded into (zero
                gradients and one step's temporaries: all parameters at once for torch's
                state-dict API, one partition at a time for ZeRO), plus one item read

    Nothing in a save or resume is the size of the model: no rank gathers full weights or
    moments (at 7B that was 12 bytes per parameter per rank of host memory)."""
    strategy, world_size = e.strategy, e.world_size
    n = e.shard_size
    w = _bytes(e.precision)
    psi = sizes.total
    part = -(-psi // n)
    largest = sizes.largest_param
    elems = zero_bucket_elements(sizes.width, bucket)
    cpu = device == "cpu"
    offload = strategy == "zero3_offload"
    ddp_buckets = 4 * psi if strategy == "ddp" and world_size > 1 else 0
    # One full fp32 parameter: an initial value being computed (in host memory, always).
    initial_value = 4 * largest
    # A checkpoint item: the largest piece of one tensor a rank writes or reads. DCP copies it
    # (a view of a larger buffer is copied to be written; what is read is read whole first), in
    # host memory on CUDA.
    item = 4 * (largest if strategy in AUTOCAST else -(-largest // n))

    # The tensor the optimizer steps at once, and the zero gradients torch's state-dict API
    # gives all parameters at once (ZeRO: one partition at a time) to create the state.
    if strategy in AUTOCAST:
        stepped, zero_grads = largest, 4 * psi
    elif strategy in FSDP:
        stepped, zero_grads = -(-largest // n), 4 * part
    elif strategy in ("zero1", "zero2"):
        stepped = part  # the flat fp32 partition of the largest param group
        zero_grads = 4 * part
    else:
        stepped = zero3_sub_group(sizes, n, elems)
        zero_grads = 4 * stepped
    # torch's per-tensor (unfused) AdamW, the CPU default: two fp32 temporaries of that size.
    adam_temps = 8 * stepped if cpu else 0

    # The optimizer's state per rank (Adam's two moments, or Muon's one momentum for its
    # matrices: `e.optim` counts either); DeepSpeed's `e.optim` also holds the fp32 masters.
    moments = e.optim
    if strategy in DEEPSPEED:
        moments = e.optim - 4 * part if not offload else 8 * part
    masters = e.optim - moments if strategy in DEEPSPEED and not offload else 0
    # What a rank holds once built (no gradients, no Adam moments yet), device and host.
    if offload:
        built = (0, e.cpu_bytes - moments)  # 16-bit params and grads, fp32 master and grad
    elif strategy in DEEPSPEED:
        # fp32 masters, the reduce bucket, and ZeRO-2/3's gradient partition (allocated at
        # initialisation).
        kept_grads = e.grads if strategy != "zero1" else 0
        built = (e.params + masters + w * elems + kept_grads, 0)
    else:
        built = (e.params + ddp_buckets, 0)
    # ZeRO-1/2 copy the 16-bit model into one flat buffer, ZeRO-3 its partitions into flat
    # sub-groups: for a moment both exist.
    flatten = e.params if strategy in ("zero1", "zero2", "zero3") else 0
    init = PhasePeak(built[0] + flatten, built[1] + initial_value)

    staging = staging_bytes(strategy, w, psi, part, moments) if async_save else 0
    e.staging = staging
    # On CPU the host is the device: the staging copy is in the one memory.
    held = (staging, 0) if cpu else (0, staging)
    train = PhasePeak(
        e.total + (0 if offload else adam_temps) + held[0],
        e.cpu_bytes + (adam_temps if offload else 0) + held[1],
    )
    # After a step: activations and transient buffers are gone, torch strategies have freed
    # their gradients. ZeRO keeps its gradient partition, but in host memory ZeRO-3's partition
    # gives its pages back after every step (`DeepSpeedState.release_gradient_pages`) and is
    # resident again only from the next backward on.
    released = w * part if cpu and strategy in ("zero3", "zero3_offload") else 0
    if offload:
        after_step = (built[0], built[1] + moments - released)
    else:
        after_step = (built[0] + moments - released, built[1])
    if async_save:
        save = PhasePeak(after_step[0] + held[0], after_step[1] + held[1])
    else:
        save = PhasePeak(after_step[0] + (item if cpu else 0), after_step[1] + (0 if cpu else item))
    # A resumed process builds (init), then creates the optimizer state it loads into, then
    # reads one item at a time.
    create = zero_grads + adam_temps
    # In host memory, DDP's buckets are allocated at wrap time but their pages are first
    # written by a backward: a resumed process, which has run none yet, does not hold them.
    # (`init` still counts them: measured, wrapping holds as much for a moment, 0.97 of plan.)
    untouched = ddp_buckets if cpu else 0
    loaded = PhasePeak(
        after_step[0] - untouched + (0 if offload else max(create, item if cpu else 0)),
        after_step[1] + (create if offload else 0) + (0 if cpu else item),
    )
    resume = PhasePeak(max(init.device, loaded.device), max(init.host, loaded.host))
    return {"init": init, "train": train, "save": save, "resume": resume}


def staging_bytes(strategy: str, w: int, psi: int, part: int, moments: int) -> int:
    """Host memory of a background save's staging copy (`pretrain.engine.staging`) per rank:
    what the rank saves, its fp32 weights (all of them where the strategy replicates, its
    shard elsewhere) and its optimizer `moments`; under DeepSpeed its own files' state once
    more (fp32 partition and moments; on ZeRO-1/2 also the 16-bit model that rank 0's model
    file holds, `w` bytes per element)."""
    weights = 4 * (psi if strategy in AUTOCAST else part)
    if strategy not in DEEPSPEED:
        return weights + moments
    model_file = w * psi if strategy in ("zero1", "zero2") else 0
    return 2 * (weights + moments) + model_file
