"""Attacks on ``public_base``: ways a protected parameter could be called public.

* ``public_base: peft`` (the ``private_finetune`` default) protects what peft names an
  adapter: every peft method's names, not only LoRA's (LoHa's ``hada_*``, LoKr's ``lokr_*``,
  trainable tokens' ``trainable_tokens_delta`` were public, and a LoKr adapter's weights sat
  in a GPU stage in the clear);
* a base folder makes public only what is bit-identical: ``-0.0`` is not ``0.0`` (its sign
  bit would reach the GPU), though ``torch.equal`` says they are equal;
* a malformed sharded index is a :class:`PolicyError` naming the index, not a ``TypeError``;
* (stop 53, a review's findings) under ``peft``, an adapter merged into its base layer, biases
  peft trains and a weight unfrozen beside the adapter each put fine-tuned values on the GPU;
  a fine-tuned weight held as a buffer or a lifted constant was not a weight at all; a name in
  two of a base folder's files let the later one decide; the plan carried the base's path.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from models import tiny_llama
from safetensors.torch import save_file

from partitioner.api import partition
from partitioner.capturing import capture
from partitioner.errors import AuditError, PolicyError
from partitioner.plan import GPU
from partitioner.policy import Policy
from partitioner.public_base import is_adapter_parameter, peft_caveats, split_parameters
from passes.audit import audit
from passes.base import model_weights, weight_value


def peft_program(config: object) -> object:
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(num_hidden_layers=1), config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, capture(model).program


def trained(model: torch.nn.Module) -> list[str]:
    return [
        n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad
    ]


def private_split(model: torch.nn.Module) -> object:
    """``model`` partitioned under ``private_finetune`` (export's warnings hushed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return partition(model, Policy.preset("private_finetune"))


def finetuned_split(config: object, part: str, change, seed: int | None = None) -> object:
    """A one-layer tiny Llama under peft ``config``, every parameter whose name holds ``part``
    changed in place by ``change`` (``seed`` set after the model is built), partitioned under
    ``private_finetune``."""
    model, _ = peft_program(config)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if part in name:
                change(param)
    return private_split(model)


@pytest.mark.parametrize("method", ["loha+modules_to_save", "lora+trainable_tokens"])
def test_every_peft_methods_adapter_is_protected(method):
    from peft import LoHaConfig, LoraConfig

    if method == "loha+modules_to_save":
        config = LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    else:
        config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2, 3])
    model, program = peft_program(config)
    split = split_parameters(program, "peft")
    params = set(program.graph_signature.inputs_to_parameters.values())
    secret = [n for n in trained(model) if n in params]
    assert any("hada_" in n or "trainable_tokens_" in n for n in secret), secret
    assert not set(secret) & set(split.public), sorted(set(secret) & set(split.public))


def test_a_lokr_adapter_stays_off_the_gpu():
    """End to end: LoKr's ``lokr_w2_*`` were public, so the GPU stage computed the adapter's
    delta weight from them in the clear (and the audit passed)."""
    from peft import LoKrConfig

    config = LoKrConfig(r=2, target_modules=["up_proj"], modules_to_save=["lm_head"])
    model, _ = peft_program(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition(model, Policy.preset("private_finetune", integrity="none"))
    on_gpu = {p for s in split.stages if s.side == GPU for p in s.params}
    assert not on_gpu & set(split.parameters.protected)
    assert not [p for p in on_gpu if "lokr_" in p]


def test_the_installed_pefts_adapter_names_are_all_adapters():
    from peft.tuners.tuners_utils import BaseTunerLayer

    def subclasses(cls):
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    names = {n for c in subclasses(BaseTunerLayer) for n in getattr(c, "adapter_layer_names", ())}
    assert names
    missed = sorted(n for n in names if not is_adapter_parameter(f"model.q_proj.{n}.default"))
    assert not missed


@functools.cache
def plain_model() -> torch.nn.Module:
    return tiny_llama(num_hidden_layers=1)


def test_negative_zero_is_not_bit_identical_to_zero(tmp_path):
    model = plain_model()
    name = "model.layers.0.mlp.up_proj.weight"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state[name][0, 0] = 0.0
    save_file(state, str(tmp_path / "model.safetensors"))
    with torch.no_grad():  # the fine-tune: one sign bit, of a zero
        model.get_parameter(name)[0, 0] = -0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = capture(model).program
    split = split_parameters(program, str(tmp_path))
    assert name in split.protected and split.why[name].startswith("differs from the base")
    assert "model.layers.0.mlp.down_proj.weight" in split.public


@pytest.mark.parametrize("entry", [None, 5, ""])
def test_a_sharded_index_naming_no_file_is_a_policy_error(tmp_path, entry):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": entry}})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = capture(plain_model()).program
    with pytest.raises(PolicyError, match=r"model\.safetensors\.index\.json"):
        split_parameters(program, str(tmp_path))


def test_audit_finds_a_flattened_copy_of_a_protected_parameter_on_the_gpu():
    """The by-value search matched shapes (and the transpose's): a tampered GPU stage holding
    a protected weight quantised and flattened to one row passed the audit."""
    from peft import LoraConfig

    split = finetuned_split(
        LoraConfig(r=4, target_modules=["q_proj"]), "lora_B", torch.nn.init.normal_
    )
    protected = next(f for f in split.parameters.protected if "lora_B" in f)
    stolen = _int8(split.source.state_dict[protected]).flatten()
    gpu = next(s for s in split.stages if s.side == GPU)
    gpu.module.register_buffer("innocent_looking", stolen)
    with pytest.raises(AuditError, match="by value"):
        audit(split, verbose=False)


@functools.cache
def _trained_split() -> object:
    from peft import LoraConfig

    config = LoraConfig(r=8, target_modules=["q_proj", "up_proj"])
    return finetuned_split(config, "lora_B", torch.nn.init.normal_, seed=3)


def _int8(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t / t.abs().max() * 127).to(torch.int8)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_learned_prompt_is_refused_not_dropped(method):
    """peft's prompt learning adds its virtual tokens in the wrapper's forward, which capture
    unwraps: the captured program was the bare base, the fine-tune silently gone (a review's
    finding)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from partitioner.errors import CaptureError

    kind = PromptTuningConfig if method == "prompt" else PrefixTuningConfig
    model = get_peft_model(
        tiny_llama(num_hidden_layers=1), kind(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    with pytest.raises(CaptureError, match="learn a prompt"):
        capture(model.eval())


@pytest.mark.parametrize("swap", ["merged", "permuted"])
def test_audit_refuses_a_gpu_weight_no_public_parameter_explains(swap):
    """What no search for copies finds: the GPU's ring weight for q_proj replaced by the
    quantised merged weight ``W + s·BA`` (what merging the adapter did before stop 53), or by
    its own rows permuted. Under a public base every GPU weight must be recomputable from
    a public parameter (a review's finding: both passed the audit)."""
    from passes.exact import quantise_weight

    split = _trained_split()
    gpu = next(s for s in split.stages if s.side == GPU and s.module.state_dict())
    name, held = next((k, v) for k, v in gpu.module.state_dict().items() if v.dim() == 2)
    sd = split.source.state_dict
    base = next(k for k in sd if k.endswith("q_proj.base_layer.weight"))
    lora_a = sd[base.replace("base_layer.weight", "lora_A.default.weight")]
    lora_b = sd[base.replace("base_layer.weight", "lora_B.default.weight")]
    assert torch.equal(held, quantise_weight(sd[base])[0])  # the honest one
    if swap == "merged":
        forged = quantise_weight(sd[base] + 2.0 * lora_b @ lora_a)[0]
    else:
        forged = held[torch.randperm(held.shape[0], generator=torch.Generator().manual_seed(0))]
    try:
        setattr(gpu.module, name, forged)
        with pytest.raises(AuditError, match="neither a public parameter nor"):
            audit(split, verbose=False)
    finally:
        setattr(gpu.module, name, held)
    audit(split, verbose=False)


def test_audit_refuses_a_shifted_slice_of_a_protected_vector_under_a_public_base():
    """A fine-tuned norm's values, a few dropped and rescaled, in a GPU stage: no row of the
    search is aligned with them (a review's finding), but under a public base nothing on the
    GPU may be other than a public parameter or its quantisation."""
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"])
    split = finetuned_split(config, "modules_to_save", lambda p: p.add_(torch.randn_like(p) * 0.1))
    norm = next(f for f in split.parameters.protected if "modules_to_save" in f)
    stolen = split.source.state_dict[norm].detach()[3:40] * 2
    gpu = next(s for s in split.stages if s.side == GPU)
    audit(split, verbose=False)
    gpu.module.register_buffer("innocent_looking", stolen)
    try:
        with pytest.raises(AuditError, match="neither a public parameter nor"):
            audit(split, verbose=False)
    finally:
        del gpu.module.innocent_looking


def test_the_plan_the_gpu_host_reads_does_not_depend_on_the_adapter():
    """OFT under ``on_unmaskable="enclave"``: the base layers' GPU input is the rotated
    ``x R``, not row-scaled, so its fixed-point scale was calibrated on the fine-tuned model
    and the plan (``plan.json``, which the GPU host reads) carried it: frac_bits 9, 7 and 0
    for three rotations (a review's finding). Under a public base a value a protected
    parameter shaped is not calibrated."""
    import peft

    plans = []
    for scale in (0.01, 3.0):
        model = peft.get_peft_model(
            tiny_llama(num_hidden_layers=1),
            peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "up_proj"]),
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            split = partition(
                model.eval(), Policy.preset("private_finetune", on_unmaskable="enclave")
            )
        plans.append(split.protection.exact.to_dict())
    assert plans[0]["frac_bits"]  # the edges the leak was on
    assert plans[0] == plans[1]


@pytest.mark.parametrize("rank", [4, 8])
def test_audit_finds_a_narrow_adapter_weight_quantised_per_channel(rank):
    """``lora_B`` (out x r) quantised per output channel, as the exact pass quantises a GPU
    weight: the whole tensor correlated ~0.92 (every row has its own scale), its rows are
    narrower than the row search's 16 and its columns are no affine copies, so the audit
    passed it at peft's default rank (a review's finding)."""
    from peft import LoraConfig

    from passes.exact import quantise_weight

    torch.manual_seed(rank)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj"])
    split = finetuned_split(config, "lora_B", lambda p: p.normal_(std=0.05))
    lora_b = next(f for f in split.parameters.protected if "lora_B" in f)
    stolen, _ = quantise_weight(split.source.state_dict[lora_b].detach())
    gpu = next(s for s in split.stages if s.side == GPU)
    for layout in (stolen, stolen.t().contiguous()):
        gpu.module.register_buffer("_exact_linear_99_weight", layout)
        try:
            with pytest.raises(AuditError, match="by value"):
                audit(split, verbose=False)
        finally:
            del gpu.module._exact_linear_99_weight


@pytest.mark.parametrize("hiding", ["rows", "columns", "inside a public weight", "one row"])
def test_audit_finds_part_of_a_protected_parameter_on_the_gpu(hiding):
    """The by-value search compared whole tensors: a GPU stage holding some rows or columns
    of a protected weight, quantised, alone or stacked under a public weight the stage
    holds anyway (as a fused projection would), passed the audit."""
    split = _trained_split()
    gpu = next(s for s in split.stages if s.side == GPU and s.module.state_dict())
    lora_a = next(f for f in split.parameters.protected if "up_proj.lora_A" in f)
    lora_b = next(f for f in split.parameters.protected if "q_proj.lora_B" in f)
    a, b = (split.source.state_dict[f].detach() for f in (lora_a, lora_b))
    public = next(v for v in gpu.module.state_dict().values() if v.dim() == 2)
    if hiding == "rows":
        stolen = _int8(a[:3])
    elif hiding == "columns":
        stolen = _int8(b[:, 2:5]).t().contiguous()
    elif hiding == "one row":
        stolen = _int8(a[5])
    else:
        assert public.shape[1] == a.shape[1], (public.shape, a.shape)
        stolen = torch.cat([public.double(), a[:2].double() * 1000]).to(public.dtype)
    try:
        gpu.module.register_buffer("innocent_looking", stolen)
        with pytest.raises(AuditError, match="by value"):
            audit(split, verbose=False)
    finally:
        del gpu.module.innocent_looking
    audit(split, verbose=False)  # the honest split passes


def _lora_on_up_proj(**extra: object) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(num_hidden_layers=1),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], **extra),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model.eval()


def test_a_merged_adapter_is_not_taken_for_the_public_base():
    """peft's ``merge_adapter()`` (what TRL calls before generating) adds B·A into the base
    layer's weight and keeps the ``lora_*`` modules: under ``public_base: peft`` the merged
    weight kept its public name, went to a GPU stage, and a GPU knowing the base read the
    private update off it (correlation 0.92, a reviewer's finding)."""
    model = _lora_on_up_proj()
    model.merge_adapter()
    with warnings.catch_warnings(), pytest.raises(PolicyError, match="merged into"):
        warnings.simplefilter("ignore")
        partition(model, Policy.preset("private_finetune"))


def test_biases_that_peft_trains_are_not_public():
    """``LoraConfig(bias="all")`` trains every bias under the base's own names: under
    ``public_base: peft`` they were listed public and, with float masks, their bytes were in
    ``gpu/``. Refused with the config (the names cannot tell); the resolver alone (given the
    program) also protects them by their ``requires_grad``, while peft leaves them trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(
        Qwen2ForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"], bias="all")
    ).eval()
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.k_proj.bias.add_(0.5)  # "trained"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PolicyError, match="trains biases"):
            partition(model, Policy.preset("private_finetune"))
        program = capture(model).program
    split = split_parameters(program, "peft")
    biases = [f for f in program.graph_signature.inputs_to_parameters.values() if "bias" in f]
    assert biases and not set(biases) & set(split.public), sorted(set(biases) & set(split.public))


class _BufferLinear(torch.nn.Module):
    """A fine-tuned linear layer whose weight is a buffer (as quantised checkpoints keep
    theirs) or a plain tensor attribute (which torch.export lifts as a constant)."""

    def __init__(self, weight: torch.Tensor, kind: str) -> None:
        super().__init__()
        if kind == "buffer":
            self.register_buffer("weight", weight)
        else:
            self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


@pytest.mark.parametrize("kind", ["buffer", "constant"])
def test_a_fine_tuned_weight_held_as_a_buffer_stays_in_the_enclave(tmp_path, kind):
    """Under ``protects: [model]`` only parameters were weights: a fine-tuned ``down_proj``
    held as a buffer or a lifted constant was in neither list of the report, its linear went
    to the GPU, and its (quantised) copy was in ``gpu/``; the audit passed."""
    base = tiny_llama(num_hidden_layers=1)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "b.safetensors")
    model = tiny_llama(num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    secret = mlp.down_proj.weight.detach() + 0.05 * torch.randn_like(mlp.down_proj.weight)
    mlp.down_proj = _BufferLinear(secret.contiguous(), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition(
            model, Policy.preset("private_finetune", public_base=str(tmp_path / "b.safetensors"))
        )
    _secret_stays_in_the_enclave(split, secret)


def _secret_stays_in_the_enclave(split: object, secret: torch.Tensor) -> list[str]:
    """The weights holding ``secret`` (a fine-tuned ``down_proj``) are protected, and no GPU
    stage holds them or computes ``down_proj``. Returns their names."""
    source = split.source
    held = [
        fqn
        for fqn in model_weights(source).values()
        if (value := weight_value(source, fqn)) is not None and torch.equal(value, secret)
    ]
    assert held and set(held) <= set(split.parameters.protected), (held, split.parameters)

    def in_down_proj(node: torch.fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any("down_proj" in str(path) for path, _ in stack.values())

    for stage in split.stages:
        if stage.side == GPU:
            assert not set(held) & set(stage.params), stage.name
            down = [n.name for n in stage.module.graph.nodes if in_down_proj(n)]
            assert not down, f"GPU stage {stage.name} computes down_proj: {down}"
    return held


def test_a_name_in_two_of_the_bases_files_is_refused(tmp_path):
    """Without an index every ``*.safetensors`` of the folder is read: a stray file holding a
    fine-tuned tensor under a base name replaced the base's value, silently making it
    "public"."""
    from peft import LoraConfig

    state = {k: v.contiguous() for k, v in plain_model().state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    name = next(iter(state))
    save_file({name: state[name] + 1}, tmp_path / "zz-finetune.safetensors")
    _, program = peft_program(LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(PolicyError, match="in an earlier file"):
        split_parameters(program, str(tmp_path))


def test_the_plan_names_the_base_without_the_deployers_path(tmp_path):
    """The plan goes to the GPU's side too: it recorded the base folder's absolute path."""
    policy = Policy.preset("private_finetune", public_base=str(tmp_path / "bases" / "smol"))
    assert policy.to_dict()["public_base"] == "smol"
    assert Policy.preset("private_finetune").to_dict()["public_base"] == "peft"


def test_a_base_weight_trained_beside_the_adapter_is_not_public():
    """A layer unfrozen by hand and tuned with the adapter keeps its base name: under ``peft``
    it was public and its int16 copy reached ``gpu/`` (the private update recovered at
    correlation 0.99). peft freezes its base, so a trainable one is protected."""
    model = _lora_on_up_proj()
    down = model.base_model.model.model.layers[0].mlp.down_proj.weight
    down.requires_grad_(True)
    with torch.no_grad():
        down.add_(0.05 * torch.randn_like(down))
    split = private_split(model)
    fqn = next(f for f in split.parameters.protected if f.endswith("mlp.down_proj.weight"))
    assert split.parameters.why[fqn].startswith("trainable")
    assert not any(fqn in s.params for s in split.stages if s.side == GPU)


def test_peft_is_refused_for_an_exported_program():
    """The refusals above read the peft model; given its exported program instead, a merged
    adapter's weight was public again (a second review's finding)."""
    model = _lora_on_up_proj()
    model.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = capture(model).program
        with pytest.raises(PolicyError, match="needs the peft model"):
            partition(program, Policy.preset("private_finetune"))


def test_a_base_name_that_two_tensors_could_match_is_refused(tmp_path):
    """Matching takes the longest dotted suffix: a stray file naming ``model.embed_tokens.weight``
    beside the base's ``embed_tokens.weight`` decided which value was "the base's" (a second
    review's finding)."""
    # the base saved from the inner model (no ``model.`` prefix), as a wrapper's names have one
    # more prefix than the base's (DecoderStep's); the stray file has the longer name
    inner = plain_model().state_dict().items()
    state = {k.removeprefix("model."): v.contiguous() for k, v in inner}
    save_file(state, tmp_path / "model.safetensors")
    embed = state["embed_tokens.weight"]
    save_file({"model.embed_tokens.weight": embed + 0.1}, tmp_path / "zz.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(plain_model())
    with pytest.raises(PolicyError, match="both name"):
        split_parameters(captured.program, str(tmp_path))


@pytest.mark.parametrize("where", [".", "/"])
def test_a_plan_names_any_base_and_loads_back(where):
    policy = Policy.preset("private_finetune", public_base=where)
    name = policy.to_dict()["public_base"]
    assert name and "/" not in name
    assert Policy.from_dict(policy.to_dict(), source="plan").to_dict() == policy.to_dict()


class _NotCapturable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("captured: the base's path was not checked first")


def test_a_wrong_base_path_is_named_before_the_model_is_captured(tmp_path):
    """A mistyped ``public_base`` was named only after capture: minutes for a large model."""
    policy = Policy.preset("private_finetune", public_base=str(tmp_path / "no-such-base"))
    with pytest.raises(PolicyError, match="does not exist"):
        partition(_NotCapturable(), policy, (torch.zeros(2),))


@pytest.mark.parametrize("kind", ["buffer", "constant"])
def test_under_peft_a_weight_held_as_a_buffer_is_not_public(kind):
    """``public_base: peft`` makes the base model's *parameters* public by their names. A
    buffer or a lifted constant is no parameter, and nothing in peft's names says whether
    the fine-tune changed it: a fine-tuned ``down_proj`` held as a buffer (as quantised
    checkpoints hold weights) was public, its linear went to the GPU and its quantised copy
    with it. Under ``peft`` they are protected (a base folder or file shows them by value)."""
    model = _lora_on_up_proj()
    mlp = model.base_model.model.model.layers[0].mlp
    secret = mlp.down_proj.weight.detach() + 0.05 * torch.randn_like(mlp.down_proj.weight)
    mlp.down_proj = _BufferLinear(secret.contiguous(), kind)
    split = private_split(model)
    held = _secret_stays_in_the_enclave(split, secret)
    assert all("not a parameter" in split.parameters.why[f] for f in held)


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_an_initialisation_that_rewrites_the_base_weight_is_refused(init):
    """Some of peft's LoRA initialisations (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) move part of
    the base weight into the adapter: ``W_res = W - scaling B0 A0`` replaces the base layer's
    weight, under the base's name and frozen. Under ``public_base: peft`` that weight was
    public and went to the GPU, where ``W - W_res`` (for LoRA-GA and CorDA, derived from the
    fine-tuning data) follows from the public base. Refused, as a merged adapter is."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(num_hidden_layers=1)
    before = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=init)
    ).eval()
    after = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    assert not torch.equal(after, before)  # the base layer's weight is no longer the base's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PolicyError, match="init_lora_weights"):
            partition(model, Policy.preset("private_finetune"))


def test_initialisations_that_keep_the_base_weight_are_accepted():
    """The default and ``gaussian`` initialisations leave the base layer's weight alone."""
    from peft import LoraConfig, get_peft_model

    for init in (True, "gaussian"):
        model = get_peft_model(
            tiny_llama(num_hidden_layers=1),
            LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=init),
        ).eval()
        assert not peft_caveats(model), init
