"""The pieces of a link that need no second process: how a model is split, the slices of stored tensors, a
step's encoding, the lanes of a pipeline, and the handshake over a real socket."""

from __future__ import annotations

import socket
import threading

import pytest
import torch
from support.architectures import CASES, build_hf, prompts, write_gguf

from deskpod.engine.attention import AttentionBatch
from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import LLMEngine
from deskpod.engine.lanes import Lanes
from deskpod.engine.loader import load_model, planned_weight_bytes
from deskpod.engine.sampler import SamplingParams
from deskpod.engine.scheduler import SchedulerConfig
from deskpod.errors import DeskpodError, UnsupportedModel
from deskpod.formats.weights import open_weights
from deskpod.link.config import LinkConfig, parse_endpoint
from deskpod.link.group import decode_step, encode_step
from deskpod.link.rendezvous import Connection, LinkRefused, authenticate_head, authenticate_worker
from deskpod.link.serve import plan_shares
from deskpod.link.share import take_columns, take_rows, tensor_shares


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    folder = build_hf(CASES["llama"], tmp_path_factory.mktemp("llama") / "llama")
    return write_gguf(CASES["llama"], folder, folder.parent / "llama-q.gguf", quantized=True)


def test_pipeline_split_follows_memory(llama_gguf):
    source = open_weights(llama_gguf)
    even = plan_shares(source, "pipeline", [8, 8])
    assert [(s.first_layer, s.end_layer) for s in even] == [(0, 1), (1, 3)]  # the head also holds the embedding
    lopsided = plan_shares(source, "pipeline", [1, 100])
    assert lopsided[0].num_layers == 1 and lopsided[1].num_layers == 2  # every box gets at least one layer
    with pytest.raises(UnsupportedModel, match="3-layer model cannot be split over 4 boxes"):
        plan_shares(source, "pipeline", [1, 1, 1, 1])


def test_each_box_plans_and_holds_its_share(llama_gguf):
    source = open_weights(llama_gguf)
    config = EngineConfig()
    whole = planned_weight_bytes(source, config)
    for parallel in ("pipeline", "tensor"):
        shares = plan_shares(source, parallel, [1, 1])
        planned = [planned_weight_bytes(source, config, s) for s in shares]
        assert abs(sum(planned) - whole) <= 0.02 * whole  # the shares cover the model once
        held = [load_model(llama_gguf, config, share=s, reduce=lambda x: x).weight_bytes() for s in shares]
        for p, h in zip(planned, held):
            assert abs(h / p - 1) < 0.05, f"{parallel}: planned {p}, held {h}"


def test_tensor_split_by_kv_heads_columns_and_vocabulary(llama_gguf):
    spec = open_weights(llama_gguf).spec
    shares = tensor_shares(spec, 2)
    assert [(s.kv_start, s.kv_end) for s in shares] == [(0, 1), (1, 2)]
    assert [(s.ffn_start, s.ffn_end) for s in shares] == [(0, 64), (64, 128)]  # cut at 32-column blocks
    assert shares[0].vocab_end == shares[1].vocab_start and shares[1].vocab_end == spec.vocab_size
    with pytest.raises(UnsupportedModel, match="needs at least 3 KV heads"):
        tensor_shares(spec, 3)
    with pytest.raises(UnsupportedModel, match="use --parallel pipeline"):
        tensor_shares(spec, 2, qk_norm_whole=True)


def test_slices_of_quantized_tensors_read_only_their_part(llama_gguf):
    source = open_weights(llama_gguf)
    q = source.info("blk.0.attn_q.weight")
    rows = take_rows(q, 16, 48)
    assert rows.shape == (32, q.shape[1]) and torch.equal(rows.float(), q.float()[16:48])
    down = source.info("blk.0.ffn_down.weight")  # a block type: cut between blocks, it stays in blocks
    cols = take_columns(down, 32, 96)
    assert type(cols).__name__ == "BlockColumns" and cols.shape == (down.shape[0], 64)
    assert torch.equal(cols.float(), down.float()[:, 32:96])
    inside = take_columns(down, 16, 96)  # inside a block: read as floats instead
    assert type(inside).__name__ == "FloatColumns" and torch.equal(inside.float(), down.float()[:, 16:96])


def test_a_step_crosses_the_link_unchanged():
    batch = AttentionBatch.build([(1, 7, [3, 4], 1), (5, 0, [9], 1), (1, 20, [1, 2], 1), (3, 16, [5, 6], 3)], 16)
    ids = torch.arange(10)
    got_ids, got = decode_step(encode_step(ids, batch))
    assert torch.equal(got_ids, ids)
    for name in ("positions", "slots", "decode_rows", "decode_block_tables", "decode_context_lens", "logit_rows"):
        assert torch.equal(getattr(got, name), getattr(batch, name)), name
    assert [(c.rows, c.start, c.context_len, c.block_table.tolist()) for c in got.prefills] == \
        [(c.rows, c.start, c.context_len, c.block_table.tolist()) for c in batch.prefills]


def test_lanes_split_the_pool_and_the_requests(llama_gguf):
    lanes = Lanes(SchedulerConfig(num_blocks=64, max_num_seqs=4), lambda r: None, 2)
    assert [s.block_offset for s in lanes.lanes] == [0, 32] and lanes.lanes[1].config.num_blocks == 32
    # a pipelined engine gives the same greedy tokens as a plain one (float32: batches of any shape agree)
    config = EngineConfig(weights="float32", context=256)
    loaded = load_model(llama_gguf, config)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def run(engine) -> dict[str, list[int]]:
        ids = [engine.add_request(p, params) for p in prompts(4, 20)]
        tokens = {i: [] for i in ids}
        while engine.has_work():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
        return tokens

    plain = run(LLMEngine(loaded, config, num_blocks=64))
    piped = LLMEngine(loaded, config, num_blocks=64, link=_FakeDepth(2))
    assert isinstance(piped.scheduler, Lanes)
    assert run(piped) == plain
    assert {len(s.requests) for s in piped.scheduler.lanes} == {0}


class _FakeDepth:
    """What LLMEngine reads of a LinkHead to pipeline: its depth; its group (never None here) and generation."""

    def __init__(self, depth: int):
        self.pipeline_depth, self.generation, self.group = depth, 0, object()


def test_handshake_refuses_a_wrong_token_both_ways():
    def pair() -> tuple[Connection, Connection]:
        a, b = socket.socketpair()
        return Connection(a, "worker"), Connection(b, "head")

    worker_side, head_side = pair()
    errors = []
    thread = threading.Thread(target=lambda: _record(errors, authenticate_worker, worker_side, "right-token", 5))
    thread.start()
    with pytest.raises(LinkRefused, match="link token does not match"):
        authenticate_head(head_side, "wrong-token", 5)
    thread.join()
    head_side.close()
    assert "wrong link token" in str(errors[0])

    worker_side, head_side = pair()
    thread = threading.Thread(target=lambda: _record(errors, authenticate_worker, worker_side, "right-token", 5))
    thread.start()
    authenticate_head(head_side, "right-token", 5)  # both proved it
    thread.join()
    worker_side.close()
    head_side.close()
    assert len(errors) == 1


def _record(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test reads it
        errors.append(e)


def test_link_config_is_checked(monkeypatch):
    with pytest.raises(DeskpodError, match="at least 8 characters"):
        LinkConfig(2, "127.0.0.1", 29500, "short")
    with pytest.raises(DeskpodError, match="at least 2"):
        LinkConfig(1, "127.0.0.1", 29500, "long-enough")
    with pytest.raises(DeskpodError, match="not a wildcard"):
        parse_endpoint("0.0.0.0:29500")
    monkeypatch.setenv("MASTER_ADDR", "169.254.1.2")
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert parse_endpoint(None) == ("169.254.1.2", 29511)  # torchrun's variables
    assert parse_endpoint("[fe80::1]:29500") == ("fe80::1", 29500)
