"""LoRA adapters as records: read and write the mlx-lm and PEFT formats, attach, switch.

One `Adapter` holds what both formats need: rank r, alpha (scale alpha / r,
or alpha / sqrt(r) with rsLoRA), dropout, the full paths of the adapted
modules, and the factors in mlx-lm's layout, A (in, r) and B (r, out).

PEFT stores the transposes under `base_model.model.<path>.lora_A.weight`
(r, in) and `...lora_B.weight` (out, r), with `r` and `lora_alpha` in its
config (REFERENCE section 2). PEFT -> mlx -> PEFT gives identical tensors.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_grpo.core.files import read_json_object
from mlx_grpo.core.lora import LoRALinear, lora_scale, wrap_modules
from mlx_grpo.core.models import LoadedModel, load_model

MLX_WEIGHTS = "adapters.safetensors"
MLX_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LAYER_RE = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass
class Adapter:
    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    lora_a: dict[str, mx.array] = field(default_factory=dict)  # path -> (in, r)
    lora_b: dict[str, mx.array] = field(default_factory=dict)  # path -> (r, out)
    base_model: str | None = None

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_a, key=_natural)

    # --------------------------------------------------------------- from a model

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        base_model: str | None = None,
    ) -> Adapter:
        """The adapters currently inside `model` (its LoRALinear layers)."""
        layers = {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}
        if not layers:
            raise ValueError("the model holds no LoRA layers")
        rank = next(iter(layers.values())).lora_a.shape[1]
        return cls(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            rslora=rslora,
            lora_a={p: m.lora_a for p, m in layers.items()},
            lora_b={p: m.lora_b for p, m in layers.items()},
            base_model=base_model,
        )

    def attach(self, model: nn.Module) -> None:
        """Wrap the adapted modules of `model` and load these factors into them."""
        wrap_modules(model, self.modules, self.rank, self.scale, self.dropout)
        modules = dict(model.named_modules())
        for p in self.modules:
            _set_factors(modules[p], p, self.lora_a[p], self.lora_b[p])
        mx.eval(model.parameters())

    # --------------------------------------------------------------- mlx-lm format

    def save(self, path: str | Path) -> Path:
        """Write an mlx-lm adapter directory (`mlx_lm.load(..., adapter_path=path)`).

        Modules are named by full path with `num_layers` 0, which mlx-lm's
        loader applies exactly as given, so any set of layers round-trips.
        Each file is written beside its place and renamed over it, so a crash
        leaves the previous file and a symlink there is replaced, not followed.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {f"{p}.lora_a": a for p, a in self.lora_a.items()}
        weights |= {f"{p}.lora_b": b for p, b in self.lora_b.items()}
        _atomic_save(path / MLX_WEIGHTS, {k: mx.contiguous(v) for k, v in weights.items()})
        config = {
            "fine_tune_type": "lora",
            "num_layers": 0,
            "lora_parameters": {
                "rank": self.rank,
                "scale": self.scale,
                "dropout": self.dropout,
                "keys": self.modules,
            },
            "mlx_grpo": {
                "lora_alpha": self.alpha,
                "use_rslora": self.rslora,
                "base_model": self.base_model,
            },
        }
        _atomic_write(path / MLX_CONFIG, json.dumps(config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Read an adapter directory in mlx-lm or PEFT format."""
        path = Path(path)
        if (path / PEFT_WEIGHTS).is_file():
            return cls.load_peft(path)
        if not (path / MLX_WEIGHTS).is_file() or not (path / MLX_CONFIG).is_file():
            raise ValueError(
                f"{path} is not an adapter directory: expected {MLX_WEIGHTS} + {MLX_CONFIG} "
                f"(mlx-lm) or {PEFT_WEIGHTS} + {PEFT_CONFIG} (PEFT)"
            )
        config = _read_config(path / MLX_CONFIG)
        if config.get("fine_tune_type", "lora") != "lora":
            raise ValueError(
                f"{path}: only LoRA adapters are supported, not {config['fine_tune_type']}"
            )
        try:
            params = config["lora_parameters"]
            extra = config.get("mlx_grpo") or {}
            rank = int(params["rank"])
            # Plain mlx-lm adapters only have scale = alpha / r.
            alpha = float(extra.get("lora_alpha", params["scale"] * rank))
            adapter = cls(
                rank,
                alpha,
                float(params.get("dropout", 0.0)),
                bool(extra.get("use_rslora", False)),
                base_model=extra.get("base_model"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{path / MLX_CONFIG} is not an mlx-lm LoRA config: lora_parameters with rank "
                f"and scale is missing or malformed ({type(e).__name__}: {e}); restore the file "
                "the adapter was saved with."
            ) from None
        for name, value in _load_weights(path / MLX_WEIGHTS).items():
            module, _, leaf = name.rpartition(".")
            if leaf == "lora_a":
                adapter.lora_a[module] = value
            elif leaf == "lora_b":
                adapter.lora_b[module] = value
            else:
                raise ValueError(f"{path / MLX_WEIGHTS}: unexpected tensor {name}")
        _check_pairs(adapter, path)
        return adapter

    # --------------------------------------------------------------- PEFT format

    def save_peft(self, path: str | Path, num_layers: int | None = None) -> Path:
        """Write a PEFT LoRA folder that `PeftModel.from_pretrained` loads unchanged.

        `num_layers` (the base model's layer count) lets the config omit
        `layers_to_transform` when every layer is adapted. Files are written
        as in `save`: beside their place, then renamed over it.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {}
        for p in self.modules:
            weights[f"{PEFT_PREFIX}{p}.lora_A.weight"] = self.lora_a[p].T  # (r, in)
            weights[f"{PEFT_PREFIX}{p}.lora_B.weight"] = self.lora_b[p].T  # (out, r)
        _atomic_save(
            path / PEFT_WEIGHTS, {k: mx.contiguous(v) for k, v in weights.items()}, {"format": "pt"}
        )
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.rslora,
            "lora_dropout": self.dropout,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            **peft_targets(self.modules, num_layers),
        }
        _atomic_write(path / PEFT_CONFIG, json.dumps(config, indent=2))
        return path

    @classmethod
    def load_peft(cls, path: str | Path) -> Adapter:
        """Read a PEFT LoRA folder; refuse what an mlx-lm adapter cannot express."""
        path = Path(path)
        if not (path / PEFT_WEIGHTS).is_file():
            mlx = (path / MLX_WEIGHTS).is_file()
            raise ValueError(
                f"{path} is an mlx-lm adapter, not a PEFT one: train --adapter, eval, generate "
                "and fuse read it as it is, and `mlx-grpo export` makes a PEFT folder of it."
                if mlx
                else f"{path} is not a PEFT adapter folder: it has no {PEFT_WEIGHTS}."
            )
        config = _read_config(path / PEFT_CONFIG)
        _check_peft_config(config, path)
        try:
            adapter = cls(
                rank=int(config["r"]),
                alpha=float(config.get("lora_alpha", 8)),
                dropout=float(config.get("lora_dropout") or 0.0),
                rslora=bool(config.get("use_rslora", False)),
                base_model=config.get("base_model_name_or_path"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path / PEFT_CONFIG} is not a PEFT LoRA config: r or lora_alpha is missing or "
                f"malformed ({type(e).__name__}: {e}); restore the file PEFT saved."
            ) from None
        for name, value in _load_weights(path / PEFT_WEIGHTS).items():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", name)
            if match is None:
                raise ValueError(
                    f"{path / PEFT_WEIGHTS}: tensor {name} is not a LoRA A/B factor of a linear "
                    "layer (embedding adapters, biases and saved modules are not supported)"
                )
            module, which = match.groups()
            if which == "A":
                adapter.lora_a[module] = value.T
            else:
                adapter.lora_b[module] = value.T
        _check_pairs(adapter, path)
        return adapter


def peft_targets(modules: list[str], num_layers: int | None) -> dict:
    """PEFT's target_modules (+ layers_to_transform) that select exactly `modules`.

    Leaf names with a layer list when the set is every named leaf on every
    listed layer; otherwise a regular expression of the full names.
    """
    parsed = [_LAYER_RE.match(m) for m in modules]
    if all(parsed) and len({m["prefix"] for m in parsed}) == 1:
        leaves = sorted({m["rest"].rsplit(".", 1)[-1] for m in parsed})
        rests = sorted({m["rest"] for m in parsed})
        layers = sorted({int(m["index"]) for m in parsed})
        full = {f"{parsed[0]['prefix']}.{i}.{r}" for i in layers for r in rests}
        unique_leaves = len(rests) == len(leaves)
        if full == set(modules) and unique_leaves:
            out: dict = {"target_modules": leaves}
            if num_layers is None or layers != list(range(num_layers)):
                out["layers_to_transform"] = layers
                out["layers_pattern"] = "layers"
            return out
    return {"target_modules": "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"}


def _read_config(file: Path) -> dict:
    """An adapter_config.json as a dict; ValueError naming the file when it is not one."""
    if not file.is_file():
        raise ValueError(f"{file} is missing; an adapter folder needs its {file.name}.")
    return read_json_object(file, "restore the file the adapter was saved with")


def _load_weights(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"{file} cannot be read as safetensors ({e}); the file is damaged or incomplete: "
            "save or download the adapter again."
        ) from None


def _check_peft_config(config: dict, path: Path) -> None:
    where = path / PEFT_CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config['peft_type']} is not LoRA")
    refusals = {
        "use_dora": "DoRA adapters are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D-style) adapters are not supported",
        "modules_to_save": "modules_to_save (fully trained extra modules) cannot be carried over",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise ValueError(f"{where}: {key} is set; {why}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r}; only bias 'none' is supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    odd_rank = {k: v for k, v in (config.get("rank_pattern") or {}).items() if v != r}
    odd_alpha = {k: v for k, v in (config.get("alpha_pattern") or {}).items() if v != alpha}
    if odd_rank or odd_alpha:
        raise ValueError(
            f"{where}: per-module rank_pattern {odd_rank} / alpha_pattern {odd_alpha}; an mlx-lm "
            "adapter has one rank and one scale for all modules. Merge it with PEFT "
            "(merge_and_unload) or train it again with a single r and lora_alpha."
        )


def _check_pairs(adapter: Adapter, path: Path) -> None:
    if set(adapter.lora_a) != set(adapter.lora_b) or not adapter.lora_a:
        odd = sorted(set(adapter.lora_a) ^ set(adapter.lora_b))
        raise ValueError(f"{path}: every module needs both LoRA factors; unpaired: {odd[:3]}")
    for p in adapter.modules:
        a, b = adapter.lora_a[p], adapter.lora_b[p]
        if a.shape[1] != adapter.rank or b.shape[0] != adapter.rank:
            raise ValueError(
                f"{path}: {p} has factors {tuple(a.shape)} x {tuple(b.shape)}, not rank "
                f"{adapter.rank}"
            )


def _set_factors(module: LoRALinear, path: str, a: mx.array, b: mx.array) -> None:
    in_dims, out_dims = module.in_out
    if a.shape != (in_dims, module.lora_a.shape[1]) or b.shape[1] != out_dims:
        raise ValueError(
            f"adapter factors for {path} have shapes {tuple(a.shape)} and {tuple(b.shape)}, "
            f"but the layer maps {in_dims} -> {out_dims}; is it for another model?"
        )
    module.lora_a = a.astype(mx.float32) if a.dtype != mx.float32 else a
    module.lora_b = b.astype(mx.float32) if b.dtype != mx.float32 else b


def _atomic_save(path: Path, weights: dict[str, mx.array], metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), weights, metadata=metadata or {})
        os.replace(tmp, path)  # replaces a symlink at `path` rather than writing through it
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class AdapterSet:
    """Several adapters on one base model, switched without reloading the base.

    Example:
        >>> lm = load_model("Qwen/Qwen3-0.6B")
        >>> adapters = AdapterSet(lm.model)
        >>> adapters.add("math", "runs/gsm8k")
        >>> adapters.add("format", "runs/format")
        >>> adapters.use("math")      # math adapter on
        >>> adapters.use(None)        # the base model
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.active: str | None = None

    def add(self, name: str, adapter: Adapter | str | Path) -> None:
        adapter = adapter if isinstance(adapter, Adapter) else Adapter.load(adapter)
        modules = dict(self.model.named_modules())
        new = [p for p in adapter.modules if not isinstance(modules.get(p), LoRALinear)]
        if new:
            wrap_modules(self.model, new, adapter.rank, adapter.scale)
        self.adapters[name] = adapter
        self.use(self.active)

    def use(self, name: str | None) -> None:
        """Switch to adapter `name`, or to the base model with None."""
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; have {sorted(self.adapters)}")
        adapter = self.adapters.get(name) if name else None
        for path, module in self.model.named_modules():
            if not isinstance(module, LoRALinear):
                continue
            module.enabled = adapter is not None and path in adapter.lora_a
            if module.enabled:
                module.lora_a, module.lora_b = adapter.lora_a[path], adapter.lora_b[path]
                module.scale = adapter.scale
        self.active = name


def load_adapted(
    model: str, adapter: str | Path | None, dtype: str = "auto"
) -> tuple[LoadedModel, Adapter | None]:
    """The model, with the adapter of a run, mlx-lm or PEFT folder attached when one is given."""
    lm = load_model(model, dtype)
    loaded = Adapter.load(adapter) if adapter else None
    if loaded is not None:
        loaded.attach(lm.model)
    return lm, loaded
