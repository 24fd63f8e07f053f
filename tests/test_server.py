"""``teesplit serve``: the OpenAI-compatible server in the enclave process (issue 14).

One bundle (a tiny Llama under cmif, saved with a real byte-level BPE tokenizer made here and
SmolLM2's ChatML chat template), one GPU worker in this process (so the test can see what it
holds), one server process over TLS, and the real ``openai`` client. Tokens equal in-process
generation: RNM's ε is set so high that its noise never changes a token, so the server's
sanitised prompt is the prompt and greedy decoding is deterministic; the ε reported is still
counted per sanitised position, as under any ε.

The tokenizer is trained here (``tokenizers``, a 512-token vocabulary) rather than SmolLM2's
own: RNM's candidate tables for a 49152-token vocabulary take minutes to build, and the
bundle's tokenizer is checked against transformers' in ``test_tokenizer.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import ssl
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx2
import openai
import pytest
import torch
from conftest import self_signed

from enclave_runtime import allocator
from enclave_runtime.executor import Executor
from enclave_runtime.generation import decode_steps
from enclave_runtime.openai_api import encode_chat
from enclave_runtime.sampling import Sampler, sampling_rng
from enclave_runtime.sessions import Detokenizer
from enclave_runtime.tokenizer import BundleTokenizer
from partitioner.policy import Policy, RNMConfig
from runtime.local_triton import stop
from runtime.worker import GPUWorker, serve

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-smol"
CONTEXT = 256
API_KEY = "sk-teesplit-test"
EPSILON = 1e4  # RNM's noise (Laplace, scale 2/ε) never outweighs a score gap: tokens pass
POLICY = dataclasses.replace(
    Policy.resolve("cmif"), name="cmif-test", rnm=RNMConfig(epsilon=EPSILON, candidates=20)
)


# SmolLM2-Instruct's chat template (ChatML, with its default system prompt)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Once upon a time there was a story, and the story had a number.",
    "Answer briefly. You are a helpful assistant; the user asks and you answer.",
    "The quick brown fox jumps over the lazy dog. Hello world, 123 456 789!",
] * 20


def _tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) with ChatML's special tokens,
    shaped as ``save_tokenizer`` reads a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return types.SimpleNamespace(
        backend_tokenizer=backend,
        chat_template=CHATML,
        eos_token_id=backend.token_to_id("<|im_end|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        vocab_size=backend.get_vocab_size(),
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, key_files):
    """A tiny Llama over the tokenizer's vocabulary, partitioned under cmif and saved with the
    tokenizer; returns (root, split, tokenizer as the enclave reads it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from partitioner.api import partition
    from partitioner.generation import capture_decoder

    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = capture_decoder(model, model_name=MODEL)
    split = partition(step, POLICY, seed=3)
    root = tmp_path_factory.mktemp("served")
    split.save(root, tokenizer=tokenizer, sign_key=key_files[0])
    return root, split, BundleTokenizer(root)


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    cert, key = self_signed("127.0.0.1")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    return cert_path, key_path


class Served:
    """The running worker and server, and clients for them."""

    def __init__(self, worker: GPUWorker, url: str, tls: ssl.SSLContext, log: Path) -> None:
        self.worker = worker
        self.log = log
        self.key = API_KEY
        self.url = url
        self.tls = tls

    def http(self) -> httpx2.Client:
        headers = {"authorization": f"Bearer {self.key}"}
        return httpx2.Client(base_url=self.url, verify=self.tls, timeout=60, headers=headers)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.key,
            max_retries=0,
            http_client=httpx2.Client(verify=self.tls, timeout=60),
        )

    def health(self) -> dict:
        with self.http() as http:
            return http.get("/health").json()

    def wait_idle(self, seconds: float = 10.0) -> None:
        """Until the server has no session open and the worker holds no session's cache."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.health()["sessions"] == 0 and self.worker.held_sequences() == 0:
                return
            time.sleep(0.05)
        raise AssertionError(
            f"still open: {self.health()['sessions']} sessions, "
            f"{self.worker.held_sequences()} caches on the worker"
        )


@pytest.fixture(scope="module")
def served(bundle, key_files, tmp_path_factory):
    root, _, _ = bundle
    folder = tmp_path_factory.mktemp("server")
    worker = GPUWorker(root / "gpu")
    address = f"unix:{folder / 'worker.sock'}"
    worker_server = serve(worker, address)
    cert, key = _certificate(folder)
    api_key = folder / "api.key"
    api_key.write_text(API_KEY + "\n")
    log = (folder / "server.log").open("w")
    command = [
        sys.executable,
        "-m",
        "partitioner.cli",
        "serve",
        str(root),
        "--worker",
        address,
        "--listen",
        "127.0.0.1:0",
        "--trusted-key",
        str(key_files[1]),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--max-sessions",
        "8",
        "--api-key-file",
        str(api_key),
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert "teesplit serve:" in line, (line, (folder / "server.log").read_text())
        url = line.split(" on ")[1].split()[0].removesuffix("/v1")
        assert url.startswith("https://127.0.0.1:")
        result = Served(
            worker, url, ssl.create_default_context(cafile=str(cert)), folder / "server.log"
        )
        for _ in range(100):  # uvicorn accepts once its loop runs
            try:
                result.health()
                break
            except httpx2.TransportError:
                time.sleep(0.05)
        yield result
    finally:
        stop(proc, grace=10)
        log.close()
        worker_server.shutdown()


def reference(bundle, ids, public, new, choose=None) -> tuple[str, int, float]:
    """In-process generation: (text, tokens generated, ε) as the server should answer."""
    _, split, tokenizer = bundle
    executor = Executor(split.spec)
    kwargs = {"choose": choose} if choose is not None else {}
    eos = tokenizer.eos_token_id
    steps = decode_steps(
        executor, ids, max_new_tokens=new, eos_token_id=eos, public_prompt=public, **kwargs
    )
    tokens = [int(t[0]) for t in steps]
    text = tokenizer.decode([t for t in tokens if t != eos])
    return text, len(tokens), executor.last_request["epsilon"]


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_models_health_and_readiness(served):
    with served.client() as client:
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert client.models.retrieve(MODEL).id == MODEL
    health = served.health()
    masks = {k: health.pop(k) for k in list(health) if k.startswith("mask_")}
    assert health == {"status": "ok", "model": MODEL, "sessions": 0, "max_sessions": 8}
    # the mask pool's stock of decode sets, drawn in the background (cmif: its RNM noise)
    assert set(masks) == {"mask_sets_ready", "mask_set_misses", "mask_sets_per_s"}
    assert masks["mask_sets_ready"] >= 0 and masks["mask_set_misses"] >= 0
    with served.http() as http:
        assert http.get("/ready").status_code == 200


def test_chat_greedy_equals_in_process_generation(served, bundle):
    _, split, _ = bundle
    ids, public = encode_chat(bundle[2], CHAT)
    assert public.any() and not public.all()  # the template public, the words private
    text, count, epsilon = reference(bundle, ids, public, 12)
    with served.client() as client:
        out = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, temperature=0
        )
        streamed = list(
            client.chat.completions.create(
                model=MODEL,
                messages=CHAT,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert out.choices[0].message.content == text
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == count and out.usage.prompt_tokens == ids.shape[1]
    assert out.choices[0].finish_reason == ("length" if count == 12 else "stop")
    privacy = dict(out.model_extra["teesplit"])
    # the bytes that crossed: at least the logits of each step back, the new rows up
    up, down = privacy.pop("bytes_to_gpu"), privacy.pop("bytes_from_gpu")
    assert down >= count * split.spec.vocab * 4 and up > 0
    # ε counts the user's sanitised positions only: never the template's
    assert privacy == {
        "policy": "cmif-test",
        "epsilon": epsilon,
        "epsilon_per_token": EPSILON,
        "public_classes": ["special"],
    }
    assert 0 < epsilon < EPSILON * ids.shape[1]
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    final = [c for c in streamed if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    assert final[0].model_extra["teesplit"] == {
        **privacy,
        "bytes_to_gpu": up,
        "bytes_from_gpu": down,
    }
    assert streamed[-1].usage.completion_tokens == count and not streamed[-1].choices


@pytest.mark.parametrize("stream", [False, True])
def test_completions_text_and_token_ids(served, bundle, stream):
    tokenizer = bundle[2]
    prompt = "Once upon a time"
    ids = tokenizer(prompt)["input_ids"]
    text, count, epsilon = reference(bundle, ids, None, 9)
    with served.client() as client:
        for sent in (prompt, ids[0].tolist()):
            out = client.completions.create(
                model=MODEL, prompt=sent, max_tokens=9, temperature=0, stream=stream
            )
            if stream:
                chunks = list(out)
                got = "".join(c.choices[0].text for c in chunks)
                assert chunks[-1].model_extra["teesplit"]["epsilon"] == epsilon
            else:
                got = out.choices[0].text
                assert out.usage.completion_tokens == count
                assert out.model_extra["teesplit"]["epsilon"] == epsilon == EPSILON * ids.shape[1]
            assert got == text


def test_a_seed_makes_sampling_reproducible(served, bundle):
    ids, public = encode_chat(bundle[2], CHAT)
    sampler = Sampler(0.9, 0.95, sampling_rng(7))
    text, _, _ = reference(bundle, ids, public, 16, choose=sampler)
    with served.client() as client:

        def ask(seed: int) -> str:
            out = client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=16, temperature=0.9, top_p=0.95, seed=seed
            )
            return out.choices[0].message.content

        assert ask(7) == ask(7) == text
        assert len({ask(seed) for seed in (1, 2, 3)} | {text}) > 1
        greedy = reference(bundle, ids, public, 16)[0]
        assert text != greedy  # sampling at temperature 0.9 is not the arg-max


def test_a_stop_string_ends_the_text_in_both_modes(served, bundle):
    ids, public = encode_chat(bundle[2], CHAT)
    text, _, _ = reference(bundle, ids, public, 12)
    # two printable ASCII characters from the middle of the answer (not a partial UTF-8 one)
    stop = next(
        text[i : i + 2]
        for i in range(2, len(text) - 1)
        if text[i : i + 2].isascii() and text[i : i + 2].isprintable() and text[i : i + 2].strip()
    )
    with served.client() as client:
        out = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stop=[stop, "\x00never"]
        )
        chunks = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stop=stop, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert out.choices[0].message.content == streamed == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_each_get_their_own_tokens(served, bundle):
    tokenizer = bundle[2]
    prompts = [f"Story number {i}: the" for i in range(8)]
    expected = [
        reference(bundle, tokenizer(p)["input_ids"], None, 6 + i)[0] for i, p in enumerate(prompts)
    ]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def one(i: int) -> None:
        try:
            with served.client() as client:
                start.wait()
                stream = client.completions.create(
                    model=MODEL, prompt=prompts[i], max_tokens=6 + i, temperature=0, stream=True
                )
                results[i] = "".join(c.choices[0].text for c in stream)
        except BaseException as exc:  # reported below, with which client failed
            errors.append(exc)

    peak = 0  # the most sessions' caches the worker held at once: they ran side by side
    stage = next(iter(served.worker.stages))
    calls = served.worker.stats[stage]["calls"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    with slow(served.worker, 0.01):
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak = max(peak, served.worker.held_sequences())
            time.sleep(0.005)
    for t in threads:
        t.join(1)
    assert not errors, errors
    assert [results.get(i) for i in range(8)] == expected
    assert peak >= 4
    # and their decode steps were batched by the enclave: one call per step for every
    # session, far fewer than one per token (8 prefills, then at most 6 + 7 steps)
    tokens = sum(6 + i for i in range(8))
    assert served.worker.stats[stage]["calls"] - calls <= 8 + 13 < tokens / 2
    served.wait_idle()


def _open_stream(client: openai.OpenAI, tokens: int = 200):
    stream = client.completions.create(
        model=MODEL, prompt="a", max_tokens=tokens, temperature=0, stream=True
    )
    next(iter(stream))  # the session is running: its first token arrived
    return stream


@contextlib.contextmanager
def before_each_run(worker: GPUWorker, hook: Callable[[int], None]):
    """``hook(n)`` runs before the worker's ``n``-th stage call from here on."""
    run, calls = worker.run, itertools.count()

    def wrapped(*args, **kwargs):
        hook(next(calls))
        return run(*args, **kwargs)

    worker.run = wrapped
    try:
        yield
    finally:
        del worker.run


def slow(worker: GPUWorker, seconds: float = 0.02):
    """Each stage call on the worker takes ``seconds`` longer: sessions stay open a while."""
    return before_each_run(worker, lambda _: time.sleep(seconds))


def failing(worker: GPUWorker, after: int):
    """The worker's stages fail from the ``after``-th call on (a GPU that falls over)."""

    def fall_over(n: int) -> None:
        if n >= after:
            raise RuntimeError("the GPU fell over at 0xdeadbeef")

    return before_each_run(worker, fall_over)


def test_a_failing_worker_is_a_502_or_an_error_event_without_its_details(served):
    served.wait_idle()  # the failing call is counted from here: no other session may be running
    with served.client() as client:
        with failing(served.worker, after=0), pytest.raises(openai.APIStatusError) as plain:
            client.completions.create(model=MODEL, prompt="a", max_tokens=8)
        assert plain.value.status_code == 502 and plain.value.code == "worker_error"
        # greedy: a sampled generation may end at its end-of-sequence token before the
        # failing call, and then there is nothing to fail (this test was flaky that way)
        with failing(served.worker, after=3):
            stream = client.completions.create(
                model=MODEL, prompt="a", max_tokens=8, stream=True, temperature=0
            )
            chunks = []
            with pytest.raises(openai.APIError) as streamed:
                chunks.extend(stream)  # the headers went out with the first tokens: an event
        assert chunks and streamed.value.code == "worker_error"
    for error in (plain.value, streamed.value):
        assert "deadbeef" not in str(error.body) and "Traceback" not in str(error.body)
    served.wait_idle()
    assert "the GPU fell over" in served.log.read_text()  # the details are the host's log's


def test_a_cancelled_stream_frees_its_session_at_once(served):
    served.wait_idle()
    stage = next(iter(served.worker.stages))
    before = served.worker.stats[stage]["calls"]
    with slow(served.worker), served.client() as client:
        stream = _open_stream(client, 240)
        assert served.health()["sessions"] == 1 and served.worker.held_sequences() == 1
        stream.close()  # the client goes away mid-stream
        served.wait_idle(5)
    # the session stopped with its client: far fewer steps than the 240 it asked for
    assert served.worker.stats[stage]["calls"] - before < 120


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(served):
    """Not streamed: the server notices the disconnect while the session runs, and stops it."""
    served.wait_idle()
    stage = next(iter(served.worker.stages))
    before = served.worker.stats[stage]["calls"]
    with slow(served.worker), served.http() as http:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 240, "temperature": 0}
        with pytest.raises(httpx2.TimeoutException):
            http.post("/v1/completions", json=body, timeout=0.5)
        served.wait_idle(5)
    assert served.worker.stats[stage]["calls"] - before < 120


def test_a_full_server_refuses_with_503_and_recovers(served):
    served.wait_idle()
    with slow(served.worker), served.client() as client:
        streams = [_open_stream(client, 240) for _ in range(8)]
        try:
            with pytest.raises(openai.InternalServerError) as refused:
                client.completions.create(model=MODEL, prompt="b", max_tokens=2)
            assert refused.value.status_code == 503
            assert refused.value.body["code"] == "server_busy"
            assert refused.value.response.headers["retry-after"] == "1"
            with served.http() as http:
                assert http.get("/ready").status_code == 503
        finally:
            for stream in streams:
                stream.close()
        served.wait_idle()
        assert client.completions.create(model=MODEL, prompt="b", max_tokens=2).choices


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, **fields}


def completion(prompt) -> dict:
    return {"model": MODEL, "prompt": prompt}


def said(content) -> list[dict]:
    return [{"role": "user", "content": content}]


C, P = "/v1/chat/completions", "/v1/completions"
BAD = [
    (C, b"{not json", 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b'{"model": "tiny-smol", "temperature": NaN}', 400, None),
    (C, b"{" + b'"a":' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None),  # too deep
    (C, b"x" * (1025 << 10), 413, None),  # over --max-body-kb
    (C, {"model": MODEL}, 400, "messages"),
    (C, chat(model="gpt-4"), 400, "model"),
    (C, chat(messages=[]), 400, "messages"),
    (C, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role"),
    (C, chat(messages=said(3)), 400, "messages[0].content"),
    (C, chat(messages=said([{"type": "image_url"}])), 400, "messages[0].content"),
    (C, chat(messages=said("x " * 2000)), 413, "messages"),  # over the context
    (C, chat(temperature=2.5), 400, "temperature"),
    (C, chat(top_p=0), 400, "top_p"),
    (C, chat(n=2), 400, "n"),
    (C, chat(max_tokens=0), 400, "max_tokens"),
    (C, chat(max_tokens=True), 400, "max_tokens"),
    (C, chat(max_tokens=250), 400, "max_tokens"),  # the prompt and these exceed the context
    (C, chat(stop=["a"] * 5), 400, "stop"),
    (C, chat(seed="7"), 400, "seed"),
    (C, chat(stream="yes"), 400, "stream"),
    (C, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (C, chat(response_format={"type": "json_object"}), 400, "response_format"),
    (C, chat(logprobs=True), 400, "logprobs"),
    (P, completion(list(range(300))), 413, "prompt"),
    (P, completion([512]), 400, "prompt"),  # outside the vocabulary
    (P, completion(""), 400, "prompt"),
    (P, completion({"file": "/etc/passwd"}), 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_a_bad_request_gets_the_openai_error_object(served, path, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with served.http() as http:
        reply = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "Traceback" not in reply.text and "File " not in reply.text


def test_unknown_paths_methods_and_fields(served):
    with served.http() as http:
        for reply, status in (
            (http.get("/v1/nothing"), 404),
            (http.get("/v1/chat/completions"), 405),
            (http.get("/v1/models/gpt-4"), 404),
        ):
            assert reply.status_code == status
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        ignored = {"model": MODEL, "messages": CHAT, "max_tokens": 1, "frobnicate": {"x": 1}}
        assert http.post("/v1/chat/completions", json=ignored).status_code == 200
    with served.client() as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert refused.value.code == "model_not_found"
    served.wait_idle()


def test_the_api_key_is_required_on_v1_only(served):
    with served.http() as http:
        http.headers.pop("authorization")
        assert http.get("/health").status_code == 200
        for reply in (http.get("/v1/models"), http.post(C, json=chat(max_tokens=1))):
            assert reply.status_code == 401
            assert reply.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(
        base_url=f"{served.url}/v1",
        api_key="sk-wrong",
        max_retries=0,
        http_client=httpx2.Client(verify=served.tls),
    )
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert served.health()["sessions"] == 0  # refused before a session was opened


class _Bytes:
    """A tokenizer whose tokens are byte strings (so one may end mid-character)."""

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(ids).decode("utf-8", "replace")


@pytest.mark.parametrize(
    ("tokens", "stops", "deltas", "stopped"),
    [
        # text that may begin a stop string waits for the next token to decide it
        ([b"ab", b"cS", b"TO", b"x", b"P"], ["STOP", "xy"], ["ab", "c", "", "STO", "xP"], False),
        ([b"ab", b"cS", b"TO", b"P", b"zz"], ["STOP"], ["ab", "c", "", ""], True),
        # a character split over two tokens goes out whole; one never completed, at the end
        (
            [b"a", "é".encode()[:1], "é".encode()[1:], b"\xff"],
            [],
            ["a", "", "é", "", "\ufffd"],
            False,
        ),
        ([b"a", b"S", b"T"], ["STOP"], ["a", "", "", "ST"], False),
    ],
)
def test_the_detokenizer_sends_only_what_the_answer_keeps(tokens, stops, deltas, stopped):
    text = Detokenizer(_Bytes(), stops)
    out = []
    for token in tokens:
        delta, done = text.add(token)
        out.append(delta)
        if done:
            break
    else:
        rest, done = text.flush()
        out.append(rest)
    assert out[: len(deltas)] == deltas and "".join(out) == "".join(deltas)
    assert done == stopped


def test_serve_says_what_is_wrong_in_one_line(bundle, key_files, tmp_path):
    root = bundle[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "partitioner.cli",
            "serve",
            str(root),
            "--worker",
            f"unix:{tmp_path / 'none.sock'}",
            "--listen",
            "127.0.0.1:0",
            "--trusted-key",
            str(key_files[1]),
            "--timeout",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=allocator.environment(),  # as a deployment starts it (else a line says it was not)
    )
    assert result.returncode != 0
    assert "cannot reach the GPU worker" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_server_process_leaves_the_compiler_out():
    code = "import sys, enclave_runtime.server; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    forbidden = ("passes", "partitioner.api", "partitioner.placement", "networkx", "transformers")
    assert not [m for m in loaded if m.startswith(forbidden)]


def test_the_server_logged_no_failure(served):
    """Every request above was answered or refused as planned: nothing failed inside but the
    worker that was made to."""
    log = served.log.read_text()
    failed = [line for line in log.splitlines() if "request failed" in line]
    assert all("WorkerError" in line for line in failed), log  # only the failing worker's
    assert "Traceback" not in log, log
