"""Classifiers from checkpoints, for every stage that needs one: an init's starting classifier (grid cells, the
champion's fine-tune) and the trained champion (evaluate, export), so no stage imports another for them."""
from __future__ import annotations

from pathlib import Path

import torch

from medssl.config import Params
from medssl.core.cells import encoder_seed
from medssl.core.rng import generator
from medssl.errors import ConfigError, MissingInput, StaleStageError, UsageError
from medssl.layout import Layout
from medssl.models.classifier import Classifier, with_views


def backbone_blocks(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's stages in input-to-output order (what `finetune.frozen_blocks` counts)."""
    t = backbone.trunk
    if hasattr(t, "features"):  # mobilenet_v2, efficientnet_b0
        return list(t.features.children())
    return [torch.nn.Sequential(t.conv1, t.bn1), t.layer1, t.layer2, t.layer3, t.layer4]


def freeze_blocks(model: Classifier, k: int) -> None:
    """Fix the weights and BatchNorm statistics of the first k blocks."""
    blocks = backbone_blocks(model.backbone)
    if k > len(blocks):
        raise ConfigError(f"finetune.frozen_blocks={k} but the backbone has {len(blocks)} blocks")
    for block in blocks[:k]:
        block.requires_grad_(False)
        for m in block.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0  # running statistics stay as initialised/pretrained


def encoder_seed_of(p: Params, init: str, grid_seed: int) -> int:
    """The pretraining seed of the encoder that grid seed `grid_seed`'s cells of `init` start from (core.cells.encoder_seed
    under budgets.<budget>.pretrain_per_seed)."""
    return encoder_seed(init, grid_seed, p.seed, per_seed=p.run_budget.pretrain_per_seed)


def encoder_seeds(p: Params, init: str) -> list[int]:
    """The pretraining seeds of SSL init `init`'s encoders: params.yaml's seed (the champion's and tuning's encoder)
    and, under budgets.<budget>.pretrain_per_seed, one per grid seed."""
    return sorted({p.seed, *(encoder_seed_of(p, init, s) for s in p.grid.seeds)})


def encoder_file(p: Params, init: str, seed: int, lay: Layout = Layout()) -> Path:
    """The file of `init`'s encoder pretrained with `seed`: encoder.pt for params.yaml's seed, else encoder_s<seed>.pt."""
    return lay.encoder(init, None if seed == p.seed else seed)


def build_classifier(p: Params, init: str, meta: dict, seed: int, lay: Layout = Layout(),
                     encoder: int | None = None) -> Classifier:
    """Classifier with the backbone weights of `init` (on CPU); random weights (the random init's backbone, every
    head) are drawn from a generator seeded with `seed`; SSL inits load their encoder pretrained with seed `encoder`
    (None: params.yaml's seed)."""
    if init not in p.inits.all:
        raise UsageError(f"init {init!r} is not configured; inits are {p.inits.all}")
    model = Classifier(p.model.backbone, len(meta["classes"]), p.model.dropout, imagenet=init == "imagenet",
                       mean=meta["mean"], std=meta["std"], gen=generator(seed))
    if init in p.inits.ssl:
        path = encoder_file(p, init, p.seed if encoder is None else encoder, lay)
        if not path.is_file():
            raise MissingInput(f"{path} missing: run `medssl pretrain {init}` first")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["backbone"] != p.model.backbone:
            raise ConfigError(f"{path}: encoder is a {ckpt['backbone']}, params.yaml model.backbone is {p.model.backbone}")
        model.backbone.load_state_dict(ckpt["state_dict"])
    freeze_blocks(model, p.finetune.frozen_blocks)
    return model


def load_classifier(path: Path, device: torch.device) -> tuple[Classifier, dict]:
    """A trained classifier (Layout.classifier: the one `export` ships) as it is shipped (eval mode, on `device`;
    averaging its views when the checkpoint says so, models.classifier.with_views) and its checkpoint metadata."""
    from medssl.core.engine import prepare_model

    if not path.is_file():
        raise MissingInput(f"{path} missing: run `medssl finetune` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or overwritten
        raise StaleStageError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"rerun `medssl finetune`") from None
    if "run_id" not in ckpt:
        raise StaleStageError(f"{path}: written by an earlier medssl, without its provenance (run, validation "
                         f"scores); rerun `medssl finetune`")
    model = Classifier(ckpt["backbone"], ckpt["num_classes"], ckpt["dropout"], mean=ckpt["mean"], std=ckpt["std"])
    model.load_state_dict(ckpt["state_dict"])
    return with_views(prepare_model(model, device), ckpt.get("views", 1)).eval(), ckpt


def user_named(record: dict) -> bool:
    """Whether a classifier's checkpoint or summary (finetune) is of an init the user named (`medssl finetune <init>`):
    it then holds no grid means to have been chosen by."""
    return record.get("candidates_val") is None and not record.get("finalists_val")


def how_chosen(select: str, record: dict) -> str:
    """How the champion was chosen, as every message about it says (report, registry, Prefect log, CLI). record: its
    checkpoint or finetune summary, whose `finalists_val` (init -> validation `select` of each finalist trained with
    the shipped recipe) is absent when one was (the grid's best), and which names no candidates when the user named
    the init (user_named)."""
    finalists = record.get("finalists_val")
    if user_named(record):
        return "named by the user (`medssl finetune <init>`), not chosen by the comparison"
    if not finalists:
        return f"chosen on validation {select} of the grid's 100 % fine-tune cells"
    return (f"chosen on validation {select}: the grid's 100 % fine-tune cells ranked the inits, the best "
            f"{len(finalists)} were each trained with the shipped recipe, and the one with the best validation "
            f"{select} of its own was kept: " + ", ".join(f"{i} {v:.4f}" for i, v in finalists.items())
            + ("; a tie, broken by the higher validation macro AUC, then the lower calibration error (ECE), then "
               "the grid's rank"
               if list(finalists.values()).count(max(finalists.values())) > 1 else ""))
