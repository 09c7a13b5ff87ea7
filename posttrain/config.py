"""Typed recipe schemas, and the typed configs the stages receive.

Every recipe is composed on top of `PosttrainConfig`, registered in Hydra's ConfigStore as `posttrain_schema`.
The schema is structured (OmegaConf struct mode), so a misspelt or unknown key, or a string choice outside its
Enum, fails while Hydra composes the config, before anything runs. Plug-in points (generation backends,
rewards, filters, eval suites) are plain `_target_` dictionaries: their keyword arguments belong to the user's
class, so they are checked by `recipes.validate` instead (allowlist, importable, arguments accepted).

The driver turns a round's sections into dataclass objects (`OmegaConf.to_object`) and hands each stage its own
`*Job` (a section plus what the round adds: round, seed, the model's dtype, launch settings). A stage never sees
an untyped dict of the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf


class Choice(str, Enum):
    """A string choice: compares equal to its value and is written to JSON as it."""

    def __str__(self) -> str:
        return self.value


class Dtype(Choice):
    auto = "auto"  # bfloat16 on a GPU that supports it, float32 otherwise (posttrain.models.torch_dtype)
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class OnEmpty(Choice):
    error = "error"
    quarantine = "quarantine"


class Source(Choice):
    teacher = "teacher"
    policy = "policy"


class Pairing(Choice):
    best_vs_worst = "best_vs_worst"
    best_vs_random_lower = "best_vs_random_lower"


class Init(Choice):
    base = "base"
    policy = "policy"


class Launcher(Choice):
    direct = "direct"
    torchrun = "torchrun"
    accelerate = "accelerate"


@dataclass
class ModelConfig:
    # A model spec: local folder, .gguf file, pkg://<package>/<file>, tiny://k=v,... or a hub id.
    path: str = MISSING
    # Weights and training precision of the stages that train or load this model: "auto" is bf16 on a GPU
    # that has it, fp32 on CPU.
    dtype: Dtype = Dtype.auto


@dataclass
class DataConfig:
    # The prompt pool: a source or a list of them (posttrain/sources.py): JSONL, JSON, parquet, a `datasets` folder,
    # pkg://<package>/<file> or a hub id, each a path or {path, columns, weight, split}. TRL's prompt formats
    # (`prompt`, or `messages` whose trailing answer is dropped); with several, a weight is the source's share of
    # every round's prompts.
    prompts: Any = MISSING
    # Prompts drawn for each round. Rounds walk one seeded permutation of the pool, so rounds see disjoint
    # prompts until the pool is used up.
    num_prompts: int = 64
    # What to do with a prompt whose text is empty: "error" stops before any stage runs, "quarantine" sets
    # the row aside, counts it in the manifest and writes it to the stage's quarantine.jsonl.
    on_empty: OnEmpty = OnEmpty.error
    # Split to read when a source is a DatasetDict on disk or a hub dataset, unless the source names its own.
    split: str = "train"
    # The longest prompt (chat template included, in the policy's tokens) any round may draw; a longer one stops the
    # run before the first stage, naming it. None: the policy's context length minus generate.max_new_tokens.
    max_prompt_tokens: Optional[int] = None


@dataclass
class GenerateConfig:
    # "teacher": sequence-level distillation from `teacher`; "policy": sample the current policy.
    source: Source = Source.teacher
    k: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    backend: Dict[str, Any] = field(
        default_factory=lambda: {"_target_": "data_gen.hf_backend.HFBackend"}
    )
    # Prompts per shard: one backend call and the unit of resume. None: the backend class's default_shard_size
    # (2048 for vLLM, 256 for OpenAI-compatible endpoints), else the backend's batch_size, else 8. For an endpoint,
    # several times its max_concurrency, so requests in flight do not drain at every shard's end.
    shard_size: Optional[int] = None
    # > 0: keep the teacher's top-k next-token log-probs at every generated token (data_gen/logprobs.py), for
    # token-level distillation (sft.kd). Needs a teacher that shares the student's vocabulary.
    teacher_logprobs: int = 0


@dataclass
class RewardConfig:
    # name -> a Reward's `_target_` config (reward/protocol.py). Empty: no score/select stages.
    rewards: Dict[str, Any] = field(default_factory=dict)
    # The reward that ranks responses for selection; defaults to the only (or first) one. To combine several,
    # make the primary a reward.ensemble.WeightedEnsemble.
    primary: Optional[str] = None
    batch_size: int = 64


@dataclass
class FilterConfig:
    # name -> a filter's `_target_` config (reward/filters.py), applied in order between score and select.
    # Empty: no filter stage.
    filters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectConfig:
    # Best-of-K answers scoring below this are not used for SFT.
    min_score: Optional[float] = None
    # "best_vs_worst" (RLHFlow, open-instruct) or "best_vs_random_lower".
    pairs: Pairing = Pairing.best_vs_worst
    # Pairs with a margin at or below this are dropped (ties always are).
    min_margin: float = 0.0
    # Pairs whose two responses are more similar than this (difflib ratio on normalised text) are dropped.
    max_similarity: float = 0.95


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainingConfig:
    """What every training stage (SFT, DPO, RM) takes; each stage adds its own keys."""

    learning_rate: float = 1e-5
    epochs: float = 1.0
    batch_size: int = 8  # per process; the global batch is batch_size x grad_accum x processes
    grad_accum: int = 1
    max_length: int = 1024
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    logging_steps: int = 10
    save_steps: int = 200
    max_steps: int = -1  # > 0 stops after this many optimizer steps (smoke runs, rehearsals), epochs or not
    warmup_steps: int = 0  # > 0: warm up over this many optimizer steps instead of warmup_ratio
    # The optimizer, by its transformers name (adamw_torch, adamw_torch_fused, adafactor, adamw_8bit, ...); None:
    # transformers' default.
    optim: Optional[str] = None
    max_grad_norm: Optional[float] = None  # gradient clipping norm; None: transformers' default (1.0); 0: none
    # Activation (gradient) checkpointing: None turns it on with a GPU (long sequences) and off on a CPU.
    gradient_checkpointing: Optional[bool] = None
    # The attention kernel the model loads with (eager, sdpa, flash_attention_2, ...); None: transformers' choice.
    attn_implementation: Optional[str] = None
    # This stage's training precision; None: model.dtype.
    dtype: Optional[Dtype] = None
    # Share of prompts held out to measure the stage's loss or accuracy before and after training.
    eval_fraction: float = 0.1
    keep_checkpoints: bool = False
    report_to: List[str] = field(default_factory=lambda: ["none"])
    # Several seeds: one model each, averaged into the stage's model (Llama 3 averages at every stage).
    seeds: List[int] = field(default_factory=list)


@dataclass
class KDConfig:
    # Token-level distillation (posttrain/train/kd.py): the loss is (1 - weight) x cross-entropy + weight x
    # KL(teacher's top-k || student) on the response tokens that have the teacher's log-probs
    # (generate.teacher_logprobs). 0: sequence-level distillation only (cross-entropy on the teacher's text).
    weight: float = 0.0
    # Both distributions are softened by this temperature before the KL.
    temperature: float = 1.0


@dataclass
class SFTConfig(TrainingConfig):
    enabled: bool = True
    # "base": every round fine-tunes `model.path` (the Llama 3 recipe); "policy": continue from the last policy.
    init: Init = Init.base
    # Train on the SFT data of every round so far (Llama 3), or only on this round's.
    accumulate: bool = True
    # Your SFT sets, trained on in every round beside the generated data: sources as for data.prompts, in TRL's
    # language-modeling (`messages`) or prompt-completion formats; a weight scales a source's rows (0.5: a seeded
    # half, 2: every row twice).
    data: List[Any] = field(default_factory=list)
    learning_rate: float = 1e-5  # Llama 3, section 4.1.3
    # Pack several short examples into each max_length sequence (TRL's best-fit decreasing packing).
    packing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    kd: KDConfig = field(default_factory=KDConfig)


@dataclass
class EvalConfig:
    # Held-out prompts (never trained on: overlap with any round's prompts is an error). None: no eval stage.
    heldout: Optional[str] = None
    split: str = "train"
    # Greedy by default, so a round-to-round difference comes from the policy, not from sampling noise.
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 64  # reward scoring batch
    # Answer only the first N held-out prompts (a quicker eval); None: all of them.
    num_prompts: Optional[int] = None
    # Trackers each round's eval metrics go to (evals/tracking.py: tensorboard, wandb); None: sft.report_to.
    report_to: Optional[List[str]] = None
    backend: Dict[str, Any] = field(
        default_factory=lambda: {"_target_": "data_gen.hf_backend.HFBackend"}
    )
    # name -> Reward `_target_` config; empty: the recipe's reward.rewards.
    rewards: Dict[str, Any] = field(default_factory=dict)
    # Round 0 also answers the held-out prompts with the teacher once, for win rates against it.
    teacher: bool = True
    # The backend that answers as the teacher. None: generate.backend when generate.source is teacher and it differs
    # from `backend` in more than batch_size (the teacher's endpoint, a tensor-parallel engine), else `backend`.
    teacher_backend: Optional[Dict[str, Any]] = None
    suites: Dict[str, Any] = field(
        default_factory=lambda: {
            "reward": {"_target_": "evals.suites.RewardSuite"},
            "win_rate": {"_target_": "evals.suites.WinRate"},
            "drift": {"_target_": "evals.suites.Drift"},
        }
    )


@dataclass
class RMConfig(TrainingConfig):
    """Reward-model training (posttrain/train/rm.py). `seed` and `launch` come from the root."""

    # Train an RM at the start of each round on all preference pairs selected so far (plus `data`), and add it
    # to that round's rewards as `rm` (Llama 3: the RM uses all preference data; DPO only the latest).
    enabled: bool = False
    # Backbone spec (a causal LM or an encoder; gets a fresh 1-output head). None: the policy's base model.
    model: Optional[str] = None
    # Your preference sets, used in every round, e.g. human-labelled data: sources as for dpo.data, or ranked rows
    # (`prompt`/`messages` + `responses`, best first).
    data: List[Any] = field(default_factory=list)
    # The paper gives no RM learning rate; 1e-5 is its SFT and DPO rate. Tiny test models want ~1e-3.
    # batch_size counts pairs (each pair is two sequences).
    lr_scheduler: str = "linear"
    # A pair is dropped when its responses differ by less than this: difflib similarity ratio of the
    # lower-cased, whitespace-collapsed texts > 1 - min_difference (default: ratio > 0.95).
    min_difference: float = 0.05
    # Arguments of the reward.rm_scorer.RewardModelScorer that scores with the trained RM in the score and eval
    # stages (batch_size, max_length, dtype, device_map; e.g. {dtype: bfloat16, device_map: auto} for a 70B RM
    # spread over the GPUs of its score process).
    scorer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DPOConfig(TrainingConfig):
    """DPO the Llama 3 way (posttrain/train/dpo.py): on this round's SFT model and this round's pairs."""

    enabled: bool = True
    # Your preference sets, trained on in every round beside its pairs: sources as for data.prompts, in TRL's
    # preference formats (explicit `prompt` + `chosen` + `rejected`, or implicit: whole conversations or texts in
    # `chosen`/`rejected`); a weight scales a source's rows.
    data: List[Any] = field(default_factory=list)
    learning_rate: float = 1e-5  # Llama 3, section 4.1.4
    beta: float = 0.1  # Llama 3
    # TRL's preference loss, by name: "sigmoid" (DPO, Llama 3), "ipo", "robust", "hinge", "apo_zero", ...; the NLL
    # term below is added to any of them.
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # the flip probability of loss_type robust (cDPO), in [0, 0.5)
    nll_weight: float = 0.2  # NLL on the chosen response, Llama 3 (RPO-style regulariser)
    # Header and termination tokens out of the DPO log-ratios of chosen and rejected (Llama 3); kept in the NLL term.
    mask_format_tokens: bool = True
    warmup_ratio: float = 0.1
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataLaunch:
    # How the data stages run (posttrain/shards.py): `nproc` maps a stage (generate, score, eval) to its processes
    # per node, each taking every world-th shard under torchrun; missing or 1 (and one node): the driver's own
    # process. E.g. {generate: 1, score: 8, eval: 8} for one vLLM engine spanning a node's GPUs and one reward
    # model replica per GPU. Outputs are the same for any number of processes.
    nproc: Dict[str, int] = field(default_factory=dict)
    # Rows of generations per score shard (rounded up to a multiple of reward.batch_size): the unit of resume.
    score_shard_rows: int = 4096
    # Held-out prompts per eval shard (rounded up to a multiple of the eval backend's batch_size).
    eval_shard_prompts: int = 256


@dataclass
class LaunchConfig:
    # How a training stage process is started (posttrain/train/launch.py). "direct": one process,
    # `python -m posttrain.train.<stage> CONFIG`; "torchrun" or "accelerate" (`accelerate launch`): `nproc`
    # processes on each of `nnodes` machines. Stage batch sizes are per process: the global batch is
    # batch_size x grad_accum x nproc x nnodes.
    launcher: Launcher = Launcher.direct
    nproc: int = 1
    # DeepSpeed config: a file name in recipes/deepspeed/ ("zero3", "zero3_offload") or a path to a JSON file.
    # None: no DeepSpeed (plain DDP when there are several processes).
    deepspeed: Optional[str] = None
    # Several machines: torchrun / accelerate run on every node with its own node_rank, or, given a DeepSpeed
    # hostfile, `accelerate launch` on the first node starts all of them (DeepSpeed's pdsh launcher).
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None  # None: any free port on one machine, 29500 across machines
    hostfile: Optional[str] = None
    # launcher=direct on a machine without GPUs: start each training process from a fork server that imported
    # torch, transformers, peft, datasets and TRL once per run (posttrain/train/forkserver.py), instead of a new
    # interpreter that imports them again (~7 s a stage on a small CPU). false: a plain `python -m` subprocess.
    preload: bool = True
    # The data stages' processes and shard sizes (the nodes and master address above are theirs too).
    data: DataLaunch = field(default_factory=DataLaunch)


@dataclass
class PosttrainConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    # Bring the run up to this round.
    round: int = 1
    # Print the stages, commands and resolved stage configs this invocation would run; run and load nothing.
    dry_run: bool = False
    seed: int = 0
    # Finished stages to run again ("generate", "round_2/sft", "all"); the old folders are kept under
    # round_N/superseded/.
    redo: List[str] = field(default_factory=list)
    # Module prefixes allowed in `_target_` besides posttrain's own packages.
    allowed_targets: List[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[ModelConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evals: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # A backend class name -> the config that replaces every backend naming it (generate, evals, judges), e.g.
    # vLLM -> hf in rehearsals on machines without CUDA (recipes/rehearsal/cpu.yaml). Stage configs record the
    # backend that actually runs.
    backend_swaps: Dict[str, Any] = field(default_factory=dict)
    # Per-round overrides: rounds[i] is merged over the recipe for round i+1, e.g. `- {generate: {k: 8}}`.
    # Rounds past the end of the list use the recipe as it is.
    rounds: List[Any] = field(default_factory=list)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="posttrain_schema", node=PosttrainConfig)


def round_config(cfg: DictConfig, round_idx: int, notes: list[str] | None = None) -> DictConfig:
    """The recipe as it applies to round `round_idx` (1-based): `rounds[round_idx-1]` merged over the base.

    The merge goes through the typed schema as plain data, so a misspelt key fails here with its name, in
    `rounds` and also in the recipe itself (Hydra lets `+key=value` add keys a schema does not have).
    Round 0 is the recipe with no override. Backend swaps are applied, and backend settings that belong to another
    backend class left out (posttrain.swaps; `notes` collects what was).
    """
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, _TYPED_KEYS), resolve=False)
    base = OmegaConf.merge(OmegaConf.structured(PosttrainConfig), plain)
    if 1 <= round_idx <= len(cfg.rounds):
        override = cfg.rounds[round_idx - 1]
        if override is not None:
            base = OmegaConf.merge(base, override)
    from posttrain.swaps import with_backend_swaps, with_own_settings

    return with_own_settings(with_backend_swaps(base), notes)


_TYPED_KEYS = [k for k in PosttrainConfig.__dataclass_fields__ if k != "rounds"]


# ---- what each stage receives ----------------------------------------------------------------------------------


@dataclass
class GenerateJob:
    """The generate stage: this round's sampling settings, the prompt pool's settings, and where this round starts
    reading the seeded prompt stream (the prompts drawn by earlier rounds)."""

    generate: GenerateConfig
    data: DataConfig
    round: int
    seed: int
    prompt_start: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # how it runs: out of the stage's hash


@dataclass
class ScoreJob(RewardConfig):
    """The score stage: the `reward` section plus how its processes run (`launch`, out of the stage's hash)."""

    launch: LaunchConfig = field(default_factory=LaunchConfig)


@dataclass
class SelectJob:
    select: SelectConfig
    seed: int = 0


@dataclass
class EvalJob:
    """The eval stage: the `evals` section with `rewards` filled in (the recipe's when the section names none),
    plus prompt sources the held-out set must not overlap (checked again inside the stage)."""

    evals: EvalConfig
    round: int
    seed: int = 0
    training_prompts: List[Any] = field(default_factory=list)  # data.prompts' sources (paths or mappings)
    # The reward that judges win rates when a suite names none: the recipe's reward.primary (or its first reward).
    primary: Optional[str] = None
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # how it runs: out of the stage's hash


@dataclass
class TrainJob:
    """A training stage (sft, dpo, rm): its section, the dtype of the model it trains, the seed and how to start
    its processes. `launch` says how a stage runs, not what it computes: it is left out of the stage's hash."""

    train: Any  # SFTConfig | DPOConfig | RMConfig
    dtype: Dtype = Dtype.auto
    seed: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # With LoRA, save the adapter alone rather than merging it into a full copy of the model: the loop sets it for
    # an SFT whose only consumer is the DPO stage right after it, which merges it in memory as it loads (no full
    # write and read back between the two; posttrain.models.load_causal_lm).
    adapter_only: bool = False


def section(rc: DictConfig, key: str):
    """The round config's section `key` as its dataclass object (Enums as Enum members), nested sections too."""
    return OmegaConf.to_object(rc[key])
