"""engine/model/generate.py against Hugging Face generate, padding invariance, EOS handling."""
import pytest
import torch
from _models import EOS_IDS, FAMILIES, PAD, left_pad, tiny_model

from engine.config import SamplingConfig
from engine.model.generate import Sampler, eos_token_ids

PROMPTS = [[1, 7, 8, 9, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40]]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(family):
    """Greedy tokens equal HF generate's, with left padding and mixed prompt lengths."""
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    steps = 10
    ro = Sampler(model, eos_ids=EOS_IDS, pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=steps, temperature=0, samples_per_prompt=2))
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=PAD,
                        eos_token_id=EOS_IDS)[:, ids.shape[1]:]
    hf = torch.nn.functional.pad(hf, (0, steps - hf.shape[1]), value=PAD)
    for s in range(2):  # both samples of a prompt are the same greedy continuation
        assert torch.equal(ro.response_ids[s * len(PROMPTS):(s + 1) * len(PROMPTS)], hf), family
    assert torch.equal(ro.prompt_ids, ids.repeat(2, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_logprobs(family):
    """A prompt alone and the same prompt left-padded beside a longer one give the same log-probabilities."""
    model = tiny_model(family)
    sampler = Sampler(model, eos_ids=[96], pad_token_id=PAD)  # an EOS that greedy decoding never emits here
    cfg = SamplingConfig(max_new_tokens=6, temperature=0, samples_per_prompt=1)
    short = [1, 20, 21]
    alone = sampler.generate(*left_pad([short]), cfg)
    padded = sampler.generate(*left_pad([PROMPTS[0], short]), cfg)
    assert torch.equal(alone.response_ids[0], padded.response_ids[1])
    torch.testing.assert_close(alone.logprobs[0], padded.logprobs[1], rtol=1e-5, atol=1e-5)


def test_every_eos_id_stops_and_prompt_eos_does_not():
    """Rows stop on any id of the EOS set; an EOS inside the prompt is not a stop."""
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    probe = Sampler(model, eos_ids=[96], pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=5, temperature=0, samples_per_prompt=1))
    first, second = probe.response_ids[0, 1].item(), probe.response_ids[1, 2].item()
    # Declare the tokens greedy emits at steps 1 and 2 as two EOS ids, and put both in every prompt.
    eos = [first, second]
    ro = Sampler(model, eos_ids=eos, pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=5, temperature=0, samples_per_prompt=1))
    assert ro.finished[0] and ro.response_mask[0].tolist() == [True, True, False, False, False]
    assert ro.finished[1] and ro.response_mask[1, :3].all() and not ro.response_mask[1, 3:].any()
    assert (ro.response_ids[0, 2:] == PAD).all()
    with_eos_prompts = [p[:1] + eos + p[1:] for p in PROMPTS]
    ids2, mask2 = left_pad(with_eos_prompts)
    ro2 = Sampler(model, eos_ids=eos, pad_token_id=PAD).generate(
        ids2, mask2, SamplingConfig(max_new_tokens=3, temperature=0, samples_per_prompt=1))
    assert ro2.response_mask[:, 0].all()  # nobody stopped before generating


def test_eos_token_ids_reads_the_full_set():
    model = tiny_model("llama", eos=[3, 5])
    model.config.eos_token_id = 7
    assert eos_token_ids(model) == [3, 5, 7]


def test_min_new_tokens_suppresses_eos():
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    probe = Sampler(model, eos_ids=[96], pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=4, temperature=0, samples_per_prompt=1))
    eos = [probe.response_ids[0, 0].item()]  # greedy's first token becomes an EOS
    ro = Sampler(model, eos_ids=eos, pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=4, min_new_tokens=2, temperature=0, samples_per_prompt=1))
    assert ro.response_mask[:, :2].all()
    assert not torch.isin(ro.response_ids[:, :2], torch.tensor(eos)).any()


def test_kv_budget_chunks_prompts_and_keeps_layout():
    """A small KV budget splits the prompts into chunks; the result is the unchunked one."""
    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS)
    cfg = SamplingConfig(max_new_tokens=5, temperature=0, samples_per_prompt=2)
    sampler = Sampler(model, eos_ids=EOS_IDS, pad_token_id=PAD)
    whole = sampler.generate(ids, mask, cfg)
    per_row = sampler._kv_bytes_per_row(ids.shape[1] + 5)
    chunked = sampler.generate(ids, mask, SamplingConfig(max_new_tokens=5, temperature=0, samples_per_prompt=2,
                                                         kv_budget_bytes=2 * 2 * per_row))
    assert torch.equal(whole.response_ids, chunked.response_ids)
    torch.testing.assert_close(whole.logprobs, chunked.logprobs)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                                 dict(min_new_tokens=9, max_new_tokens=3), dict(samples_per_prompt=0)])
def test_bad_sampling_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "min" not in str(bad) else "min_new_tokens"):
        SamplingConfig(**bad)


def test_right_padded_prompts_are_rejected():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 5, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        Sampler(model, eos_ids=EOS_IDS, pad_token_id=PAD).generate(ids, torch.tensor([[1, 1, 0]]), SamplingConfig())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampler_logprobs_equal_training_logprobs(family, temperature):
    """The generation/training gap is rounding only: the sampler's log-probabilities (Gumbel-max from
    the hidden state) equal the training forward's at the same temperature, and a seed repeats."""
    from engine.model.logprobs import PolicyLogprobs

    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    cfg = SamplingConfig(max_new_tokens=6, temperature=temperature, samples_per_prompt=2)
    sampler = Sampler(model, eos_ids=EOS_IDS, pad_token_id=PAD)
    ro = sampler.generate(ids, mask, cfg, generator=torch.Generator().manual_seed(5))
    again = sampler.generate(ids, mask, cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ro.response_ids, again.response_ids)
    labels = torch.where(ro.response_mask, ro.response_ids, -100)
    full_mask = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
    with torch.no_grad():
        train_lp = PolicyLogprobs(model, temperature=temperature)(ro.sequences, full_mask, labels)
    valid = ro.response_mask
    torch.testing.assert_close(ro.logprobs[valid], train_lp[valid], rtol=1e-4, atol=1e-4)
    assert (ro.logprobs[~valid] == 0).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compacting_finished_rows_changes_nothing(family):
    """Greedy decoding with live rows moved into smaller buckets equals decoding without it."""
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    probe = Sampler(model, eos_ids=[96], pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=12, temperature=0, samples_per_prompt=1))
    # EOS ids that end three of the four prompts early, at different steps
    eos = [probe.response_ids[0, 1].item(), probe.response_ids[1, 2].item(), probe.response_ids[2, 3].item()]
    outs, samplers = [], []
    for compact in (False, True):
        cfg = SamplingConfig(max_new_tokens=12, temperature=0, samples_per_prompt=2, check_every=2,
                             compact_finished=compact)
        samplers.append(Sampler(model, eos_ids=eos, pad_token_id=PAD))
        outs.append(samplers[-1].generate(ids, mask, cfg))
    plain, compact = outs
    assert [rows for rows, _ in samplers[0]._caches] == [8]
    assert min(rows for rows, _ in samplers[1]._caches) < 8, "no compaction happened"
    assert torch.equal(plain.response_ids, compact.response_ids)
    assert torch.equal(plain.response_mask, compact.response_mask)
    torch.testing.assert_close(plain.logprobs, compact.logprobs, rtol=1e-5, atol=1e-6)


def test_finished_flags_survive_compaction():
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    probe = Sampler(model, eos_ids=[96], pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=8, temperature=0, samples_per_prompt=1))
    eos = [probe.response_ids[0, 0].item()]
    ro = Sampler(model, eos_ids=eos, pad_token_id=PAD).generate(
        ids, mask, SamplingConfig(max_new_tokens=8, temperature=0, samples_per_prompt=2, check_every=1))
    assert ro.finished.shape == (8,)
    expected = (torch.isin(ro.response_ids, torch.tensor(eos)) & ro.response_mask).any(-1)
    assert torch.equal(ro.finished, expected) and ro.finished[0] and ro.finished[4]


def test_static_caches_are_reused_and_bounded():
    """Prompt lengths that vary from call to call reuse the cache of their length bucket."""
    model = tiny_model("llama")
    sampler = Sampler(model, eos_ids=[96], pad_token_id=PAD)
    cfg = SamplingConfig(max_new_tokens=4, temperature=0, samples_per_prompt=2, compact_finished=False)
    sampler.generate(*left_pad(PROMPTS), cfg)
    first = dict(sampler._caches)
    sampler.generate(*left_pad([p[:2] for p in PROMPTS]), cfg)  # shorter prompts, same bucket
    assert sampler._caches == first and all(a is b for a, b in zip(first.values(), sampler._caches.values()))
    sampler.generate(*left_pad([p * 12 for p in PROMPTS]), cfg)  # a longer bucket replaces the old one
    assert len(sampler._caches) == 1 and list(sampler._caches)[0][1] > list(first)[0][1]



@pytest.mark.parametrize("family", ["mistral", "cohere2"])
def test_reused_sliding_window_caches_start_clean(family):
    """A sliding-window (Mistral) or hybrid (Cohere2: sliding, full) static cache reused by later calls, with
    prompts shorter or longer than the window and compactions, gives what a fresh sampler and HF generate give."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, sliding_window=4, pad_token_id=PAD,
                  eos_token_id=EOS_IDS)
    if family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        model = transformers.Cohere2ForCausalLM(transformers.Cohere2Config(
            **common, layer_types=["sliding_attention", "full_attention"]))
    model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    cfg = SamplingConfig(max_new_tokens=9, temperature=0, samples_per_prompt=2, check_every=2)
    eos = list(range(6, 96, 2))  # a wide EOS set: rows end early, so live rows get compacted
    reused = Sampler(model, eos_ids=eos, pad_token_id=PAD)
    for prompts in (PROMPTS, [p[:2] for p in PROMPTS], [p * 2 for p in PROMPTS]):  # one cache length bucket
        ids, mask = left_pad(prompts)
        got = reused.generate(ids, mask, cfg)
        fresh = Sampler(model, eos_ids=eos, pad_token_id=PAD).generate(ids, mask, cfg)
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=PAD,
                            eos_token_id=eos)[:, ids.shape[1]:]
        hf = torch.nn.functional.pad(hf, (0, 9 - hf.shape[1]), value=PAD)
        assert torch.equal(got.response_ids, fresh.response_ids)
        assert torch.equal(got.response_ids, hf.repeat(2, 1))
    assert reused.compactions >= 2 and {length for _, length in reused._caches} == {64}
