"""The RL sub-commands' options (``minimind grpo | spo | ppo | agent``) and each loss type's defaults.

A flag left at ``-1`` takes the value the chosen ``--loss_type`` prescribes (:data:`RECIPE_DEFAULTS`,
:data:`~minimind.rl.objective.LOSS_TYPES`), so ``minimind grpo`` runs GRPO as published (k3 KL with
beta 0.04) and ``--loss_type dapo`` brings DAPO's clip-higher, mini-batches, dynamic sampling and
soft overlong punishment; a flag the user sets always wins. :meth:`RLOptions.resolved` fills them in.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind.model.lora import LoRAConfig
from minimind.rl.objective import LOSS_TYPES, ObjectiveConfig

__all__ = ["GROUP_ADVANTAGES", "PTX_LOSSES", "RECIPE_DEFAULTS", "AgentOptions", "GRPOOptions",
           "LossTypeDefaults", "PPOOptions", "RLOptions", "SPOOptions", "parse_reward_spec"]

#: Advantages computed within a prompt's group of samples (they need ``--num_generations >= 2``).
GROUP_ADVANTAGES = ("group", "group_mean")
#: What ``--ptx_coef`` weighs on the ``--ptx_data`` rows: their replies' NLL, or the KL from the reference.
PTX_LOSSES = ("nll", "kl")


@dataclass(frozen=True)
class LossTypeDefaults:
    """What a loss type's paper does around the loss: KL weight, update schedule, sampling, shaping.

    ``beta`` weighs the KL against the reference (PPO: in the per-token reward); ``ppo_epochs`` (mu)
    passes over each rollout batch, split into ``steps_per_generation`` optimizer steps;
    ``dynamic_sampling`` extra rounds of prompts to fill the batch with groups whose rewards
    differ (DAPO); ``overlong_buffer`` the soft overlong punishment's buffer as a share of
    ``--max_gen_len`` (DAPO: the last quarter)."""

    beta: float = 0.0
    ppo_epochs: int = 1
    steps_per_generation: int = 1
    dynamic_sampling: int = 0
    overlong_buffer: float = 0.0


#: Per ``--loss_type``: GRPO (DeepSeekMath) and its on-policy relatives take one step per rollout;
#: DAPO, GSPO and CISPO split each rollout batch into mini-batches as their papers do (so the
#: clip acts from the second mini-batch on); PPO makes two passes (the reference's update iterations).
RECIPE_DEFAULTS: dict[str, LossTypeDefaults] = {
    "grpo": LossTypeDefaults(beta=0.04),
    "dr_grpo": LossTypeDefaults(),
    "dapo": LossTypeDefaults(steps_per_generation=4, dynamic_sampling=3, overlong_buffer=0.25),
    "bnpo": LossTypeDefaults(),
    "gspo": LossTypeDefaults(steps_per_generation=4),
    "cispo": LossTypeDefaults(steps_per_generation=4),
    "spo": LossTypeDefaults(),
    "ppo": LossTypeDefaults(beta=0.02, ppo_epochs=2),
}


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class RLOptions:
    """Settings shared by every RL sub-command (the reference's GRPO flags, plus the objective's)."""

    loss_type: str = _opt("grpo", f"objective: {', '.join(LOSS_TYPES)}")
    num_generations: int = _opt(6, "samples per prompt (a GRPO group)")
    beta: float = _opt(-1.0, "KL weight against the frozen reference model (-1 = the loss type's default: "
                             "grpo 0.04, ppo 0.02 in the reward, others 0; 0 = no reference model)")
    ref_weight: str = _opt("", "reference model for beta > 0 and --ptx_loss kl: stage name or path "
                               "(default: a frozen copy of the starting policy)")
    reward: str = _opt("task:1", "weighted rule rewards, e.g. task:1,format:0.1 or math:1,format:0.1 "
                                 "(math, format, tool_format, length, task, tool_call, task_format)")
    reward_model_path: str = _opt("", "Hugging Face reward model folder added to the reward ('' = none)")
    reward_model_weight: float = _opt(1.0, "weight of the reward model's score")
    max_gen_len: int = _opt(1024, "new tokens per completion (per turn for agent)")
    temperature: float = _opt(0.8, "rollout sampling temperature (the trained log-probs are of logits / T)")
    top_p: float = _opt(1.0, "rollout nucleus filter (1 = off; the objective assumes it off)")
    top_k: int = _opt(0, "rollout top-k filter (0 = off; the objective assumes it off)")
    thinking_ratio: float = _opt(0.9, "share of prompts whose generation prompt opens <think>")
    ppo_epochs: int = _opt(-1, "mu: optimizer passes over each rollout batch (-1 = the loss type's default)")
    steps_per_generation: int = _opt(-1, "optimizer steps (mini-batches) per rollout batch and pass "
                                         "(-1 = the loss type's default)")
    micro_batch_size: int = _opt(0, "completions per forward/backward inside one optimizer step "
                                    "(memory only; 0 = the whole mini-batch)")
    target_kl: float = _opt(0.0, "stop a rollout batch's remaining updates once the approx-KL (k3) to the "
                                 "rollout policy exceeds this (0 = off)")
    epsilon: float = _opt(-1.0, "clip range below 1 (-1 = the loss type's default)")
    epsilon_high: float = _opt(-1.0, "clip range above 1 (-1 = the loss type's default)")
    tis_cap: float = _opt(0.0, "truncated importance sampling cap vs the rollout engine (0 = off)")
    dynamic_sampling: int = _opt(-1, "extra rounds of prompts to fill a batch with groups whose rewards "
                                     "differ (DAPO; -1 = the loss type's default, 0 = off)")
    overlong_buffer: int = _opt(-1, "soft overlong punishment over the last N tokens before --max_gen_len "
                                    "(DAPO; -1 = the loss type's default, 0 = off)")
    overlong_filter: int = _opt(-1, "1: truncated completions carry no loss (DAPO's overlong filtering); "
                                    "0: they train (-1 = the loss type's default)")
    debug_interval: int = _opt(0, "print a prompt, its completions and rewards every N steps (0 = off)")
    ptx_coef: float = _opt(0.0, "gamma: weight of a supervised loss on --ptx_data rows added to every optimizer "
                                "step (InstructGPT's PPO-ptx; keeps what the reward does not see; 0 = off)")
    ptx_data: str = _opt("", "SFT JSONL ({\"conversations\"} rows) for --ptx_coef")
    ptx_rows: int = _opt(0, "packed --ptx_data rows per optimizer step (0 = --batch_size)")
    ptx_loss: str = _opt("nll", "the --ptx_coef term: nll (learn the rows' replies, PPO-ptx) | kl (keep the "
                                "reference model's next-token distribution on them: a retain set)")
    lora_rank: int = _opt(0, "train LoRA adapters of this rank on a frozen policy instead of every weight "
                             "(0 = full fine-tuning); rollouts and the saved weights have them merged")
    lora_alpha: float = _opt(0.0, "LoRA scale alpha / rank (0 = alpha equals rank: scale 1)")
    lora_targets: str = _opt("all", "LoRA targets: all (every Linear of the decoder layers) | square | "
                                    "q_proj,v_proj,...")
    quantize: str = _opt("", "int8: rollouts decode with int8 weights (the engine's copy, re-quantized "
                             "after every update; --tis_cap corrects the policy mismatch); '' = off")
    compile_rollouts: int = _opt(0, "1: torch.compile the in-process rollout engine's decode step (a "
                                    "compile per new row count / cache size, ~30-60 s each on a CPU; pays "
                                    "over long runs)")
    rollout_backend: str = _opt("engine", "engine: sample in-process | server: on inference servers "
                                          "(--rollout_url; see the README, 'RL at scale')")
    rollout_url: str = _opt("", "rollout server base URLs, comma-separated (SGLang, vLLM or minimind serve)")
    rollout_dialect: str = _opt("sglang", "sglang: POST /generate (SGLang, minimind serve) | vllm: POST "
                                          "/v1/completions")
    sync_interval: int = _opt(1, "push the policy to the rollout servers every k optimizer steps (0 = never)")
    rollout_timeout: float = _opt(600.0, "seconds one rollout request may take before its server is failed")
    overlap: int = _opt(0, "1: generate step k+1's rollouts on the servers while step k trains (one step "
                           "off-policy; pair with --tis_cap)")

    @property
    def defaults(self) -> LossTypeDefaults:
        return RECIPE_DEFAULTS.get(self.loss_type, LossTypeDefaults())

    def resolved(self) -> RLOptions:
        """A copy with every ``-1`` ("the loss type's default") replaced by that default."""
        d = self.defaults
        changes: dict[str, Any] = {}
        for name in ("beta", "ppo_epochs", "steps_per_generation", "dynamic_sampling"):
            if getattr(self, name) < 0:
                changes[name] = getattr(d, name)
        if self.overlong_buffer < 0:
            changes["overlong_buffer"] = int(d.overlong_buffer * self.max_gen_len)
        return dataclasses.replace(self, **changes)

    def objective(self) -> ObjectiveConfig:
        """The :class:`ObjectiveConfig` these options select (KL on iff ``beta > 0``, except PPO,
        whose KL goes into the reward instead)."""
        o = self.resolved()
        cfg = LOSS_TYPES[o.loss_type]
        changes: dict[str, Any] = {}
        if o.epsilon >= 0:
            changes["eps_low"] = o.epsilon
        if o.epsilon_high >= 0:
            changes["eps_high"] = o.epsilon_high
        if o.tis_cap > 0:
            changes["tis_cap"] = o.tis_cap
        if o.overlong_filter >= 0:
            changes["mask_truncated"] = bool(o.overlong_filter)
        if cfg.advantage == "gae" or o.beta <= 0:
            changes.update(kl="none", beta=0.0)
        else:
            changes.update(kl=cfg.kl if cfg.kl != "none" else "k3", beta=o.beta)
        return cfg.with_(**changes)

    def lora_config(self) -> LoRAConfig | None:
        """The adapters ``--lora_rank`` asks for, or ``None`` (every weight trains)."""
        if not self.lora_rank:
            return None
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model is loaded: for the KL term (beta > 0, on resolved options)
        or for ``--ptx_loss kl``'s retain term."""
        return self.beta > 0 or (self.ptx_coef > 0 and self.ptx_loss == "kl")

    def validate(self) -> None:
        problems = []
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.num_generations < 1:
            problems.append(f"--num_generations must be >= 1, got {self.num_generations}")
        elif self.loss_type in LOSS_TYPES and LOSS_TYPES[self.loss_type].advantage in GROUP_ADVANTAGES \
                and self.num_generations < 2:
            problems.append(f"--loss_type {self.loss_type} uses group-relative advantages: "
                            f"--num_generations must be >= 2, got {self.num_generations}")
        if self.beta < 0 and self.beta != -1:
            problems.append(f"--beta must not be negative (-1 = the loss type's default), got {self.beta}")
        if self.max_gen_len < 1:
            problems.append(f"--max_gen_len must be >= 1, got {self.max_gen_len}")
        for name in ("ppo_epochs", "steps_per_generation"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                problems.append(f"--{name} must be >= 1 (-1 = the loss type's default), got {value}")
        if self.lora_rank < 0:
            problems.append(f"--lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        elif self.lora_rank:
            try:
                self.lora_config().validate()
            except ValueError as e:
                problems.append(str(e))
        if self.compile_rollouts not in (0, 1):
            problems.append(f"--compile_rollouts must be 0 or 1, got {self.compile_rollouts}")
        if self.quantize not in ("", "int8"):
            problems.append(f"--quantize must be int8 or empty, got {self.quantize!r}")
        if self.overlong_filter not in (-1, 0, 1):
            problems.append(f"--overlong_filter must be 0, 1 or -1 (the loss type's default), got "
                            f"{self.overlong_filter}")
        for name in ("dynamic_sampling", "overlong_buffer"):
            value = getattr(self, name)
            if value < -1:
                problems.append(f"--{name} must be >= 0 (-1 = the loss type's default), got {value}")
        if self.overlong_buffer > self.max_gen_len:
            problems.append(f"--overlong_buffer {self.overlong_buffer} exceeds --max_gen_len "
                            f"{self.max_gen_len}")
        if self.micro_batch_size < 0:
            problems.append(f"--micro_batch_size must not be negative, got {self.micro_batch_size}")
        if self.target_kl < 0:
            problems.append(f"--target_kl must not be negative, got {self.target_kl}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0 (sampling; the objective needs exploration), "
                            f"got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            problems.append("--top_p must be in (0, 1] and --top_k >= 0")
        if not 0 <= self.thinking_ratio <= 1:
            problems.append(f"--thinking_ratio must be in [0, 1], got {self.thinking_ratio}")
        if self.tis_cap < 0:
            problems.append(f"--tis_cap must not be negative, got {self.tis_cap}")
        if not 0 <= self.ptx_coef < float("inf") or self.ptx_rows < 0:
            problems.append(f"--ptx_coef must be a finite number >= 0 and --ptx_rows >= 0, got {self.ptx_coef} "
                            f"and {self.ptx_rows}")
        elif self.ptx_loss not in PTX_LOSSES:
            problems.append(f"--ptx_loss must be one of {', '.join(PTX_LOSSES)}, got {self.ptx_loss!r}")
        elif self.ptx_coef > 0 and not Path(self.ptx_data).is_file():
            problems.append(f"--ptx_coef {self.ptx_coef} needs --ptx_data, an SFT JSONL file "
                            f"(got {self.ptx_data!r})")
        try:
            parse_reward_spec(self.reward, allow_empty=bool(self.reward_model_path))
        except (ValueError, KeyError) as e:
            problems.append(str(e).strip('"'))
        if self.reward_model_path and not Path(self.reward_model_path).is_dir():
            problems.append(f"--reward_model_path {self.reward_model_path}: no such folder")
        from minimind.rl.remote import rollout_option_problems, rollout_option_warnings
        problems += rollout_option_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        for message in rollout_option_warnings(self):
            warnings.warn(message, RuntimeWarning, stacklevel=2)


def parse_reward_spec(spec: str, allow_empty: bool = False) -> list[tuple[str, float]]:
    """``"task:1,format:0.1"`` -> ``[("task", 1.0), ("format", 0.1)]`` (a bare name weighs 1)."""
    from minimind.rl.rewards import REWARD_FUNCTIONS

    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in REWARD_FUNCTIONS:
            raise ValueError(f"--reward: unknown reward {name!r}; registered: "
                             f"{', '.join(sorted(REWARD_FUNCTIONS))}")
        try:
            out.append((name, float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise ValueError(f"--reward: weight of {name!r} is not a number: {weight!r}") from None
    if not out and not allow_empty:
        raise ValueError("--reward names no reward (e.g. --reward task:1,format:0.1)")
    return out


@dataclass
class GRPOOptions(RLOptions):
    """GRPO family (grpo, dr_grpo, dapo, bnpo, gspo, cispo): group samples, one objective each."""

    guidance: int = _opt(0, "1: a group none of whose samples earns what the row's 'reference' reply earns "
                            "trains on that reply in place of its last sample (off-policy guidance, LUFFY; "
                            "0 = off)")

    def validate(self) -> None:
        super().validate()
        if self.guidance not in (0, 1):
            raise ValueError(f"--guidance must be 0 or 1, got {self.guidance}")
        if self.guidance and self.loss_type in LOSS_TYPES \
                and LOSS_TYPES[self.loss_type].advantage not in GROUP_ADVANTAGES:
            raise ValueError(f"--guidance needs group advantages; --loss_type {self.loss_type} has none")
        if self.guidance and self.tis_cap > 0:
            raise ValueError("--guidance and --tis_cap exclude each other: no sampler gave the reference "
                             "reply log-probs for TIS to compare with")


@dataclass
class SPOOptions(RLOptions):
    """Single-stream policy optimisation: one sample per prompt against a persistent baseline."""

    loss_type: str = _opt("spo", "objective (spo: clipped surrogate against the per-prompt baseline)")
    num_generations: int = _opt(1, "samples per prompt (SPO needs no group)")
    spo_rho_min: float = _opt(0.875, "lower bound of the baseline's KL-adaptive forgetting factor rho")
    spo_rho_max: float = _opt(0.96, "upper bound of rho (rho_min = rho_max: a fixed discount)")
    spo_kl_half: float = _opt(0.06, "policy KL since a prompt's last visit that halves its old evidence")
    spo_prior: float = _opt(0.5, "baseline of an unseen prompt (success-rate prior)")
    spo_prioritized: int = _opt(1, "draw each step's prompts by baseline uncertainty sqrt(v(1-v)) "
                                   "(0 = in the epoch's order)")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.spo_rho_min <= self.spo_rho_max <= 1 or self.spo_kl_half <= 0 \
                or not 0 <= self.spo_prior <= 1:
            raise ValueError("need 0 < --spo_rho_min <= --spo_rho_max <= 1, --spo_kl_half > 0 and "
                             "--spo_prior in [0, 1]")


@dataclass
class PPOOptions(RLOptions):
    """PPO: clipped surrogate, GAE advantages from a critic, KL folded into the reward."""

    loss_type: str = _opt("ppo", "objective (ppo: clipped surrogate + GAE)")
    num_generations: int = _opt(1, "samples per prompt")
    critic: str = _opt("separate", "separate: a critic model of its own (a copy of the policy's trunk with "
                                   "a value head); shared: a value head on the policy's trunk")
    vf_coef: float = _opt(0.5, "weight of the value loss")
    cliprange_value: float = _opt(0.2, "value clipping around the rollout's values (0 = off)")
    gamma: float = _opt(1.0, "GAE discount")
    lam: float = _opt(0.95, "GAE lambda")
    critic_lr_scale: float = _opt(1.0, "critic learning rate = this x --learning_rate")

    def validate(self) -> None:
        super().validate()
        if self.critic not in ("separate", "shared"):
            raise ValueError(f"--critic must be separate or shared, got {self.critic!r}")
        if self.vf_coef < 0 or self.cliprange_value < 0 or not 0 <= self.gamma <= 1 \
                or not 0 <= self.lam <= 1 or self.critic_lr_scale <= 0:
            raise ValueError("--vf_coef and --cliprange_value must be >= 0, --gamma and --lam in [0, 1], "
                             "--critic_lr_scale > 0")


@dataclass
class AgentOptions(RLOptions):
    """Multi-turn tool use: the environment runs the tool calls between assistant turns."""

    loss_type: str = _opt("cispo", f"objective: {', '.join(LOSS_TYPES)}")
    num_generations: int = _opt(4, "samples per prompt (a group)")
    max_gen_len: int = _opt(768, "new tokens per assistant turn")
    thinking_ratio: float = _opt(0.1, "share of episodes whose generation prompts open <think>")
    max_turns: int = _opt(3, "assistant turns per episode")
    max_total_len: int = _opt(2500, "positions an episode may use (prompt + turns + tool results)")

    def validate(self) -> None:
        super().validate()
        if self.max_turns < 1 or self.max_total_len < 2:
            raise ValueError("--max_turns must be >= 1 and --max_total_len >= 2")
