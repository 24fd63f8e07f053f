"""A public base on the GPU, the private fine-tune in the enclave (``public_base``).

What is public is stated in the policy and checked by value; everything else of a protected
model stays in the enclave. The attacks:

* a tampered split whose GPU stage holds a copy of a protected parameter (even quantised) is
  refused by the audit, and no tensor in a saved bundle's ``gpu/`` equals one;
* two different adapters on the same base, same prompts: what each GPU stage receives and
  returns cannot be told apart under exact masks (and can under float masks: the test has
  power);
* the extraction attack a GPU can mount with the base's weights and everything it received:
  regress what the attention output projection receives on what the q/k/v projections
  received (one-token prompts: attention returns v) to fit ``W_v + ΔW``, subtract the public
  ``W_v``. Under float masks it recovers the adapter; under exact masks it does no better than
  guessing zero.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from conftest import model_output
from models import tiny_llama_lora
from safetensors.torch import load_file, save_file
from scipy import stats

from enclave_runtime.executor import Executor, InProcessRunner
from partitioner.api import partition
from partitioner.capturing import capture
from partitioner.errors import AuditError, PolicyError
from partitioner.plan import ENCLAVE, GPU
from partitioner.policy import Policy
from partitioner.public_base import base_name, split_parameters
from passes.audit import audit
from passes.base import model_weights, weight_value
from passes.exact import quantised_reference

ALPHA = 0.001
VOCAB = 256


def adapted(seed: int, std: float = 0.05) -> torch.nn.Module:
    """tiny-llama with a LoRA adapter (q, v, gate, down) whose A and B matrices are drawn
    with ``seed``: the same public base, a different private fine-tune per seed (peft draws
    A from the global generator: redrawn here so that two builds are the same model)."""
    model = tiny_llama_lora()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model.eval()


@functools.cache
def captured_adapter(seed: int, std: float = 0.05) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture(adapted(seed, std), model_name=f"tiny-llama-lora-{seed}")


def split_of(seed: int, std: float = 0.05, **overrides: object) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = Policy.preset("private_finetune", **overrides)
        return partition(captured_adapter(seed, std), policy)


@functools.cache
def default_split(seed: int = 1) -> object:
    return split_of(seed)


def base_state() -> dict[str, torch.Tensor]:
    """The public base's own parameters, under the base model's names."""
    model = tiny_llama_lora().get_base_model()
    state = {}
    for name, param in model.named_parameters():
        if "lora_" not in name:
            state[base_name(name)] = param.detach().clone().contiguous()
    return state


# -- the policy ----------------------------------------------------------------------------------


def test_public_base_needs_a_protected_model():
    with pytest.raises(PolicyError, match="protects does not include 'model'"):
        Policy.preset("slalom", public_base="peft")
    with pytest.raises(PolicyError, match="public_base must be"):
        Policy.preset("private_finetune", public_base="")


def test_gpu_pins_of_weight_bearing_labels_need_a_public_base():
    with pytest.raises(PolicyError, match="name a public_base"):
        Policy.preset("private_finetune", public_base=None)


def test_policy_file_public_base_is_relative_to_the_file(tmp_path):
    (tmp_path / "base").mkdir()
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"preset": "private_finetune", "public_base": "base"}))
    policy = Policy.from_file(path)
    assert policy.public_base == str(tmp_path / "base")
    assert policy.to_dict()["public_base"] == "base"  # a plan names it without the path
    assert "public_base" not in Policy.preset("slalom").to_dict()  # unchanged plans stay so


def test_peft_base_needs_a_peft_model():
    from conftest import captured

    with pytest.raises(PolicyError, match="no peft adapter parameters"):
        split_parameters(captured("tiny-llama").program, "peft")


# -- public by value -----------------------------------------------------------------------------


def test_a_base_folder_makes_public_exactly_the_bit_identical_parameters(tmp_path):
    model = adapted(1)
    changed = "model.layers.1.post_attention_layernorm.weight"
    with torch.no_grad():  # the fine-tune also changed one norm, by one float32 ulp
        w = model.get_base_model().get_parameter(changed)
        w[0] = torch.nextafter(w[0], torch.tensor(2.0))
    state = base_state()
    missing = "model.layers.0.mlp.up_proj.weight"
    del state[missing]
    save_file(state, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = capture(model).program
        split = partition(
            capture(model), Policy.preset("private_finetune", public_base=str(tmp_path))
        )
    params = split.parameters
    why = {base_name(k): v for k, v in params.why.items()}
    assert why[changed].startswith("differs from the base")
    assert why[missing] == "the base has no parameter of this name"
    assert all(v == "a peft adapter parameter" for k, v in why.items() if "lora_" in k)
    # buffers are weights too: the rotary tables are not in the base's files (transformers
    # makes them from the config), so they are protected, as anything the base lacks is
    rotary = [k for k in params.protected if k.startswith("model.rotary_emb.")]
    assert len(rotary) == 2 and all(why[k] == why[missing] for k in rotary), rotary
    assert len(params.protected) == 16 + 2 + 2  # adapter matrices, changed, missing, rotary
    assert len(params.public) + len(params.protected) == len(model_weights(program))
    # the changed norm's and the missing layer's readers stay in the enclave, not the GPU
    gpu_params = {p for s in split.stages if s.side == GPU for p in s.params}
    assert not gpu_params & set(params.protected)
    assert any(base_name(p) == missing for s in split.stages for p in s.params)
    report = split.report()
    assert "differs from the base's" in report and "public base" in report


def test_pickles_are_not_read(tmp_path):
    torch.save(base_state(), tmp_path / "pytorch_model.bin")
    with pytest.raises(PolicyError, match="pickle"):
        split_of(1, public_base=str(tmp_path))


def test_a_sharded_index_may_not_point_outside_its_folder(tmp_path):
    save_file(base_state(), str(tmp_path / "elsewhere.safetensors"))
    inner = tmp_path / "base"
    inner.mkdir()
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (inner / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PolicyError, match="outside"):
        split_of(1, public_base=str(inner))


@pytest.mark.parametrize("bad", ["missing-dir", "file.txt"])
def test_a_base_that_is_not_there_is_named(tmp_path, bad):
    (tmp_path / "file.txt").write_text("not weights")
    with pytest.raises(PolicyError, match="public_base"):
        split_of(1, public_base=str(tmp_path / bad))


# -- placement -----------------------------------------------------------------------------------


def test_base_linears_go_to_the_gpu_and_the_adapter_stays():
    split = default_split()
    protected = set(split.parameters.protected)
    sides = {}
    for stage in split.stages:
        for p in stage.params:
            sides[p] = stage.side
    for fqn, side in sides.items():
        if fqn in protected:
            assert side == ENCLAVE, fqn
    base_linears = [
        f
        for f in sides
        if f.endswith("proj.base_layer.weight") or f.endswith(("up_proj.weight", "o_proj.weight"))
    ]
    assert base_linears and all(sides[f] == GPU for f in base_linears), base_linears
    share = split.share()
    assert share["gpu_flops"] > 0.5 * (share["gpu_flops"] + share["enclave_flops"])


def test_split_equals_the_quantised_model_and_the_adapted_model():
    split = default_split()
    model = adapted(1)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model_output(split.executor()(input_ids=ids))
        assert torch.equal(got, model_output(quantised_reference(split)(input_ids=ids)))
        want = model_output(model(input_ids=ids))
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    assert float((got - want).abs().max()) < 1e-2


# -- the audit, by value -------------------------------------------------------------------------


def test_audit_finds_a_quantised_copy_of_a_protected_parameter_on_the_gpu():
    split = split_of(1)
    protected = next(f for f in split.parameters.protected if "lora_A" in f)
    weight = split.source.state_dict[protected]
    stolen = torch.round(weight / weight.abs().max() * 127).to(torch.int8)
    gpu = next(s for s in split.stages if s.side == GPU)
    gpu.module.register_buffer("innocent_looking", stolen.t().contiguous())
    with pytest.raises(AuditError, match="by value"):
        audit(split, verbose=False)


def test_no_tensor_in_the_bundles_gpu_folder_is_a_protected_parameter(tmp_path):
    split = default_split()
    split.save(tmp_path / "bundle")
    found = [load_file(str(p)) for p in (tmp_path / "bundle" / "gpu").rglob("*.safetensors")]
    tensors = [t for f in found for t in f.values()]
    assert tensors
    for fqn in split.parameters.protected:
        value = weight_value(split.source, fqn)  # a buffer may be a constant, not in state_dict
        assert value is not None, fqn
        secret = value.detach().double().flatten()
        for t in tensors:
            if t.numel() == secret.numel():
                a = t.double().flatten() - t.double().mean()
                b = secret - secret.mean()
                assert abs(float(a @ b)) <= 0.5 * float(a.norm() * b.norm()) + 1e-12, fqn


# -- two adapters, one base: what the GPU sees -----------------------------------------------------


class RecordingRunner:
    """Runs GPU stages in process; records what each receives and returns (last call)."""

    def __init__(self, plan: object) -> None:
        self.inner = InProcessRunner(plan)
        self.seen: dict[str, list[torch.Tensor]] = {}

    def run(self, stage, tensors, expected=None):
        outs = self.inner.run(stage, tensors, expected)
        self.seen[stage] = [t.detach().clone() for t in [*tensors, *outs]]
        return outs


def gpu_view(split: object, ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Per GPU stage, everything it received and returned for ``ids``, pooled."""
    runner = RecordingRunner(split.spec)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Executor(split.spec, runner=runner, seed=seed)(input_ids=ids)
    return {
        s: torch.cat([t.flatten().to(torch.float64) for t in ts]) for s, ts in runner.seen.items()
    }


def uniform_residues(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


@pytest.mark.parametrize("masking", ["exact", "additive"])
def test_two_adapters_look_the_same_to_the_gpu_only_under_exact_masks(masking):
    """The adversary's pair: a mild adapter and a strong one (B drawn 10x larger)."""
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(5))
    a = gpu_view(split_of(1, masking=masking), ids, seed=11)
    b = gpu_view(split_of(2, std=0.5, masking=masking), ids, seed=12)
    assert a.keys() == b.keys()
    pvalues = {}
    for stage in a:
        x, y = a[stage], b[stage]
        if masking == "exact":
            x, y = uniform_residues(x), uniform_residues(y)
        pvalues[stage] = float(stats.ks_2samp(x.numpy(), y.numpy()).pvalue)
    if masking == "exact":  # Bonferroni over the stages
        assert min(pvalues.values()) > ALPHA / len(pvalues), pvalues
    else:
        assert min(pvalues.values()) < 1e-6, pvalues


# -- the extraction attack -----------------------------------------------------------------------


REQUESTS_PER_TOKEN = 4
ROWS_PER_REQUEST = 256


def extraction_error(masking: str) -> float:
    """Relative error ``‖T̂ - T‖ / ‖T‖`` of the GPU's estimate of layer 0's value-adapter
    ``T = R·ΔW_v`` (R repeats the key/value heads): 1.0 is what guessing zero scores.

    The GPU watches ``REQUESTS_PER_TOKEN`` one-token prompts of every token (1,024 in all)
    to a strong adapter (B drawn with std 0.5: the float-mask noise on one coefficient is
    about 0.02 at this count, the adapter's entries about 0.25). They come as rows of
    requests of ``ROWS_PER_REQUEST``: every row is quantised and masked with its own pads,
    as a request of its own is (measured: the same errors as 1,024 one-row requests,
    0.25 / 1.009 then, at a fortieth of the time)."""
    model = adapted(1, std=0.5)
    split = split_of(1, std=0.5, masking=masking)
    base = model.get_base_model()
    cfg = base.config
    attn = base.model.layers[0].self_attn
    v = attn.v_proj
    delta = (v.lora_B["default"].weight @ v.lora_A["default"].weight) * v.scaling["default"]
    w_v = v.base_layer.weight.detach()
    head = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    rows = torch.arange(cfg.hidden_size)
    repeat = torch.zeros(cfg.hidden_size, w_v.shape[0])
    repeat[rows, (rows // head // group) * head + rows % head] = 1.0
    truth = (repeat @ delta).detach().double()
    gpu = [s for s in split.stages if s.side == GPU]
    qkv, o_proj = gpu[0].name, gpu[1].name
    xs, zs = [], []
    runner = RecordingRunner(split.spec)
    ex = Executor(split.spec, runner=runner, seed=0)
    tokens = torch.arange(VOCAB).repeat(REQUESTS_PER_TOKEN)
    for rows in tokens.split(ROWS_PER_REQUEST):  # one token a row: attention returns v
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ex(input_ids=rows[:, None])
        xs.append(runner.seen[qkv][0][:, 0, : cfg.hidden_size].double())
        zs.append(runner.seen[o_proj][0][:, 0, : cfg.hidden_size].double())
    x, z = torch.cat(xs), torch.cat(zs)
    assert x.shape == z.shape == (VOCAB * REQUESTS_PER_TOKEN, cfg.hidden_size)
    # least squares z ≈ x Mᵀ, corrected for the pad's known variance (errors in variables)
    xc, zc = x - x.mean(0), z - z.mean(0)
    cov_x = xc.T @ xc / len(x)
    pad_var = split.protection.mask_scale**2 / 3 if masking == "additive" else 0.0
    m = torch.linalg.solve(cov_x - pad_var * torch.eye(len(cov_x)), xc.T @ zc / len(x)).T
    estimate = m - repeat.double() @ w_v.double()
    return float((estimate - truth).norm() / truth.norm())


def test_extraction_attack_recovers_the_adapter_under_float_masks():
    assert extraction_error("additive") < 0.5


def test_extraction_attack_does_no_better_than_guessing_zero_under_exact_masks():
    assert extraction_error("exact") >= 1.0


def test_a_tied_output_layer_is_the_folders_embedding(tmp_path):
    """transformers stores a tied ``lm_head.weight`` once, as the input embedding: a folder
    whose config ties them makes an output layer equal to that embedding public."""
    model = adapted(1)
    base_model = model.get_base_model()
    with torch.no_grad():
        base_model.lm_head.weight.copy_(base_model.model.embed_tokens.weight)
    state = base_state()
    state["model.embed_tokens.weight"] = base_model.model.embed_tokens.weight.detach().clone()
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    policy = Policy.preset("private_finetune", public_base=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untied = partition(capture(model), policy)
        (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
        tied = partition(capture(model), policy)
    assert "lm_head.weight" in untied.parameters.protected
    assert "lm_head.weight" in tied.parameters.public
