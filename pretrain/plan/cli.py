"""The planner's command line (Hydra): python -m pretrain.plan model=<preset> world_size=8 ...

A conf/model preset and/or model.<key>=... overrides give the architecture; the other keys
(`PlanConfig`) the layout, batch, precision and memory. Prints one row per strategy and, for
strategy=all, the recommendation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pretrain.config import STRATEGIES, OptimizerName
from pretrain.model import GPTConfig
from pretrain.plan.costs import GB, REDUCE_BUCKET_SIZE, check_layout, estimate
from pretrain.plan.recommend import Recommendation, recommend
from pretrain.plan.sizes import model_sizes

DEFAULT_VOCAB = 50304  # GPT-2's 50257 ids rounded up to a multiple of 64 (nanoGPT)


@dataclass
class PlanConfig:
    defaults: list[Any] = field(
        # _self_ first: the preset must override the schema's defaults, not the reverse.
        default_factory=lambda: [
            "_self_",
            {"model": "gpt2-124m"},
            {"override hydra/job_logging": "none"},
            {"override hydra/hydra_logging": "none"},
        ]
    )
    model: GPTConfig = field(default_factory=GPTConfig)
    """Architecture: a conf/model preset (model=gpt2-350m) and/or model.<key>=... overrides."""
    strategy: str = "all"
    """One of single, ddp, zero1, zero2, zero3, zero3_offload, fsdp, fsdp_grad_op, hsdp, or all."""
    world_size: int = 8
    """Total ranks (processes, one per GPU)."""
    nodes: int = 1
    """Nodes the ranks are spread over (hsdp shards within a node, replicates across nodes)."""
    micro_batch: int = 8
    """Sequences per forward pass per rank."""
    seq_len: int = 0
    """Tokens per sequence (0 = model.block_size)."""
    precision: str = "bf16"
    """fp32, bf16 or fp16."""
    vocab_size: int = 0
    """Vocabulary size (0 = model.vocab_size, or 50304, GPT-2's padded vocabulary, when the
    preset leaves it to the data)."""
    device_memory_gb: float = 80.0
    """Accelerator memory per rank, in GB (1e9 bytes)."""
    usable_fraction: float = 0.9
    """Fraction of device memory an estimate may fill (the rest: CUDA context, fragmentation)."""
    host_memory_gb: float = 0.0
    """Host memory per node for zero3_offload's CPU part (0 = not checked)."""
    activation_checkpointing: bool = False
    """Recommend with activation checkpointing (both are printed)."""
    device: str = "cuda"
    """cuda or cpu: on CPU, torch's AdamW (unfused) makes temporaries the size of each tensor it
    steps, and the device and the host are one memory."""
    flash_attention: bool = True
    """SDPA flash/memory-efficient attention (no s x s attention matrix stored)."""
    offload_params: bool = True
    """zero3_offload moves the 16-bit parameter partition to the CPU too (as pretrain.engine)."""
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE
    """DeepSpeed reduce bucket, in elements (strategy.reduce_bucket_size)."""
    async_save: bool = False
    """Checkpoints written in the background (checkpoint.async_save): a host copy of what each
    rank saves, held from the first save on, in the train and save peaks."""
    optimizer: OptimizerName = OptimizerName.adamw
    """optim.name: adamw, or muon (one momentum for the block matrices, and Muon's exchange)."""
    hydra: Any = field(
        default_factory=lambda: {
            "run": {"dir": "."},
            "output_subdir": None,
            # Named for the command, not this file: Hydra's --help says "plan is powered by".
            "job": {"chdir": False, "name": "plan"},
        }
    )


MODEL_PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"


def register() -> None:
    """Store the `plan` primary config and the conf/model presets in Hydra's ConfigStore.

    Only the model group is taken from conf/: the training config's other groups (strategy,
    precision) would turn this tool's plain `strategy=`/`precision=` keys into group choices.
    Each preset is merged into the GPTConfig schema, so a preset or override naming an unknown
    model key fails."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="plan", node=PlanConfig)
    for path in sorted(MODEL_PRESETS.glob("*.yaml")):
        cs.store(group="model", name=path.stem, node=OmegaConf.load(path))


def _fmt(x: int, unit: float) -> str:
    return f"{x / unit:.2f}"


def plan_report(cfg: Any) -> tuple[str, Recommendation | None]:
    """The printed table and the recommendation for a PlanConfig (or its DictConfig)."""
    mc = GPTConfig.from_mapping(dict(cfg.model))
    if cfg.vocab_size:
        mc.vocab_size = cfg.vocab_size
    elif mc.vocab_size == 0:
        mc.vocab_size = DEFAULT_VOCAB
    seq_len = cfg.seq_len or mc.block_size
    names = list(STRATEGIES) if cfg.strategy == "all" else [cfg.strategy]
    for s in names:
        check_layout(s, cfg.world_size, cfg.nodes)
    kw = dict(
        flash_attention=cfg.flash_attention,
        offload_params=cfg.offload_params,
        reduce_bucket_size=cfg.reduce_bucket_size,
        device=cfg.device,
        async_save=cfg.async_save,
        optimizer=OptimizerName(cfg.optimizer).value,
    )
    args = (cfg.world_size, cfg.micro_batch, seq_len, cfg.precision)
    ac = bool(cfg.activation_checkpointing)
    rows = []
    for s in names:
        off = estimate(mc, s, *args, False, cfg.nodes, **kw)
        on = estimate(mc, s, *args, True, cfg.nodes, **kw)
        rows.append((s, off, on, (on if ac else off).phases))
    psi = model_sizes(mc).total
    largest = max(
        max(off.total, on.total, *(p.total for p in ph.values())) for _, off, on, ph in rows
    )
    unit, uname = (GB, "GB") if largest >= GB else (1e6, "MB")
    budget = cfg.device_memory_gb * GB * cfg.usable_fraction
    out = [
        f"Memory per rank: {psi / 1e6:.1f}M parameters (n_layer={mc.n_layer}, "
        f"n_embd={mc.n_embd}, vocab {mc.padded_vocab_size}), world_size={cfg.world_size}, "
        f"nodes={cfg.nodes}, micro_batch={cfg.micro_batch}, seq_len={seq_len}, "
        f"precision={cfg.precision}",
        f"{uname} ({'1e9' if uname == 'GB' else '1e6'} bytes) on the {cfg.device}. act = "
        "activations, AC = with activation checkpointing, buffers = transient/communication; "
        f"train, init, save, resume = peak of each phase{' (with AC)' if ac else ''}; host = "
        "the largest host-memory peak of any phase (offloaded states, checkpoint staging)",
        "",
    ]
    head = (
        "strategy",
        "shard",
        "params",
        "grads",
        "optim",
        "buffers",
        "act",
        "act+AC",
        "train",
        "train+AC",
        "init",
        "save",
        "resume",
        "host",
        "fits",
    )
    table = [head]
    for s, off, on, ph in rows:
        ok = max(p.device for p in ph.values()) <= budget
        table.append(
            (
                s,
                str(off.shard_size),
                _fmt(off.params, unit),
                _fmt(off.grads, unit),
                _fmt(off.optim, unit),
                _fmt(off.buffers, unit),
                _fmt(off.activations, unit),
                _fmt(on.activations, unit),
                _fmt(off.total, unit),
                _fmt(on.total, unit),
                _fmt(ph["init"].device, unit),
                _fmt(ph["save"].device, unit),
                _fmt(ph["resume"].device, unit),
                _fmt(max(p.host for p in ph.values()), unit),
                "yes" if ok else "no",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        out.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))
            )
        )
    out.append("")
    if cfg.async_save:
        out.append(
            "async_save: each rank also holds a staging copy of what it saves, from the first "
            "save on (in host memory; in the train and save peaks): "
            + ", ".join(f"{s} {_fmt(off.staging, unit)}" for s, off, _, _ in rows)
            + f" {uname}"
        )
    comm = [(s, off.optimizer_comm_bytes) for s, off, _, _ in rows if off.optimizer_comm_bytes]
    if comm:
        out.append(
            "optimizer=muon: Muon's exchange sends, per rank and optimizer step, "
            + ", ".join(f"{s} {b / 1e6:.1f} MB" for s, b in comm)
            + " beyond the strategy's own collectives (single, ddp: none)"
        )
    out.append(
        f"fits = every phase's peak{' (with AC)' if ac else ''} <= {budget / GB:.2f} GB "
        f"({cfg.usable_fraction:.0%} of device_memory_gb={cfg.device_memory_gb:g})"
    )
    rec = None
    if cfg.strategy == "all":
        rec = recommend(
            mc,
            cfg.world_size,
            cfg.micro_batch,
            seq_len,
            cfg.precision,
            cfg.activation_checkpointing,
            cfg.device_memory_gb,
            cfg.nodes,
            usable_fraction=cfg.usable_fraction,
            host_memory_gb=cfg.host_memory_gb,
            **kw,
        )
        out.append(f"Recommendation: {rec.message}")
    return "\n".join(out), rec


def check_keys(argv: list[str]) -> None:
    """Fail early, naming the valid keys and the closest match, on an unknown `key=value`
    (Hydra refuses it too, but only says the key is not in the struct)."""
    import difflib

    top = [f.name for f in fields(PlanConfig) if f.name not in ("defaults", "hydra")]
    model = [f.name for f in fields(GPTConfig)]
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra", "+hydra", "~")):
            continue
        key = arg.split("=", 1)[0].lstrip("+")
        parent, _, leaf = key.rpartition(".")
        valid = model if parent == "model" else top
        if (parent in ("", "model") and leaf in valid) or key == "model":
            continue
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        where = "model" if parent == "model" else "the top level"
        sys.stderr.write(
            f"error: unknown key '{key}'.{hint}\nValid keys at {where}: {', '.join(valid)}\n"
        )
        raise SystemExit(2)


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    check_keys(sys.argv[1:])
    register()

    @hydra.main(config_path=None, config_name="plan", version_base=None)
    def _main(cfg: DictConfig) -> None:
        try:
            text, _ = plan_report(cfg)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        print(text, flush=True)

    _main()
