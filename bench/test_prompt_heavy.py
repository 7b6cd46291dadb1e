"""bench/prompt_heavy.py on the tiny CPU case: one JSON object per provider with the iteration's phases,
the token positions of every training pass and the peak memory."""
from bench import prompt_heavy


def test_prints_one_object_with_positions_forwarded(capsys):
    result = prompt_heavy.main(["--case", "cpu-tiny", "--runs", "1", "--iterations", "1", "--providers", "ours",
                                "ours-off"])
    ours, off = result["providers"]["ours"], result["providers"]["ours-off"]
    assert set(ours) >= {"iteration_s", "generate_s", "logprobs_s", "update_s", "tokens_forwarded", "peak_rss_gib"}
    # off: log pi_t, log pi_ref and 4 epochs, each over the 16 prompts x 2 samples (rows x padded width)
    assert off["tokens_forwarded"] > 0 and off["tokens_forwarded"] % (6 * 32) == 0
    # packed: log pi_ref and 4 epochs (log pi_t folded into the first), each the same packed tokens
    assert 0 < ours["tokens_forwarded"] < off["tokens_forwarded"] and ours["tokens_forwarded"] % 5 == 0
    assert capsys.readouterr().out.strip().startswith('{"ours": {')
