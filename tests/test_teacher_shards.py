"""The llm teacher sharded over Ray workers (onerec_dist/distributed/teacher_shards.py) and its backends
(onerec_dist/reasoning/teachers/llm.py): contiguous shards of whole batches, merge in request order, sampling seeded
per request (so batching and sharding cannot change a rationale), config errors, the vLLM mapping (a fake ``vllm``
module), and one 2-worker Ray run equal to in-process generation."""

import sys
import types

import pytest
import torch

from onerec_dist.data.types import Catalogue, InteractionData
from onerec_dist.distributed.teacher_shards import contiguous_shards, merge_shards
from onerec_dist.prompts import render_prompt
from onerec_dist.reasoning.teachers import LLMTeacherConfig, TeacherRequest, build_teacher, teacher_config
from onerec_dist.reasoning.teachers.llm import VLLM_MISSING, ModelSource, generate_batch, load_generator, \
    request_seed

TITLES = ["Lum Pro Lens A1", "Vel Wide Lens B2", "Lum Classic Film Camera C3", "Lum Photo Printer D4",
          "Kor Photo Printer E5", "Zen Seed Kit F6", "Lum Studio Photo Printer G7"]
PROMPTS = ["Lum Pro Lens", "Kor Photo Printer E5 and a Zen Seed Kit", "Vel", "Zen Seed Kit F6 Lum Studio",
           "Lum Classic Film Camera C3 Vel Wide"]  # different lengths: padding differs with the batch


@pytest.fixture(scope="module")
def tiny_lm():
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus

    corpus = [" ".join(TITLES[i:] + TITLES[:i]) for i in range(7)] * 3
    tokenizer = build_tokenizer_from_corpus(corpus, vocab_size=300)
    # initializer_range 0.3: a random model whose output depends on the prompt (as in test_reasoning_teachers.py).
    return build_tiny_model(tokenizer, seed=0, initializer_range=0.3).eval(), tokenizer


def llm_cfg(**overrides) -> LLMTeacherConfig:
    return teacher_config({"kind": "llm", "max_new_tokens": 6, "batch_size": 2, **overrides})


def toy_data() -> InteractionData:
    cats = [["Cameras", "Lenses"]] * 2 + [["Cameras", "Film"]] + [["Printing", "Printers"]] * 2 + \
        [["Garden", "Seeds"], ["Printing", "Printers"]]
    return InteractionData("toy", Catalogue([f"i{i}" for i in range(7)], TITLES, [""] * 7, ["Lum"] * 7, cats), {})


REQUESTS = [TeacherRequest("u1", (0, 1), (0, 1), 3), TeacherRequest("u2", (2, 0), (2, 0), 4),
            TeacherRequest("u3", (0, 2), (0, 2), 1), TeacherRequest("u4", (3,), (3,), 5),
            TeacherRequest("u5", (5, 6), (5, 6), 2)]


# ---------------------------------------------------------------- sharding (pure)


def test_shards_are_contiguous_runs_of_whole_batches():
    # 11 requests, batches of 2 -> 6 batches; 2 workers x 2 shards each = 4 shards of 2, 2, 1, 1 batches.
    assert contiguous_shards(11, 2, 2, shards_per_worker=2) == [(0, 4), (4, 8), (8, 10), (10, 11)]
    # fewer batches than shards: one batch per shard
    assert contiguous_shards(5, 2, 4) == [(0, 2), (2, 4), (4, 5)]
    assert contiguous_shards(0, 2, 2) == []
    for count, batch, workers in [(1, 8, 3), (97, 8, 2), (64, 8, 16), (100, 1, 3)]:
        ranges = contiguous_shards(count, batch, workers)
        assert ranges[0][0] == 0 and ranges[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        assert all(lo % batch == 0 for lo, _ in ranges) and len(ranges) <= workers * 4


def test_merge_restores_request_order_whatever_order_shards_finish():
    ranges = [(0, 2), (2, 3), (3, 5)]
    finished = {2: ["d", "e"], 0: ["a", "b"], 1: ["c"]}  # shard 2 finished first
    assert merge_shards(finished, ranges) == ["a", "b", "c", "d", "e"]
    with pytest.raises(RuntimeError, match=r"teacher shard 1 \(requests 2..2\) returned nothing, expected 1"):
        merge_shards({0: ["a", "b"], 2: ["d", "e"]}, ranges)


# ---------------------------------------------------------------- seeding


def test_request_seeds_depend_on_seed_and_index_only():
    seeds = {request_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150 and request_seed(1, 7) == request_seed(1, 7)
    assert all(0 <= s < 2 ** 32 for s in seeds)


def test_sampled_rationales_do_not_depend_on_batching(tiny_lm):
    model, tokenizer = tiny_lm
    sample = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=3)
    one_batch = generate_batch(model, tokenizer, PROMPTS, batch_size=5, **sample)
    # Different batch sizes, and the requests in reverse order with their own indices: the same text per request.
    assert generate_batch(model, tokenizer, PROMPTS, batch_size=2, **sample) == one_batch
    reverse = generate_batch(model, tokenizer, PROMPTS[::-1], indices=[4, 3, 2, 1, 0], batch_size=3, **sample)
    assert reverse[::-1] == one_batch
    alone = [generate_batch(model, tokenizer, [p], indices=[i], batch_size=1, **sample)[0]
             for i, p in enumerate(PROMPTS)]
    assert alone == one_batch
    # The draws do depend on the seed and on the index (else the test above could not fail).
    assert generate_batch(model, tokenizer, PROMPTS, batch_size=5, **{**sample, "seed": 4}) != one_batch
    shifted = generate_batch(model, tokenizer, PROMPTS, indices=[5, 6, 7, 8, 9], batch_size=5, **sample)
    assert shifted != one_batch
    greedy = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5)
    assert greedy != one_batch  # temperature 1.5 over a random model: sampling leaves the argmax path


def test_top_p_near_zero_sampling_is_greedy(tiny_lm):
    # The nucleus of a tiny top_p keeps only the most likely token (TopPLogitsWarper keeps >= 1): sampling = greedy.
    model, tokenizer = tiny_lm
    greedy = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=5)
    assert generate_batch(model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=9,
                          batch_size=2) == greedy


def test_teacher_indices_continue_across_calls(tiny_lm):
    # Request i of the run is seeded (seed, i): two calls of 2 + 3 requests give what one call of 5 gives.
    model, tokenizer = tiny_lm
    cfg = llm_cfg(do_sample=True, temperature=1.5)
    one = build_teacher(cfg, toy_data(), None, model=model, tokenizer=tokenizer)
    two = build_teacher(cfg, toy_data(), None, model=model, tokenizer=tokenizer)
    assert two.rationales(REQUESTS[:2]) + two.rationales(REQUESTS[2:]) == one.rationales(REQUESTS)
    assert one.takes_all_requests is False


class CallSpy:
    """A teacher that answers "about <target>" and records the size of every call; ``takes_all_requests`` as given."""

    name = "spy"

    def __init__(self, takes_all_requests: bool):
        self.takes_all_requests, self.calls, self.closed = takes_all_requests, [], False

    def rationales(self, requests):
        self.calls.append(len(requests))
        return [f"likes things near {r.target % 7}" for r in requests]

    def close(self):
        self.closed = True


def test_bootstrap_hands_a_sharded_teacher_every_request_at_once(tmp_path):
    from onerec_dist.data.config import SyntheticConfig
    from onerec_dist.data.splits import leave_one_out
    from onerec_dist.data.synthetic import generate_synthetic
    from onerec_dist.reasoning.bootstrap import BootstrapConfig, bootstrap_rationales, read_rationales
    from onerec_dist.reasoning.prune import CooccurrenceSimilarity

    data = generate_synthetic(SyntheticConfig(num_users=20, mode="reasoning"))
    splits = leave_one_out(data.sequences, max_history=20)
    similarity = CooccurrenceSimilarity.fit(splits["train"], len(data.catalogue.item_ids))
    cfg, boot = llm_cfg(batch_size=8), BootstrapConfig(format="jsonl", progress=False)
    records = {}
    for takes_all in (False, True):
        spy = CallSpy(takes_all)
        summary = bootstrap_rationales(data, splits, spy, cfg, similarity, tmp_path / str(takes_all), bootstrap=boot)
        count = len(splits["train"])
        # batch-wise: ceil(count / 8) calls of <= 8; sharded: one call of all; close() after the loop either way
        assert spy.calls == ([count] if takes_all else [min(8, count - lo) for lo in range(0, count, 8)])
        assert spy.closed and summary["examples"] == count
        records[takes_all] = [{k: v for k, v in r.items() if k != "provenance"}
                              for r in read_rationales(summary["records"])]
    assert records[True] == records[False] and records[True]


# ---------------------------------------------------------------- config


def test_config_errors_name_the_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"reasoning.teacher.num_workers: must be >= 1 \(1: in-process, more: Ray"):
        llm_cfg(num_workers=0)
    with pytest.raises(ValueError, match=r"reasoning.teacher.use_gpu: backend='vllm' runs on GPUs only"):
        llm_cfg(backend="vllm")
    with pytest.raises(ValueError, match=r"reasoning.teacher.backend='tgi' is not allowed; allowed values: 'hf', "
                                         r"'vllm'"):
        llm_cfg(backend="tgi")
    with pytest.raises(ValueError, match=r"reasoning.teacher.seed: must be >= 0"):
        llm_cfg(seed=-1)
    with pytest.raises(ValueError, match=r"reasoning.teacher.use_gpu"):
        llm_cfg(use_gpu="yes")
    assert llm_cfg(num_workers=3, use_gpu=True, backend="vllm").num_workers == 3


def test_sharded_teacher_of_the_run_model_needs_a_work_dir(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="no work directory was given"):
        build_teacher(llm_cfg(num_workers=2), toy_data(), None, model=model, tokenizer=tokenizer)


# ---------------------------------------------------------------- vLLM backend (a fake module)


def fake_vllm(tokenizer, calls: dict) -> types.ModuleType:
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def get_tokenizer(self):
            return tokenizer

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            calls["prompts"], calls["params"] = prompts, [p.kwargs for p in sampling_params]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"  canned {i} ")])
                    for i in range(len(prompts))]

    module.SamplingParams, module.LLM = SamplingParams, LLM
    return module


@pytest.mark.parametrize("do_sample", [False, True])
def test_vllm_backend_maps_the_config(tiny_lm, monkeypatch, do_sample):
    _, tokenizer = tiny_lm
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(tokenizer, calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = llm_cfg(backend="vllm", use_gpu=True, do_sample=do_sample, seed=5, max_new_tokens=17, dtype="bfloat16",
                  temperature=0.6, top_p=0.8)
    generator = load_generator(cfg, ModelSource("/models/teacher", "auto", cfg.dtype))
    assert calls["init"] == {"model": "/models/teacher", "tokenizer": "/models/teacher", "dtype": "bfloat16",
                             "seed": 5}
    out = generator.generate(PROMPTS[:2], [10, 11])
    assert out == ["canned 0", "canned 1"]  # outputs[0].text of each request, stripped, in order
    assert calls["prompts"] == [{"prompt_token_ids": render_prompt(tokenizer, p)} for p in PROMPTS[:2]]
    common = {"n": 1, "max_tokens": 17, "skip_special_tokens": True}
    if do_sample:  # per-request seeds, the same as the hf backend's
        expected = [{**common, "temperature": 0.6, "top_p": 0.8, "seed": request_seed(5, i)} for i in (10, 11)]
    else:  # greedy: vLLM's temperature 0
        expected = [{**common, "temperature": 0.0, "top_p": 1.0}] * 2
    assert calls["params"] == expected


def test_vllm_missing_or_no_gpu_is_a_clear_error(tiny_lm, monkeypatch):
    cfg = llm_cfg(backend="vllm", use_gpu=True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"needs the vllm package, which is not installed.*onerec-dist\[vllm\]"):
        load_generator(cfg, ModelSource("/models/teacher"))
    assert "backend=hf" in VLLM_MISSING
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(tiny_lm[1], {}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"backend='vllm' runs on a CUDA GPU, and none is available"):
        load_generator(cfg, ModelSource("/models/teacher"))


# ---------------------------------------------------------------- the Ray plumbing, in-process (a fake `ray`)


def fake_ray(events: list) -> tuple[types.ModuleType, types.ModuleType]:
    """Actors run in this process; ``wait`` hands back the newest submitted ref first, so shards finish out of
    order; a worker's exception comes back as a RayTaskError with ``cause``, as in Ray."""
    ray = types.ModuleType("ray")
    exceptions = types.ModuleType("ray.exceptions")

    class RayError(Exception):
        pass

    class RayTaskError(RayError):
        def __init__(self, cause):
            super().__init__(f"task failed: {cause!r}")
            self.cause = cause

    class Ref:
        def __init__(self, call):
            try:
                self.value, self.error = call(), None
            except Exception as err:  # noqa: BLE001 - what Ray would wrap
                self.value, self.error = None, RayTaskError(err)

    class Handle:
        def __init__(self, cls, args):
            self.instance = cls(*args)

        def __getattr__(self, name):
            method = getattr(self.instance, name)
            return types.SimpleNamespace(remote=lambda *a: Ref(lambda: method(*a)))

    def remote(**resources):
        events.append(("resources", resources))
        return lambda cls: types.SimpleNamespace(remote=lambda *args: Handle(cls, args))

    def get(ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    exceptions.RayError = RayError
    ray.exceptions, ray.remote, ray.get = exceptions, remote, get
    ray.wait = lambda refs, num_returns=1: ([refs[-1]], refs[:-1])
    ray.kill = lambda handle: events.append(("kill", handle))
    ray.cluster_resources = lambda: {"CPU": 2.0}
    return ray, exceptions


@pytest.fixture
def in_process_ray(monkeypatch):
    from onerec_dist.distributed import ray_session

    events: list = []
    ray, exceptions = fake_ray(events)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.exceptions", exceptions)
    monkeypatch.setattr(ray_session, "ensure_ray", lambda **kwargs: False)
    return events


@pytest.mark.parametrize("do_sample", [False, True])
def test_sharded_generation_gathers_in_request_order(tiny_lm, tmp_path, in_process_ray, do_sample):
    # 5 requests, batches of 2, 2 workers -> shards [0, 2), [2, 4), [4, 5), finishing in reverse order; each worker
    # loads the saved run model (work_dir/teacher_model) and forms the in-process batches: the same rationales.
    model, tokenizer = tiny_lm
    cfg = llm_cfg(do_sample=do_sample, temperature=1.5, seed=2)
    local = build_teacher(cfg, toy_data(), None, model=model, tokenizer=tokenizer)
    expected = local.rationales(REQUESTS[:2]) + local.rationales(REQUESTS[2:4]) + local.rationales(REQUESTS[4:])
    sharded = build_teacher(llm_cfg(do_sample=do_sample, temperature=1.5, seed=2, num_workers=2), toy_data(), None,
                            model=model, tokenizer=tokenizer, work_dir=tmp_path)
    assert (tmp_path / "teacher_model" / "config.json").is_file()
    assert sharded.rationales(REQUESTS) == expected and len(set(expected)) > 1
    assert in_process_ray[0] == ("resources", {"num_cpus": 1, "num_gpus": 0})
    sharded.close()
    assert [e[0] for e in in_process_ray].count("kill") == 2


class FailsAt:
    """A generator that writes "r<index>" and fails on request ``bad``."""

    def __init__(self, bad: int):
        self.bad = bad

    def generate(self, prompts, indices):
        if self.bad in indices:
            raise ValueError(f"out of memory at request {self.bad}")
        return [f"r{i}" for i in indices]


def test_a_failing_worker_names_its_shard_and_cause(in_process_ray, monkeypatch):
    from onerec_dist.distributed.teacher_shards import ShardedGenerator
    from onerec_dist.reasoning.teachers import llm

    cfg = llm_cfg(num_workers=2)
    monkeypatch.setattr(llm, "load_generator", lambda cfg, source: FailsAt(bad=99))
    prompts = [f"p{i}" for i in range(5)]
    assert ShardedGenerator(cfg, ModelSource("unused")).generate(prompts, range(5)) == [f"r{i}" for i in range(5)]
    monkeypatch.setattr(llm, "load_generator", lambda cfg, source: FailsAt(bad=3))
    with pytest.raises(RuntimeError, match=r"teacher shard 1 \(requests 2..3\) failed on a Ray worker: ValueError: "
                                           r"out of memory at request 3"):
        ShardedGenerator(cfg, ModelSource("unused")).generate(prompts, range(5))
    assert [e[0] for e in in_process_ray].count("kill") == 2  # the failed run's workers are released


def test_gpu_workers_need_a_gpu_in_the_cluster(in_process_ray):
    from onerec_dist.distributed.teacher_shards import ShardedGenerator

    with pytest.raises(ValueError, match=r"reasoning.teacher.use_gpu=true but the Ray cluster has no GPU"):
        ShardedGenerator(llm_cfg(num_workers=2, use_gpu=True), ModelSource("unused")).generate(["p"], [0])


# ---------------------------------------------------------------- Ray (the one multi-process test)


@pytest.mark.slow
def test_sharded_teacher_equals_in_process_on_two_ray_workers(ray_local, tiny_lm, tmp_path):
    # 5 requests, batches of 2 -> shards [0, 2), [2, 4), [4, 5) on 2 real Ray workers (ShardedGenerator joins the Ray
    # of ray_local through ray_session), sampled with per-request seeds: the gathered rationales equal the in-process
    # ones (greedy, and the scheduling in detail, are checked in-process above).
    model, tokenizer = tiny_lm
    data = toy_data()
    cfg = llm_cfg(do_sample=True, temperature=1.5, seed=2)
    local = build_teacher(cfg, data, None, model=model, tokenizer=tokenizer)
    # The bootstrap's order: in-process a batch at a time, sharded all at once (takes_all_requests).
    expected = local.rationales(REQUESTS[:2]) + local.rationales(REQUESTS[2:4]) + local.rationales(REQUESTS[4:])
    sharded = build_teacher(llm_cfg(do_sample=True, temperature=1.5, seed=2, num_workers=2), data, None,
                            model=model, tokenizer=tokenizer, work_dir=tmp_path)
    assert sharded.takes_all_requests
    assert sharded.rationales(REQUESTS) == expected and len(set(expected)) > 1
    sharded.close()
