"""params.yaml -> validated, typed configuration (the only configuration of medssl)."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medssl.errors import ConfigError
from medssl.metric_names import SELECTABLE

BACKBONES = ("mobilenet_v2", "resnet18", "resnet50", "efficientnet_b0")
BASELINE_INITS = ("random", "imagenet")
SSL_METHODS = ("vae", "simclr", "mim")
HYBRIDS = {"imagenet-simclr": "simclr", "imagenet-mim": "mim"}  # the method continued from ImageNet weights
SSL_INITS = (*SSL_METHODS, *HYBRIDS)
PROTOCOLS = ("linear", "finetune", "knn")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        """YAML `true` is not a number: pydantic would read `lr: true` as 1.0."""
        if isinstance(v, bool) and bool not in _scalar_types(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number or string, got a boolean")
        return v


def _scalar_types(annotation) -> set:
    """The plain types an annotation admits: float | None -> {float, NoneType}; Literal[...] -> value types."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return {type(a) for a in args}
    if not args:
        return {annotation}
    return set().union(*(_scalar_types(a) for a in args))


def _label_fractions(v: list[float]) -> list[float]:
    bad = [f for f in v if not 0 < f <= 1]
    if bad or not v:
        raise ValueError(f"label fractions must lie in (0, 1], got {v}")
    return sorted(set(v))


class GridBudget(_Strict):
    epochs: int = Field(default=3, ge=1)                 # fine-tune epochs of every grid cell (with steps: evaluations)
    steps: int | None = Field(default=None, ge=1)        # fine-tune cells: optimizer steps, the same at every label
                                                         # fraction (1 % cells learn too); null: `epochs` passes
    max_train: int | None = Field(default=None, ge=16)   # labelled pool (stratified subset of train); null = all
    max_eval: int | None = Field(default=None, ge=16)    # val/test subsets scored per cell; null = all
    fractions: list[float] | None = None                 # the budget's label fractions; null = grid.fractions
    batch_size: int | None = Field(default=None, ge=1)   # fine-tune cells' batch; null = finetune.batch_size

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else _label_fractions(v)

    def training(self, batch_size: int) -> str:
        """What every fine-tune cell gets, in words (report, verdict); batch_size: finetune.batch_size."""
        b = self.batch_size or batch_size
        if self.steps:
            return f"{self.steps} optimizer steps of batch {b} at every label fraction (validated {self.epochs} times)"
        return f"{self.epochs} epochs of batch {b}"


def _multiple_of_16(v: int | None) -> int | None:
    if v is not None and v % 16:
        raise ValueError(f"must be a multiple of 16 (the VAE decoder upsamples 16x), got {v}")
    return v


class Budget(_Strict):
    pretrain_epochs: int = Field(ge=1)
    finetune_epochs: int = Field(ge=1)
    grid: GridBudget  # required: dvc.yaml's grid stages depend on budgets.<budget>.grid (and pretrain on pretrain_epochs)
    image_size: int = Field(default=32, ge=16, le=512)  # prepared resolution under this budget (data.image_size overrides)
    finetune_image_size: int | None = Field(default=None, ge=16, le=512)  # the champion's (the shipped model's); null: image_size
    pretrain_per_seed: bool = False  # one encoder per grid seed (seed + grid seed) for each SSL init, else one for all
    finalists: int = Field(default=1, ge=1)  # the grid's best inits trained with the shipped recipe; the best on validation ships

    _size = field_validator("image_size")(_multiple_of_16)


class Built(_Strict):
    """How `fetch` turns image files into the raw npz: stored size, split shares, non-square photos."""
    size: int = Field(default=28, ge=8, le=512)  # stored (= ONNX input) resolution
    val: float = Field(default=0.1, gt=0.0, lt=0.5)  # shares of a split made by medssl (stratified, grouped if groups)
    test: float = Field(default=0.2, gt=0.0, lt=0.5)
    fit: Literal["stretch", "crop", "reject"] = "stretch"  # non-square photos: as MedMNIST | centre square | error


class Folder(Built):
    images: str                                 # <images>/<class>/*.png|jpg, or <images>/{train,val,test}/<class>/...


class Columns(_Strict):
    path: str = "path"                          # image file, relative to csv.images (or the CSV's folder)
    label: str = "label"                        # class name
    group: str | None = "group"                 # patient / lesion / study id: no group crosses splits; absent = none


class Csv(Built):
    file: str                                   # CSV with a header row: path,label[,group]
    images: str | None = None                   # folder the paths are relative to; null: the CSV's folder
    columns: Columns = Columns()                # HAM10000: {path: image_id, label: dx, group: lesion_id}


SOURCES = ("medmnist", "npz", "folder", "csv")
TASKS = ("auto", "multiclass", "binary", "ordinal")


def slug(name: str) -> str:
    """A dataset name as MLflow experiment / registered model / Prefect names take it: a-z, 0-9, '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data"


class Data(_Strict):
    name: str | None = None                     # null: the medmnist flag, else the npz / folder / CSV name
    source: Literal[SOURCES] = "medmnist"       # which of the sections below `fetch` builds data.path from
    medmnist: str | None = "dermamnist"         # a MedMNIST 2D flag: pneumoniamnist, bloodmnist, retinamnist, ...
    npz: str | None = None                      # a MedMNIST-layout npz of your own (read, never written)
    folder: Folder | None = None
    csv: Csv | None = None
    classes: list[str] | None = None            # class names in label order; null: from the source
    task: Literal[TASKS] = "auto"               # auto: binary for 2 classes, else multiclass; ordinal: say so
    positive: str | None = None                 # binary tasks: the positive class; null: the second class
    path: str = "data/raw/images.npz"           # fetch's output: the raw npz every stage reads (under data/)
    image_size: int | None = Field(default=None, ge=16, le=512)  # null: the budget's (budgets.<budget>.image_size)
    max_train: int | None = Field(default=None, ge=16)
    max_eval: int | None = Field(default=None, ge=16)

    @field_validator("path")
    @classmethod
    def _under_data(cls, v: str) -> str:
        """fetch replaces this file, so it must be one of the project's own: never README.md, never outside."""
        parts = PurePosixPath(v).parts
        if (PurePosixPath(v).is_absolute() or ".." in parts or len(parts) < 2 or parts[0] != "data"
                or parts[1] == "prepared" or not v.endswith(".npz")):
            raise ValueError(f"{v!r}: fetch writes this file, so it must be an .npz under the project's data/ folder "
                             f"(not data/prepared/), e.g. data/raw/<name>.npz")
        return v

    @model_validator(mode="before")
    @classmethod
    def _named(cls, raw):
        """data.name from the source when not given, so every name a user sees follows the dataset."""
        if not isinstance(raw, dict) or raw.get("name"):
            return raw
        src = raw.get("source", cls.model_fields["source"].default)
        where = {"medmnist": raw.get("medmnist", cls.model_fields["medmnist"].default), "npz": raw.get("npz"),
                 "folder": (raw.get("folder") or {}).get("images") if isinstance(raw.get("folder"), dict) else None,
                 "csv": (raw.get("csv") or {}).get("file") if isinstance(raw.get("csv"), dict) else None}.get(src)
        return {**raw, "name": slug(Path(str(where)).stem) if where else None}

    @model_validator(mode="after")
    def _source_given(self) -> Data:
        section = {"medmnist": self.medmnist, "npz": self.npz, "folder": self.folder, "csv": self.csv}[self.source]
        if section is None:
            raise ValueError(f"data.source is {self.source!r} but data.{self.source} is not set")
        if self.name is None:
            object.__setattr__(self, "name", "data")
        if self.source == "medmnist":
            from medssl.data.sources import medmnist_flags

            flags = medmnist_flags()
            if flags and self.medmnist not in flags:
                raise ValueError(f"data.medmnist {self.medmnist!r} is not a MedMNIST 2D dataset; one of {sorted(flags)}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes has duplicate names: {self.classes}")
        if self.classes is not None and len(self.classes) < 2:
            raise ValueError(f"data.classes needs >= 2 classes, got {self.classes}")
        if self.positive is not None and self.classes is not None and self.positive not in self.classes:
            raise ValueError(f"data.positive {self.positive!r} is not one of data.classes {self.classes}")
        if self.npz is not None and Path(self.npz).resolve() == Path(self.path).resolve():
            raise ValueError(f"data.npz ({self.npz}) is data.path, the fetch stage's output (DVC replaces it); "
                             f"keep your file elsewhere and point data.npz at it")
        return self

    _size = field_validator("image_size")(_multiple_of_16)

    @field_validator("classes", "positive", mode="before")
    @classmethod
    def _names_are_strings(cls, v):
        """Grades written as numbers (classes: [0, 1, 2], positive: 1) are class names like any other."""
        if isinstance(v, list):
            return [str(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else c for c in v]
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class Model(_Strict):
    backbone: Literal[BACKBONES] = "mobilenet_v2"
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)


def method_of(init: str) -> str:
    """The pretraining method of an SSL init: imagenet-simclr -> simclr; vae -> vae."""
    return HYBRIDS.get(init, init)


class Inits(_Strict):
    baselines: list[Literal[BASELINE_INITS]] = ["random", "imagenet"]
    ssl: list[Literal[SSL_INITS]] = list(SSL_INITS)  # imagenet-<method>: the method pretrained from ImageNet weights

    @property
    def all(self) -> list[str]:
        return [*self.baselines, *self.ssl]


class Augment(_Strict):
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    strength: float = Field(default=0.5, ge=0.0, le=1.0)  # probability of each enabled transform


class VAE(_Strict):
    latent_dim: int = Field(default=128, ge=2)
    beta: float = Field(default=1.0, ge=0.0)
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)


class SimCLRCfg(_Strict):
    proj_dim: int = Field(default=128, ge=8)
    temperature: float = Field(default=0.5, gt=0.0)
    min_scale: float = Field(default=0.2, gt=0.0, le=1.0)   # random resized crop keeps >= this area
    jitter: float = Field(default=0.1, ge=0.0, lt=1.0)      # brightness/contrast/saturation range 1 ± jitter
    grayscale: float = Field(default=0.0, ge=0.0, le=1.0)   # probability of a grey view
    lr: float = Field(default=2e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)


class MIMCfg(_Strict):
    patch: int = Field(default=8, ge=2)
    mask_ratio: float = Field(default=0.6, gt=0.0, lt=1.0)
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)


class Pretrain(_Strict):
    batch_size: int = Field(default=128, ge=2)
    vae: VAE = VAE()
    simclr: SimCLRCfg = SimCLRCfg()
    mim: MIMCfg = MIMCfg()


class Finetune(_Strict):
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    batch_size: int = Field(default=128, ge=2)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_weight: Literal["balanced", "none"] = "none"  # loss weights classes by 1/frequency | none
    warmup_epochs: int = Field(default=0, ge=0)
    frozen_blocks: int = Field(default=0, ge=0)  # leading backbone blocks kept fixed
    augment: Augment = Augment()
    train_eval_size: int = Field(default=1000, ge=16)
    ema_window: float = Field(default=0.25, ge=0.0, le=1.0)  # the champion's weights: a moving average over this share of its steps; 0: none
    views: Literal[1, 8] = 8  # 8: the champion averages each image's 8 flips/transposes if that scores higher on validation; 1: never


class Scale(_Strict):
    """How the Prefect flow runs the grid's shards (one per init x grid seed)."""
    runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None      # tcp://host:8786: an existing scheduler; null: a local cluster
    dask_workers: int = Field(default=2, ge=1)  # local cluster: worker processes (multi-GPU: one per GPU instead)


class Shift(_Strict):
    images: str                                 # second source for domain shift: a folder of images + a CSV
    csv: str                                    # path,label[,group] (see columns); its grouped test split is scored
    columns: Columns = Columns(path="image_id", label="dx", group="lesion_id")  # default: HAM10000/ISIC layout
    classes: list[str] | None = None            # its labels for the dataset's classes, in label order (HAM10000's dx
                                                # codes for DermaMNIST: akiec, bcc, ...); null: the dataset's names
    name: str = "shift"


class Grid(_Strict):
    """The comparison: init x protocol x label fraction x seed, plus the imbalance, shift and fusion regimes."""
    protocols: list[Literal[PROTOCOLS]] = list(PROTOCOLS)
    fractions: list[float] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
    seeds: list[int] = [0, 1, 2]
    knn_k: int = Field(default=20, ge=1)
    linear_c: float = Field(default=1.0, gt=0.0)            # inverse L2 strength of the linear probe
    linear_class_weight: Literal["balanced", "none"] = "balanced"  # linear probe's loss: class-balanced or plain
    finetune_class_weight: Literal["balanced", "none"] = "balanced"  # the grid's fine-tune cells' loss
    imbalance: list[float] = [1.0, 10.0]                    # largest/smallest class count, by capping classes
    shift: Shift | None = None
    fusion: list[list[str]] = [["imagenet", "simclr"], ["vae", "simclr", "mim"]]

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        return _label_fractions(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) < 3:
            raise ValueError(f"at least 3 distinct seeds are needed for confidence intervals, got {v}")
        return v

    @field_validator("imbalance")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(r < 1 for r in v):
            raise ValueError(f"imbalance ratios are largest/smallest class count, so >= 1; got {v}")
        return v


class Export(_Strict):
    select_metric: Literal[("auto", *SELECTABLE)] = "auto"  # auto: kappa_quadratic for ordinal tasks, else balanced_accuracy
    registered_model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # null: <data.name>-classifier
    alias: str = Field(default="champion", pattern=r"^[A-Za-z0-9_-]{1,64}$")  # MLflow's alias characters
    parity_images: int = Field(default=256, ge=64)
    parity_tolerance: float = Field(default=1e-4, gt=0.0)


class Tune(_Strict):
    n_trials: int = Field(default=6, ge=1)  # per init: every init gets the same search and the same budget
    storage: str = "sqlite:///optuna.db"  # any SQLAlchemy URL, or journal:<file> for parallel workers
    study_name: str | None = None          # one study per init: <study_name>-<init>; null: medssl-<data.name>
    inits: list[str] | None = None         # null: every init in `inits`
    pruner: Literal["median", "successive_halving", "none"] = "median"
    output: str = "tuned.yaml"


class TunedInit(_Strict):
    """Values `medssl tune` chose for one init, merged over params.yaml's sections when that init trains."""
    finetune: dict = {}
    pretrain: dict = {}
    study: dict = {}                       # where they came from: study, trials, best value, MLflow run


class Mlflow(_Strict):
    experiment: str | None = Field(default=None, min_length=1)  # null: medssl-<data.name>


class Params(_Strict):
    seed: int = 42
    budget: str = "demo"
    budgets: dict[str, Budget]
    data: Data = Data()
    model: Model = Model()
    inits: Inits = Inits()
    pretrain: Pretrain = Pretrain()
    finetune: Finetune = Finetune()
    grid: Grid = Grid()
    export: Export = Export()
    tune: Tune = Tune()
    mlflow: Mlflow = Mlflow()
    scale: Scale = Scale()
    tuned: dict[str, TunedInit] = {}       # init -> tuned values (tuned.yaml, written by `medssl tune`)

    @model_validator(mode="before")
    @classmethod
    def _budget_fractions(cls, raw):
        """budgets.<budget>.grid.fractions, when set, is the grid's label fractions (p.grid.fractions); a different
        grid.fractions beside it is an error rather than silently replaced."""
        try:  # only a well-formed budget section is read here; the field validators name anything else
            budget = raw.get("budget", cls.model_fields["budget"].default)
            fractions = raw["budgets"][budget]["grid"]["fractions"]
        except (AttributeError, KeyError, TypeError):
            return raw
        grid = raw.get("grid") or {}
        if not isinstance(fractions, list) or not isinstance(grid, dict):
            return raw
        own = grid.get("fractions")
        try:
            same = own is None or sorted(set(map(float, own))) == sorted(set(map(float, fractions)))
        except (TypeError, ValueError):
            same = True  # not numbers: the field validators name the bad value
        if not same:
            raise ValueError(f"grid.fractions {own} and budgets.{budget}.grid.fractions {fractions} are both set: "
                             f"under budget {budget!r} the budget's apply; set one of them")
        return {**raw, "grid": {**grid, "fractions": fractions}}

    @model_validator(mode="after")
    def _names_follow_the_dataset(self) -> Params:
        """Defaults that follow data.name and data.task, resolved once here so every stage reads plain values."""
        name = slug(self.data.name)
        select = self.export.select_metric
        if select == "auto":
            select = "kappa_quadratic" if self.data.task == "ordinal" else "balanced_accuracy"
        for section, update in (("export", {"registered_model": self.export.registered_model or f"{name}-classifier",
                                            "select_metric": select}),
                                ("mlflow", {"experiment": self.mlflow.experiment or f"medssl-{name}"}),
                                ("tune", {"study_name": self.tune.study_name or f"medssl-{name}"})):
            object.__setattr__(self, section, getattr(self, section).model_copy(update=update))
        return self

    @model_validator(mode="after")
    def _budget_exists(self) -> Params:
        if self.budget not in self.budgets:
            raise ValueError(f"budget {self.budget!r} is not one of budgets: {sorted(self.budgets)}")
        for group in self.grid.fusion:
            missing = [i for i in group if i not in self.inits.all]
            if missing or len(group) < 2:
                raise ValueError(f"grid.fusion group {group} needs >= 2 inits from inits ({self.inits.all}); "
                                 f"not configured: {missing}")
        return self

    @model_validator(mode="after")
    def _fits_image_size(self) -> Params:
        if self.image_size % self.pretrain.mim.patch:
            raise ValueError(f"pretrain.mim.patch={self.pretrain.mim.patch} does not divide {self.image_size_key}="
                             f"{self.image_size} (MIM masks whole patches)")
        return self

    @model_validator(mode="after")
    def _tune_and_tuned_inits(self) -> Params:
        unknown = [i for i in (self.tune.inits or []) if i not in self.inits.all]
        if unknown:
            raise ValueError(f"tune.inits {unknown} are not configured in inits ({self.inits.all})")
        for init, t in self.tuned.items():
            bad = [k for k in t.pretrain if k != method_of(init)]
            if bad:
                raise ValueError(f"tuned.{init}.pretrain may only hold {method_of(init)!r} values, got {bad}")
            for section in ("finetune", "pretrain"):
                try:  # every tuned value is checked like the params.yaml value it replaces
                    type(getattr(self, section)).model_validate(deep_merge(getattr(self, section).model_dump(),
                                                                           getattr(t, section)))
                except ValidationError as e:
                    err = e.errors()[0]
                    loc = ".".join(str(x) for x in err["loc"])
                    raise ValueError(f"tuned.{init}.{section}.{loc}: {err['msg']} (got {err.get('input')!r:.80})") from None
        return self

    @property
    def run_budget(self) -> Budget:
        """The chosen budget's values (budgets.<budget>)."""
        return self.budgets[self.budget]

    @property
    def image_size_key(self) -> str:
        """Where the prepared resolution is set: data.image_size when given, else the budget's."""
        return "data.image_size" if self.data.image_size is not None else f"budgets.{self.budget}.image_size"

    @property
    def image_size(self) -> int:
        """The prepared resolution (px): data.image_size when given, else budgets.<budget>.image_size."""
        return self.data.image_size if self.data.image_size is not None else self.run_budget.image_size

    @property
    def finetune_image_size(self) -> int:
        """The champion's resolution (px), what `finetune` trains and `export` ships at: data.image_size when given,
        else budgets.<budget>.finetune_image_size, else the prepared resolution. Prepared beside the comparison's."""
        return self.data.image_size or self.run_budget.finetune_image_size or self.image_size

    @property
    def grid_finetune(self) -> Finetune:
        """The settings of the grid's fine-tune cells: `finetune`'s, with the grid's class weighting and batch size, the
        last step's weights and one view (ema_window and views are the champion's recipe, not the comparison's, so
        editing them reruns no grid: dvc.yaml's grid stages list the other finetune keys)."""
        return self.finetune.model_copy(update={
            "class_weight": self.grid.finetune_class_weight, "ema_window": 0.0, "views": 1,
            "batch_size": self.run_budget.grid.batch_size or self.finetune.batch_size})

    @property
    def tune_inits(self) -> list[str]:
        return self.tune.inits or self.inits.all

    def for_init(self, init: str) -> Params:
        """This configuration with the values tuned for `init` merged over `finetune` and `pretrain`."""
        t = self.tuned.get(init)
        if t is None or not (t.finetune or t.pretrain):
            return self
        raw = self.model_dump()
        raw["finetune"] = deep_merge(raw["finetune"], t.finetune)
        raw["pretrain"] = deep_merge(raw["pretrain"], t.pretrain)
        return Params.model_validate(raw)


MAX_YAML_ALIASES = 50  # params.yaml uses none; a few KB of nested aliases expand to gigabytes ("billion laughs")


def _safe_yaml(text: str, path: Path):
    """yaml.safe_load, refusing documents with more than MAX_YAML_ALIASES aliases (*name) before building them."""
    aliases = sum(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader))
    if aliases > MAX_YAML_ALIASES:
        raise ConfigError(f"{path}: {aliases} YAML aliases (*name); at most {MAX_YAML_ALIASES} are read (nested "
                          f"aliases can expand a small file into gigabytes)")
    return yaml.safe_load(text)


def _read_yaml(path: Path) -> dict:
    try:
        raw = _safe_yaml(path.read_text(), path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run from the project root or pass --params)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (the inverse of set_dotted)."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def set_dotted(d: dict, dotted: str, value) -> dict:
    """{"a": {"b": 1}}, "a.b", 2 -> {"a": {"b": 2}} (a new dict; missing levels are created)."""
    head, _, rest = dotted.partition(".")
    out = dict(d)
    out[head] = set_dotted(out.get(head) or {}, rest, value) if rest else value
    return out


def dataset_overrides(dataset: str) -> dict:
    """A flow's `dataset` parameter -> dotted overrides: a MedMNIST flag (pneumoniamnist), or a path to an npz, a
    CSV of path,label[,group], or a folder of class sub-folders. Its name, class names, experiment, registered
    model and studies then follow it (params.yaml's belong to params.yaml's dataset)."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        src = {"data.source": "folder", "data.folder": {"images": str(path.resolve())}}
    elif path.suffix.lower() == ".npz":
        src = {"data.source": "npz", "data.npz": str(path.resolve())}
    elif path.suffix.lower() == ".csv":
        src = {"data.source": "csv", "data.csv": {"file": str(path.resolve())}}
    elif "/" in dataset or path.suffix:
        raise ConfigError(f"dataset {dataset!r}: no such folder, and not an .npz or .csv file")
    else:
        src = {"data.source": "medmnist", "data.medmnist": dataset}
    name = slug(path.stem if "data.medmnist" not in src else dataset)
    return {**src, "data.npz": src.get("data.npz"), "data.name": None, "data.classes": None, "data.positive": None,
            "data.task": "auto", "data.path": f"data/raw/{name}.npz", "mlflow.experiment": None,
            "export.registered_model": None, "tune.study_name": None, "tune.output": f"tuned-{name}.yaml"}


class RunOverrides(_Strict):
    """The run parameters of the flows (medssl-pipeline, medssl-tune take those they name) as params.yaml values;
    None keeps params.yaml's. Epochs and grid values apply to the chosen budget; inits are split into
    baselines and SSL inits (fusion groups not covered are dropped); dataset: see dataset_overrides."""
    budget: str | None = None
    epochs: int | None = None                 # budgets.<budget>.finetune_epochs
    pretrain_epochs: int | None = None
    image_size: int | None = None
    seed: int | None = None
    max_train: int | None = None
    max_eval: int | None = None
    inits: list[str] | None = None
    grid_epochs: int | None = None
    grid_max_train: int | None = None
    fractions: list[float] | None = None
    dataset: str | None = None

    @classmethod
    def pick(cls, values: dict) -> RunOverrides:
        """The overrides among a flow's parameters (its locals())."""
        return cls(**{k: v for k, v in values.items() if k in cls.model_fields})

    def dotted(self, base: Params) -> dict:
        """-> dotted params.yaml overrides, as load_params and `dvc exp run -S` take them."""
        budget = self.budget or base.budget
        out = {"budget": budget, f"budgets.{budget}.finetune_epochs": self.epochs,
               f"budgets.{budget}.pretrain_epochs": self.pretrain_epochs, "data.image_size": self.image_size,
               "seed": self.seed, "data.max_train": self.max_train, "data.max_eval": self.max_eval,
               f"budgets.{budget}.grid.epochs": self.grid_epochs, f"budgets.{budget}.grid.max_train": self.grid_max_train,
               f"budgets.{budget}.grid.fractions": self.fractions}
        if self.inits is not None:
            out["inits.baselines"] = [i for i in self.inits if i in BASELINE_INITS]
            out["inits.ssl"] = [i for i in self.inits if i not in BASELINE_INITS]
            out["grid.fusion"] = [g for g in base.grid.fusion if set(g) <= set(self.inits)]
        out = {k: v for k, v in out.items() if v is not None}
        return out | (dataset_overrides(self.dataset) if self.dataset else {})


def write_params(path: str | Path, overrides: dict) -> None:
    """Set dotted values in params.yaml, keeping its comments and layout (ruamel round trip, as DVC edits it), after
    checking that the result validates: an invalid value leaves the file as it was (ConfigError names it)."""
    import io

    from ruamel.yaml import YAML

    path = Path(path)
    load_params(path, overrides)  # raises before anything is written
    rt = YAML()
    rt.width, rt.preserve_quotes = 4096, True  # no re-wrapped lines
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    for key, value in overrides.items():
        node, parts = doc, key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if isinstance(value, (list, dict)):  # written inline, as params.yaml writes its lists
            from ruamel.yaml.comments import CommentedMap, CommentedSeq

            value = (CommentedSeq if isinstance(value, list) else CommentedMap)(value)
            value.fa.set_flow_style()
        node[parts[-1]] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None, tuned: bool = True) -> Params:
    """Read and validate params.yaml (+ the tuned values in `tune.output`, + dotted overrides).

    Every error names the file and the field.
    """
    path = Path(path)
    raw = _read_yaml(path)
    for k, v in (overrides or {}).items():  # first, so that an overridden tune.output picks the tuned file
        raw = set_dotted(raw, k, v)
    tuned_path = path.parent / ((raw.get("tune") or {}).get("output") or "tuned.yaml")
    if tuned and tuned_path.is_file():
        raw = deep_merge(raw, _read_yaml(tuned_path))
        for k, v in (overrides or {}).items():  # overrides win over tuned values too
            raw = set_dotted(raw, k, v)
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '<cross-field>'}: {err['msg'].removeprefix('Value error, ')}"
                 + (f" (got {err.get('input')!r:.80})" if err["loc"] else "") for err in e.errors()]
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(lines)) from None
