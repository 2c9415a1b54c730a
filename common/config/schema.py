"""The experiment config's schema: one pydantic model per section (task, data, sites, model,
train, strategy, eval, wandb, runtime, privacy) and the rules across sections.

Every key a user can write is a field here, documented in configs/default.yaml; unknown keys
are refused (extra="forbid"). Loading, overrides and error lines are in common/config/__init__.py.
"""
from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chestfed.common.errors import ConfigError
from chestfed.common.labels import Task, finding_index

# robust aggregation (server/strategies/fedmedian.py, fedtrimmedavg.py, krum.py)
ROBUST = ("fedmedian", "fedtrimmedavg", "krum")
# personalised FL: a model per site (server/strategies/finetune.py, ditto.py, fedper.py, fedrep.py, fenda.py, ...)
PERSONALISED = ("finetune", "ditto", "fedper", "fedrep", "mrmtl", "apfl", "fenda")
STRATEGIES = ("local", "pooled", "sequential", "fedavg", "fedprox", "fedadam", "fedyogi",
              "fedbn", "loso") + ROBUST + PERSONALISED
FEDERATED = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "loso") + ROBUST + PERSONALISED


def _file_safe(v: str, what: str) -> str:
    """Names that become folder and file names (runs/<experiment>/, splits/<site>.csv)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
        raise ValueError(f"{what} '{v}' must be letters, digits, '_', '.', '-'")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: Any) -> Any:
        """`rounds: yes` or `batch_size=true` is a mistake, not 1: YAML reads yes/no/true/false
        as booleans and pydantic would turn them into 1 and 0."""
        if isinstance(v, bool) and info.field_name in cls.model_fields:
            if takes_numbers(cls.model_fields[info.field_name].annotation):
                raise ValueError("must be a number, not a yes/no (true/false) value")
        return v


def takes_numbers(ann: Any) -> bool:
    """Does a field take numbers (int, float, Literal[1, 3]) and not booleans?"""
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    kinds = set(args) if args else {ann}
    return bool(kinds & {int, float}) and bool not in kinds


class TaskConfig(_Strict):
    type: Literal["binary", "multilabel"] = "binary"
    labels: list[str] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            finding_index(name)
        return v

    @model_validator(mode="after")
    def _needs_labels(self) -> "TaskConfig":
        if self.type == "multilabel" and not self.labels:
            raise ValueError("a multilabel task needs task.labels (findings from the label space)")
        return self

    def task(self) -> Task:
        return Task(self.type, tuple(self.labels))


class SplitConfig(_Strict):
    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    use_official: bool = True
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    seed: int | None = None  # None: the experiment seed

    @model_validator(mode="after")
    def _sums(self) -> "SplitConfig":
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1, got "
                             f"{self.train + self.val + self.test:g}")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"split.fold must be < split.folds ({self.folds})")
        return self


class DataConfig(_Strict):
    image_size: int = Field(64, ge=16, le=1024)
    resize: Literal["squash", "center_crop", "pad"] = "center_crop"
    cache_dir: str = "~/.cache/chestfed"
    workers: int = Field(2, ge=1)
    on_bad_image: Literal["skip", "error"] = "skip"
    split: SplitConfig = Field(default_factory=SplitConfig)


class SiteConfig(_Strict):
    name: str
    kind: str
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return _file_safe(v, "site name")


class ModelConfig(_Strict):
    # resnet38 / resnet50_large / resnet101: Baltruschat et al.'s variants (common/models.py)
    arch: Literal["smallcnn", "resnet18", "resnet50", "densenet121", "resnet38", "resnet50_large",
                  "resnet101"] = "smallcnn"
    in_channels: Literal[1, 3] = 1
    width: int = Field(16, ge=4)  # smallcnn: filters in the first block, doubled per block
    dropout: float = Field(0.25, ge=0, lt=1)
    weights: str | None = None  # a local file; nothing is ever downloaded
    # 'backbone': train only the classifier (Baltruschat et al.'s off-the-shelf);
    # 'none': train everything
    freeze: Literal["none", "backbone"] = "none"
    # Patient metadata fused with the image features before the classifier (common/meta.py)
    meta: list[Literal["age", "sex", "view"]] = Field(default_factory=list)
    # the metadata's dense layer (Neuhaus: 32); 0 = raw (Baltruschat et al.)
    meta_hidden: int = Field(32, ge=0)
    # 'error': a site whose table lacks a requested field stops the run before it starts;
    # 'allow': that field is encoded as missing (its indicator set) on every image there
    meta_missing: Literal["error", "allow"] = "error"

    @field_validator("meta")
    @classmethod
    def _meta_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("names a field twice")
        return v
    # 'group': every BatchNorm replaced by GroupNorm through Opacus' ModuleValidator.fix
    # (common/models.py). Set by privacy.dp (DP-SGD cannot clip per image through BatchNorm,
    # which mixes the images of a batch, and noised running statistics break the layer).
    norm: Literal["batch", "group"] = "batch"
    # 'fenda': a local and a global feature extractor concatenated before the classifier
    # (FENDA-FL, common/models.py Fenda). Set by strategy fenda, and only by it.
    structure: Literal["single", "fenda"] = "single"


class TrainConfig(_Strict):
    # The training budget's defaults are the ones the demo (configs/default.yaml) was tuned with,
    # so a config of one's own learns as the demo does: on the phantom hospitals 12 passes over
    # each site (6 rounds x 2 epochs) instead of 3, larger steps that decay (cosine) so the last
    # rounds settle, and each site's loss balanced by its own class prevalence, so a site where
    # ~80 % of images are abnormal does not pull every score towards 1. launch/tune.py searches
    # around them (README "Tuning").
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    # 'cosine': round r of R trains at lr * (1 + cos(pi (r-1) / R)) / 2 (R: the strategy's
    # rounds, or a sequential run's stages), so short runs end on small steps instead of
    # stopping mid-stride; 'constant': lr every round.
    # 'plateau' (Bajwa et al., Baltruschat et al.): torch's ReduceLROnPlateau on the validation loss
    # (mean over the model's evaluated sites), stepped once per evaluation (a round, or a sequential
    # stage); the coordinator sends each round's lr (common/schedules.py). Needs eval.every: 1.
    lr_schedule: Literal["constant", "cosine", "plateau"] = "cosine"
    plateau_factor: float = Field(0.1, gt=0, lt=1)  # plateau: lr *= factor when it triggers
    plateau_patience: int = Field(2, ge=0)  # plateau: evaluations without improvement first
    weight_decay: float = Field(0.0, ge=0)
    # The positive term of each label's BCE (common/weights.py): 'inverse_prevalence' =
    # negatives/positives clipped to [0.1, 100]; 'reciprocal_prevalence' = Neuhaus's exact
    # 1/prevalence (labelled images / positives), unclipped.
    pos_weight: Literal["none", "inverse_prevalence", "reciprocal_prevalence"] = "inverse_prevalence"
    # Each label's share of the loss: 'cohen2020' = Cohen et al.'s w_t = alpha_t / max(alpha),
    # alpha_t = max_i(c_i) - c_t + mean(c), c_t = positives of label t in the site's train split.
    task_weights: Literal["none", "cohen2020"] = "none"
    augment: bool = False
    max_batches: int | None = Field(None, ge=1)  # cap per local epoch (smoke tests)
    # Forward pass precision (common/training.py): 'auto' = bf16 autocast on a CUDA GPU that
    # supports it, else fp32; 'bf16' autocast (CPU too); 'fp16' autocast with a GradScaler
    # (CUDA only); 'fp32' never casts. Weights and optimiser state stay fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class SequentialConfig(_Strict):
    order: list[str] = Field(default_factory=list)  # empty: the sites in config order
    # None: derived from the shared budget (cycles = strategy.rounds, epochs_per_site =
    # train.local_epochs), so each site's data is seen as often as under fedavg or local.
    epochs_per_site: int | None = Field(None, ge=1)
    cycles: int | None = Field(None, ge=1)
    init: str | None = None  # start from an earlier run's checkpoint (folder or .pt file)


class StrategyConfig(_Strict):
    name: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    rounds: int = Field(6, ge=1)  # see TrainConfig: the demo's budget
    min_sites: int = Field(2, ge=1)  # federated: per round; local / sequential: sites that must succeed
    # client sampling: the share of the sites that train each round (Flower's fraction_train, at
    # least min_sites), and that are validated each round (fraction_evaluate)
    fraction: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, gt=0, le=1)
    proximal_mu: float = Field(0.01, ge=0)
    # fedadam / fedyogi server step (eta). Flower's default 0.1 is sized for SGD clients; after
    # local Adam the deltas are ~1e-3 and a 0.1 sign-like server step collapsed every phantom
    # run to constant predictions (bench/shift_study.py, AUROC 0.500); 0.01 trains like fedavg.
    server_lr: float = Field(0.01, gt=0)
    balance: Literal["none", "site", "site_and_class"] = "none"  # pooled
    sequential: SequentialConfig = Field(default_factory=SequentialConfig)
    loso_base: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "pooled",
                       "fedmedian", "fedtrimmedavg", "krum"] = "fedavg"
    round_timeout: float = Field(3600, gt=0)
    # fedtrimmedavg: the fraction of the sites' values cut from each end, per coordinate
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    # krum: f, the number of sites assumed Byzantine (needs more than 2f + 2 sites per round)
    krum_byzantine: int = Field(0, ge=0)
    # finetune: epochs each site trains the final FedAvg model on its own data (0: none)
    finetune_epochs: int = Field(1, ge=0)
    # ditto: lambda, the personal model's pull towards the global one (Li et al. 2021; 0: local)
    ditto_lambda: float = Field(0.1, ge=0)
    # mrmtl: lambda, each site's model's pull towards the mean of the sites' models (0: local)
    mrmtl_lambda: float = Field(0.1, ge=0)
    # apfl: the weight of each site's own model in its mixture with the global one (Deng et al.
    # 2020: alpha v + (1 - alpha) w), learned at each site unless apfl_learn_alpha is false
    apfl_alpha: float = Field(0.5, ge=0, le=1)
    apfl_learn_alpha: bool = True
    # fedrep: epochs on the head (body frozen) before train.local_epochs on the body
    fedrep_head_epochs: int = Field(1, ge=1)


class EvalConfig(_Strict):
    every: int = Field(1, ge=0)  # per-round validation every N rounds; 0 = only at the end
    # Final evaluation (server/evaluation/evaluator.py, sites/scoring.py): computed at each site.
    bootstrap: int = Field(200, ge=0)  # patient-bootstrap resamples per AUROC CI; 0 = no CIs
    bootstrap_seed: int | None = None  # None: the experiment seed
    ci: float = Field(0.95, gt=0, lt=1)  # confidence level of the bootstrap intervals
    # Ignored (kept so older configs load): ROC curves now leave a site only as TPR on the fixed
    # 51-point FPR grid (common/privacy/disclosure.py), whatever this says.
    roc_points: int = Field(200, ge=2, le=200)
    pairs: Literal["all", "none"] = "all"  # paired statistics (DeLong, kappa, ...) between models
    # BatchNorm statistics of the scored and saved models: 'precise' re-estimates them with the
    # final weights on the model's own training sites' train splits (common/batchnorm.py);
    # 'running' keeps the training-time running averages (lagging the weights in short runs).
    batchnorm: Literal["precise", "running"] = "precise"
    # BatchNorm statistics of the per-round validation scores (metrics.jsonl, convergence
    # curves): 'running' = the round's running averages (for FedAvg the averaged ones, which
    # lag and mix weights, so curves keep "improving" as the learning rate decays); 'site' =
    # re-estimated with the round's weights on the scoring site's own train split (one forward
    # pass over it per round), so the curve follows the weights. The final scoring is unchanged.
    round_batchnorm: Literal["running", "site"] = "running"
    # How the per-round validation reaches the coordinator under a Flower strategy:
    # 'with_training' = the model after round r is scored on each site's val split at the start
    # of round r+1's training message and its numbers ride back in that training reply (one
    # exchange per round instead of two; the last round validates on its own). The numbers are
    # the same as 'separate''s; a site that fails round r+1 has no validation row for round r.
    # Where that would change what a round does, a separate exchange is used whatever this says:
    # train.lr_schedule plateau (round r+1's rate needs round r's validation first), client
    # sampling (strategy.fraction or fraction_evaluate below 1) and privacy.secagg.
    round_validation: Literal["with_training", "separate"] = "with_training"
    # The deployable operating point at a test site (server/evaluation/evaluator.py operating_points):
    # 'own_site' = a site that trained the model uses its own validation split's Youden point,
    # other sites the training sites' pooled one; 'pooled' = the pooled one everywhere.
    deployable_threshold: Literal["own_site", "pooled"] = "own_site"
    # Caveats (common/caveats.py): a split with fewer labelled positives or negatives than this,
    # per task label, is warned about at the start of a run and in `describe.py`, and a test
    # cell on it is flagged `small_n` in results.json, the terminal table and the report.
    min_per_class: int = Field(10, ge=0)
    report: bool = True  # write report.md and report.html into the run folder
    # The split the final matrix is scored on. 'val' is a tuning trial's (launch/tune.py): the
    # run ends on its validation matrix and the coordinator refuses to send any message that
    # asks a site for its test split, so choosing settings never reads the test data.
    final_split: Literal["test", "val"] = "test"
    # Which weights of each trained model go into the matrix: 'final' (after the last round)
    # and/or 'best_val' (the round with the lowest mean validation loss, named '<model>@best_val').
    checkpoints: list[Literal["final", "best_val"]] = Field(default_factory=lambda: ["final"])

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must name 'final' and/or 'best_val', each once")
        return v


class WandbConfig(_Strict):
    enabled: bool = True
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "chestfed"
    group: str | None = None
    job_type: str | None = None  # None: the strategy's name; launch/tune.py: 'trial' / 'final'
    entity: str | None = None


class RuntimeConfig(_Strict):
    # 'auto': the GPU the site's Ray worker was given (server/simulation/engine.py), else the CPU.
    device: str = "auto"
    # CPUs per site worker (Ray's share; a worker trains with that many torch threads). 'auto':
    # 1 with GPUs in the cluster; without, one worker per site while the cores last, the cores
    # shared out among them (server/simulation/resources.py `cpus_per_site`).
    cpus_per_site: Literal["auto"] | float = "auto"
    # Ray GPUs per site worker. 'auto': with GPUs in the Ray cluster, the largest fraction (at
    # most 1) that lets every site train at once; without GPUs, 0. A worker sees only the
    # GPU(s) Ray assigned to it (CUDA_VISIBLE_DEVICES); a 0-GPU worker sees none.
    gpus_per_site: Literal["auto"] | float = "auto"
    # None: the worker's CPU share rounded (a deployed site, outside Ray: 1 unless cpus_per_site
    # is a number)
    threads_per_site: int | None = Field(None, ge=1)
    # An existing Ray cluster to run the sites on (`ray start --head` prints it, e.g.
    # '10.0.0.5:6379', or 'auto' for the one on this machine). None: the RAY_ADDRESS
    # environment variable if set, else a new Ray on this machine only.
    ray_address: str | None = None
    # Simulation: how long every site's Ray worker may take to start and load its data before the
    # run fails. Minutes are normal on a busy machine or a cluster starting workers (each imports
    # torch); a deployment takes launch/server.py --join-timeout instead.
    join_timeout: float = Field(300.0, gt=0)

    @field_validator("cpus_per_site", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        if isinstance(v, bool) or (v != "auto" and (not isinstance(v, (int, float)) or v <= 0)):
            raise ValueError("must be 'auto' or a number > 0")
        return v

    @field_validator("gpus_per_site", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number, not a yes/no (true/false) value")
        if v != "auto" and (not isinstance(v, (int, float)) or v < 0):
            raise ValueError("must be 'auto' or a number >= 0")
        if v != "auto" and v > 1 and v != int(v):
            raise ValueError("a share above 1 GPU must be a whole number of GPUs (Ray's rule)")
        return v


class PrivacyConfig(_Strict):
    # Disclosure control at the sites (common/privacy/disclosure.py): a confusion count from 1 to
    # min_cell - 1 leaves a site as NaN ("<min_cell"), and the validation grid counts are
    # coarsened to steps of at least min_cell images. None: 5 at a deployed site, 0 in simulation.
    min_cell: int | None = Field(None, ge=0)
    # Differential privacy (common/privacy/, README "Privacy"): none, DP-SGD at each site
    # (record level), or Flower's DP wrappers at the coordinator (site level).
    dp: "DPConfig" = Field(default_factory=lambda: DPConfig())
    # SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod): the coordinator only ever sees
    # the sum of the sites' masked updates (fedavg, fedprox).
    secagg: bool = False


class DPConfig(_Strict):
    level: Literal["none", "record", "site"] = "none"
    noise_multiplier: float = Field(1.0, ge=0)
    # record level: per-image gradient clipping norm of DP-SGD (Opacus)
    max_grad_norm: float = Field(1.0, gt=0)
    # None: record level 1/N for a site's N training images; site level 1/S for S sites
    delta: float | None = Field(None, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus' accountant for the epsilon
    # site level (Flower's DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping)
    mode: Literal["server", "client"] = "server"  # who clips the site updates
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clipping_norm: float = Field(1.0, gt=0)  # fixed: the norm; adaptive: the initial norm


PrivacyConfig.model_rebuild()


# What a comparison must hold equal; every launcher prints it and results.json keeps it.
BUDGET_KEYS = (("strategy", "rounds"), ("train", "local_epochs"), ("train", "lr"),
               ("train", "lr_schedule"), ("train", "pos_weight"), ("train", "task_weights"))


def _default_space() -> dict[str, dict[str, Any]]:
    # Around the schema's own budget (TrainConfig), wide enough to flip a ranking: FLamby tunes a
    # learning-rate grid per strategy; mu and the FedOpt server rate span the values their papers
    # report. A key a strategy does not use is left out of that strategy's search.
    return {"train.lr": {"log_uniform": [3e-4, 1e-2]},
            "train.local_epochs": {"choice": [1, 2]},
            "strategy.proximal_mu": {"log_uniform": [1e-3, 1.0]},
            "strategy.server_lr": {"log_uniform": [1e-3, 1e-1]},
            "strategy.ditto_lambda": {"log_uniform": [1e-2, 2.0]}}


class TuneConfig(_Strict):
    """launch/tune.py: what each strategy's search covers and how a trial is scored (README
    "Tuning"). A trial trains on train, is scored on validation only (eval.final_split: val)."""
    # dotted config key -> one of {log_uniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]},
    # {choice: [a, b, ...]}
    space: dict[str, dict[str, Any]] = Field(default_factory=_default_space)
    # val_auroc: mean validation AUROC over every (model, site) of the strategy (maximised);
    # val_loss: mean validation loss of the last round (minimised)
    objective: Literal["val_auroc", "val_loss"] = "val_auroc"
    # stops a trial whose per-round validation curve trails (Optuna's pruners); none: never
    pruner: Literal["median", "successive_halving", "none"] = "median"
    storage: str | None = None  # any database URL Optuna takes; None: sqlite in the study folder
    # trials side by side: None = 1 on one machine, as many as fit on a Ray cluster (runtime.ray_address)
    jobs: int | None = Field(None, ge=1)


class PopulationConfig(_Strict):
    """A phantom federation of any size from one option (`population.sites: 200`): it replaces
    `sites` with N phantom hospitals `site000`, `site001`, ..., cycling `presets`, each drawn
    with its own seed (`seed` + i), so no two are the same hospital."""
    sites: int = Field(ge=1, le=100_000)
    presets: list[str] = Field(default_factory=lambda: ["a", "b", "c"], min_length=1)
    size: int | None = Field(None, ge=20)  # images per site (None: each preset's own)
    seed: int = Field(1000, ge=0)

    def site_entries(self) -> list[dict[str, Any]]:
        width = max(3, len(str(self.sites - 1)))
        out = []
        for i in range(self.sites):
            opts: dict[str, Any] = {"preset": self.presets[i % len(self.presets)], "seed": self.seed + i}
            if self.size is not None:
                opts["population"] = {"size": self.size}
            out.append({"name": f"site{i:0{width}d}", "kind": "phantom", "options": opts})
        return out


class ExperimentConfig(_Strict):
    experiment: str = "default"
    seed: int = 0
    output_dir: str = "runs"
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sites: list[SiteConfig]
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    fallbacks: list[str] = Field(default_factory=list)  # sites that fell back (set by the loader)

    @field_validator("experiment")
    @classmethod
    def _safe_experiment(cls, v: str) -> str:
        return _file_safe(v, "experiment name")

    @model_validator(mode="before")
    @classmethod
    def _population(cls, tree: Any) -> Any:
        """`population:` becomes the `sites` list it describes (and replaces any given): the
        validated config, its YAML and every message name the sites themselves."""
        if not isinstance(tree, dict) or tree.get("population") is None:
            return tree
        tree = dict(tree)
        try:
            pop = PopulationConfig.model_validate(tree.pop("population"))
        except ValidationError as err:  # one line naming the key under population
            e = err.errors()[0]
            where = ".".join(str(p) for p in ("population", *e["loc"]))
            got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
            raise ValueError(f"{where}: {'missing' if e['type'] == 'missing' else e['msg']}{got}") from None
        tree["sites"] = pop.site_entries()
        return tree

    @model_validator(mode="after")
    def _sites(self) -> "ExperimentConfig":
        if not self.sites:
            raise ValueError("sites: at least one site is needed")
        names = [s.name for s in self.sites]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"sites: duplicate site names {sorted(dup)}")
        for n in self.strategy.sequential.order:
            if n not in names:
                raise ValueError(f"strategy.sequential.order names unknown site '{n}' "
                                 f"(sites: {', '.join(names)})")
        return self

    @model_validator(mode="after")
    def _min_sites(self) -> "ExperimentConfig":
        n = len(self.sites)
        if self.strategy.min_sites > n:
            if "min_sites" in self.strategy.model_fields_set:
                raise ValueError(f"strategy.min_sites is {self.strategy.min_sites} but the config "
                                 f"has {n} site{'s' if n != 1 else ''}")
            self.strategy.min_sites = n  # the default (2) on a one-site config: say what is used
        return self

    @model_validator(mode="after")
    def _krum(self) -> "ExperimentConfig":
        s = self.strategy
        f = s.krum_byzantine
        if f and "krum" in (s.name, s.loso_base if s.name == "loso" else None):
            sites = len(self.sites) - (s.name == "loso")  # loso trains without one site
            per_round = max(min(s.min_sites, sites), int(sites * s.fraction))
            if per_round <= 2 * f + 2:
                raise ValueError(f"strategy.krum_byzantine: {f} needs more than {2 * f + 2} sites "
                                 f"per round (Blanchard et al.: n > 2f + 2); this config trains "
                                 f"{per_round}; lower krum_byzantine or add sites")
        return self

    @model_validator(mode="after")
    def _needs_validation(self) -> "ExperimentConfig":
        uses = [k for k, on in (("train.lr_schedule: plateau", self.train.lr_schedule == "plateau"),
                                ("eval.checkpoints: best_val", "best_val" in self.eval.checkpoints)) if on]
        if uses and self.eval.every != 1:
            raise ValueError(f"eval.every: {uses[0]} needs the validation loss every round "
                             f"(eval.every: 1, got {self.eval.every})")
        return self

    @model_validator(mode="after")
    def _privacy(self) -> "ExperimentConfig":
        from chestfed.common.privacy import refusal  # the combinations that make no sense

        problem = refusal(self)
        if problem:
            raise ValueError(problem)
        if self.privacy.dp.level != "none" and self.model.norm != "group":
            self.model.norm = "group"  # results.json and the report say so (privacy.model_norm)
        return self

    @model_validator(mode="after")
    def _fenda(self) -> "ExperimentConfig":
        """The strategy decides model.structure: fenda builds FENDA-FL's two-extractor network.
        (A site's part of the experiment has no strategy: it keeps the structure it was sent.)"""
        if "strategy" not in self.model_fields_set:
            return self
        fenda = self.strategy.name == "fenda"
        if fenda and (self.model.meta or self.model.freeze != "none"):
            raise ValueError("strategy fenda does not support model.meta or model.freeze: "
                             "backbone yet (its classifier reads two image extractors)")
        want = "fenda" if fenda else "single"
        if self.model.structure != want:
            self.model.structure = want
        return self

    def budget(self) -> dict[str, Any]:
        """The run's effective training budget, and which of its keys neither the config file
        nor an override set (they are this schema's defaults, the demo's budget)."""
        values, defaulted = {}, []
        for section, key in BUDGET_KEYS:
            part = getattr(self, section)
            values[f"{section}.{key}"] = getattr(part, key)
            if key not in part.model_fields_set:
                defaulted.append(f"{section}.{key}")
        return {"values": values, "schema_defaults": defaulted}

    def budget_line(self) -> str:
        b = self.budget()
        v = b["values"]
        line = (f"budget: {v['strategy.rounds']} rounds x {v['train.local_epochs']} local epochs, "
                f"lr {v['train.lr']:g} ({v['train.lr_schedule']}), pos_weight "
                f"{v['train.pos_weight']}, task_weights {v['train.task_weights']}")
        if b["schema_defaults"]:
            line += (f"; from the schema's defaults (the demo's): "
                     f"{', '.join(b['schema_defaults'])}")
        return line

    def warnings(self) -> list[str]:
        """Legal but probably not what was meant; launchers print these before a run."""
        out = []
        if self.model.freeze == "backbone" and not self.model.weights:
            out.append("model.freeze: backbone without model.weights trains a classifier on "
                       "random features; name a pretrained weights file")
        if len(self.sites) == 1 and self.strategy.name in FEDERATED:
            out.append(f"{self.strategy.name} with one site is local training with extra steps "
                       f"(nothing to federate); add sites or use --strategy local")
        return out

    def site(self, name: str) -> SiteConfig:
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(f"no site named '{name}' in the config (sites: "
                          f"{', '.join(s.name for s in self.sites)})")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
