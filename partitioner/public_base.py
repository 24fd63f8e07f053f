"""Which parameters are public: the policy's ``public_base`` resolved against a captured model.

``protects: [model]`` protects every parameter unless the policy names a public base:

* a transformers folder (its ``*.safetensors`` files, sharded or not) or one ``.safetensors``
  file: a parameter is public only if the base holds a tensor of the same name (after peft's
  wrapper names are taken off) that is **bit-identical** to it (same dtype, shape and bytes).
  Anything the fine-tune changed, and anything the base lacks, stays protected.
* ``"peft"``: the model is a peft model; the adapter's parameters (peft's ``lora_*``,
  ``modules_to_save``, ... names) are protected, the frozen base's parameters are public. This
  trusts peft's naming, so it is refused where the names cannot tell what changed
  (:func:`peft_caveats`: an adapter merged into its base layer, biases peft trains, an
  initialisation that rewrites the base layer's weight, such as PiSSA's), and a
  parameter still trainable (``requires_grad``: tuned beside the adapter) is protected, as is
  every buffer and lifted constant (peft's names speak of parameters only). What names cannot
  show stays public under ``"peft"``: a base parameter changed and then frozen (trained and
  ``requires_grad_(False)``, edited in place, a module swapped for a frozen copy). A base
  folder or file checks by value and has none of these gaps.

"Parameters" here are all of the model's tensors: parameters, buffers and the constants
export lifts (``passes.base.model_weights``); a fine-tuned weight held as a buffer is a
weight like any other.

Only safetensors is read: a pickle (``pytorch_model.bin``) can run code and is refused.
Compiler side: the enclave runtime never imports this module.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.export import ExportedProgram

from partitioner.errors import PolicyError
from passes.base import model_weights, weight_value

# name components that peft gives adapter parameters (and the trained copies of whole modules):
# every tuner's prefix as of peft 0.21 (LoHa's ``hada_``, LoKr's ``lokr_``, trainable tokens'
# ``trainable_tokens_`` ...; a missing one made that adapter public under ``"peft"``), and
# those of the installed peft are added (:func:`_adapter_markers`)
ADAPTER_MARKERS = (
    "lora_",
    "modules_to_save",
    "ia3_",
    "vera_",
    "pvera_",
    "oft_",
    "boft_",
    "hra_",
    "hada_",
    "lokr_",
    "poly_",
    "adaption_",
    "prompt_encoder",
    "prefix_encoder",
    "ln_tuning_",
    "fourierft_",
    "vblora_",
    "trainable_tokens_",
    "internal_xlora_classifier",
    "adamss_",
    "beft_",
    "c3a_",
    "deft_",
    "delora_",
    "frod_",
    "glora_",
    "gralora_",
    "hira_",
    "lily_",
    "miss_",
    "osf_",
    "peanut_",
    "psoft_",
    "randlora_",
    "road_",
    "shadow_",
    "shira_",
    "supertuning_",
    "tinylora_",
    "unilora_",
    "waveft_",
)
# wrapper components peft inserts around a base module's own parameters
_WRAPPERS = frozenset({"base_layer", "original_module"})


@dataclass
class ParameterSplit:
    """The model's parameters, public (bit-identical to the base) or protected, with bytes."""

    source: str  # "peft", or the base's path
    public: dict[str, int] = field(default_factory=dict)  # fqn -> bytes
    protected: dict[str, int] = field(default_factory=dict)  # fqn -> bytes
    why: dict[str, str] = field(default_factory=dict)  # protected fqn -> why not public

    def describe(self) -> dict[str, object]:
        return {
            "public_base": self.source,
            "public_bytes": sum(self.public.values()),
            "protected_bytes": sum(self.protected.values()),
            "public": dict(sorted(self.public.items())),
            "protected": {k: [v, self.why.get(k, "")] for k, v in sorted(self.protected.items())},
        }


@functools.cache
def _adapter_markers() -> tuple[str, ...]:
    """``ADAPTER_MARKERS`` and the prefixes and adapter attribute names of every tuner the
    installed peft defines: a tuner added after this list was written is still protected."""
    markers = set(ADAPTER_MARKERS)
    try:
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    except Exception:  # no peft (or a broken one): the list above
        return ADAPTER_MARKERS

    def subclasses(cls: type) -> list[type]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    for cls in subclasses(BaseTuner):
        prefix = getattr(cls, "prefix", None)
        if isinstance(prefix, str) and prefix:
            markers.add(prefix)
    for cls in subclasses(BaseTunerLayer):
        names = getattr(cls, "adapter_layer_names", ())
        markers.update(n for n in names if isinstance(n, str) and n)
    return tuple(sorted(markers))


def is_adapter_parameter(fqn: str) -> bool:
    markers = _adapter_markers()
    return any(part.startswith(markers) for part in fqn.split("."))


def base_name(fqn: str) -> str:
    """``fqn`` without peft's wrapper components (``base_layer``, ``original_module``)."""
    return ".".join(part for part in fqn.split(".") if part not in _WRAPPERS)


# peft's LoRA initialisations that leave the base layer's weight as it was (peft 0.21); the
# others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, and any added later) replace it with a residual
# ``W - scaling B0 A0`` (LoftQ: its quantisation) under the base's name
_KEEPS_BASE = frozenset({"gaussian", "eva", "orthogonal", "mica"})


def peft_caveats(model: torch.nn.Module) -> tuple[str, ...]:
    """Why peft's names would not tell what the fine-tune of ``model`` changed (empty: they
    do), read off the model before capture: an adapter merged into its base layer (peft's
    ``merge_adapter``: the layer's weight is then the fine-tuned one, under the base's name),
    or a config that trains biases (``bias`` other than ``"none"``: they keep their names), or
    one whose initialisation rewrites the base layer's weight (below)."""
    found: list[str] = []
    for name, module in model.named_modules():
        merged = getattr(module, "merged_adapters", None)
        if isinstance(merged, (list, tuple)) and merged:
            found.append(
                f"adapter {merged[0]!r} is merged into {name or 'the model'} "
                "(peft's merge_adapter; unmerge_adapter() undoes it)"
            )
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict):
            for adapter, config in configs.items():
                bias = getattr(config, "bias", "none")
                if bias not in (None, "none"):
                    found.append(
                        f"adapter {adapter!r} trains biases (bias={bias!r}), which keep the "
                        "base's names"
                    )
                init = getattr(config, "init_lora_weights", True)
                if isinstance(init, str) and init.lower() not in _KEEPS_BASE:
                    found.append(
                        f"adapter {adapter!r} has init_lora_weights={init!r}, which rewrites "
                        "the base layer's weight under its name"
                    )
    return tuple(dict.fromkeys(found))


def split_parameters(program: ExportedProgram, public_base: str | None) -> ParameterSplit | None:
    """Public and protected weights of ``program`` under ``public_base`` (None: no base)."""
    if public_base is None:
        return None
    weights = {fqn: weight_value(program, fqn) for fqn in model_weights(program).values()}
    out = ParameterSplit(source=public_base)
    if public_base == "peft":
        if not any(is_adapter_parameter(fqn) for fqn in weights):
            raise PolicyError(
                "public_base='peft' but the model has no peft adapter parameters (lora_*, "
                "modules_to_save, ...): name the base's folder or safetensors file instead"
            )
        parameters = set(program.graph_signature.inputs_to_parameters.values())
        for fqn, tensor in weights.items():
            nbytes = _nbytes(tensor)
            if is_adapter_parameter(fqn):
                out.protected[fqn] = nbytes
                out.why[fqn] = "a peft adapter parameter"
            elif fqn not in parameters:
                # peft's names speak of parameters only: a buffer or a constant the fine-tune
                # changed (a weight held as a buffer, as quantised checkpoints hold theirs)
                # keeps its base name, so only its value could show it is the base's
                out.protected[fqn] = nbytes
                out.why[fqn] = (
                    "not a parameter: peft's names do not show whether the fine-tune changed "
                    "it (a base folder or file compares it by value)"
                )
            elif tensor is None or tensor.requires_grad:
                # peft freezes its base: one still trainable was tuned beside the adapter
                # (a bias peft trains, a layer unfrozen by hand) under the base's own name
                out.protected[fqn] = nbytes
                out.why[fqn] = (
                    "no value to show it is the base's"
                    if tensor is None
                    else "trainable (requires_grad) beside the adapter"
                )
            else:
                out.public[fqn] = nbytes
        return out
    base = _load_base(Path(public_base))
    for fqn, tensor in weights.items():
        nbytes = _nbytes(tensor)
        match = _match(base_name(fqn), base)
        if is_adapter_parameter(fqn):
            reason = "a peft adapter parameter"
        elif match is None:
            reason = "the base has no parameter of this name"
        elif tensor is None:
            reason = "no value to show it is the base's"
        elif not _identical(tensor, base[match]):
            reason = f"differs from the base's {match}" + (
                f" (dtype {str(tensor.dtype).removeprefix('torch.')}, the base's "
                f"{str(base[match].dtype).removeprefix('torch.')})"
                if tensor.dtype != base[match].dtype
                else ""
            )
        else:
            out.public[fqn] = nbytes
            continue
        out.protected[fqn] = nbytes
        out.why[fqn] = reason
    return out


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device.type == "meta":
        return False  # a meta tensor has no values to compare: not shown public
    # bytes, not values: torch.equal holds for -0.0 and 0.0 (whose sign bit would reach the
    # GPU) and fails for the same NaN
    return torch.equal(_bytes(a.detach().cpu()), _bytes(b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _match(name: str, base: dict[str, torch.Tensor]) -> str | None:
    """The longest dotted suffix of ``name`` that is a key of ``base`` (a wrapper such as
    ``DecoderStep`` or peft's ``base_model.model`` adds prefixes; the base's own names are
    what is left)."""
    parts = name.split(".")
    keys = [k for i in range(len(parts) - 1) if (k := ".".join(parts[i:])) in base]
    if len(keys) > 1:  # two base tensors could be this one: which is "the base's" is unclear
        raise PolicyError(f"public_base: {keys[0]} and {keys[1]} both name {name}")
    return keys[0] if keys else None


def base_files(public_base: str) -> list[Path]:
    """The safetensors files of a base path (a folder's, through its index where it has one,
    or the file itself), each inside the folder; :class:`PolicyError` naming what is wrong.
    Reads no tensor: ``partition`` asks before capture, so a mistyped path is named in
    seconds, not after a large model is exported."""
    path = Path(public_base)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                bad = [f for f in files if not isinstance(f, str) or not f]
                if bad:  # json allows null or a number where a file name belongs
                    raise ValueError(f"weight_map names {bad[0]!r}, not a file name")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise PolicyError(f"public_base: cannot read {index}: {exc}") from None
            paths = [path / f for f in files]
        else:
            paths = sorted(path.glob("*.safetensors"))
        if not paths:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
                p.name for p in path.glob("*.pt")
            )
            hint = f" ({pickles[0]} is a pickle, which can run code: not read)" if pickles else ""
            raise PolicyError(f"public_base: {path} holds no .safetensors file{hint}")
    elif path.is_file() and path.suffix == ".safetensors":
        paths = [path]
    elif path.exists():
        raise PolicyError(f"public_base: {path} is neither a folder nor a .safetensors file")
    else:
        raise PolicyError(f"public_base: {path} does not exist")
    for p in paths:
        if p.parent.resolve() != path.resolve() and path.is_dir():
            raise PolicyError(f"public_base: {p} lies outside {path}")
    return paths


def _load_base(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the base: a ``.safetensors`` file, or a folder's safetensors files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    base: dict[str, torch.Tensor] = {}
    for p in base_files(str(path)):
        try:
            tensors = load_file(str(p))
        except (OSError, SafetensorError) as exc:
            raise PolicyError(f"public_base: cannot read {p}: {exc}") from None
        twice = sorted(base.keys() & tensors.keys())
        if twice:  # a later file would decide silently which value is "the base's"
            raise PolicyError(f"public_base: {twice[0]} is in {p} and in an earlier file")
        base.update(tensors)
    if path.is_dir():
        _tie_output_embedding(path, base)
    return base


# the input embeddings a tied output layer shares, by transformers' names
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _tie_output_embedding(folder: Path, base: dict[str, torch.Tensor]) -> None:
    """A transformers folder whose ``config.json`` ties the word embeddings stores the output
    layer once, as the input embedding: ``lm_head.weight`` is that tensor."""
    config = folder / "config.json"
    if "lm_head.weight" in base or not config.is_file():
        return
    try:
        tied = json.loads(config.read_text(encoding="utf-8")).get("tie_word_embeddings")
    except (OSError, ValueError, AttributeError) as exc:
        raise PolicyError(f"public_base: cannot read {config}: {exc}") from None
    embeddings = [k for k in base if k.endswith(_EMBEDDINGS)]
    if tied is True and len(embeddings) == 1:
        base["lm_head.weight"] = base[embeddings[0]]
