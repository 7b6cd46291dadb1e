"""bench/gpu_session.py rehearsed on CPU (--dry-run): every part it runs writes its JSON rows, and the
driver's summary says how each part ended, so the first real run does not waste a device lend."""
import json

from bench import gpu_session


def test_dry_run_writes_each_part(tmp_path):
    rc = gpu_session.main(["--out", str(tmp_path), "--dry-run"])  # every part, as on the device
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, summary
    assert set(summary["parts"]) == set(gpu_session.PARTS)
    packing = json.loads((tmp_path / "packing.json").read_text())
    assert packing["rows"] and all(r["status"] == "passed" for r in packing["rows"]), packing["rows"]
    correctness = json.loads((tmp_path / "correctness.json").read_text())
    assert correctness["environment"]["torch"] and all(r["ok"] for r in correctness["rows"])
    assert {r["backward"] for r in correctness["rows"]} == {"gemm", "atomic"}
    loss = json.loads((tmp_path / "loss.json").read_text())
    by = {(r["provider"], r["mode"]): r for r in loss["rows"]}
    assert by[("fused", "fwdbwd")]["status"] == "ok" and "model_prediction" in by[("fused", "fwdbwd")]
    assert by[("liger", "fwdbwd")]["status"] == "skipped" and "CUDA" in by[("liger", "fwdbwd")]["reason"]
    generate = json.loads((tmp_path / "generate.json").read_text())
    assert {r["provider"] for r in generate["rows"]} == {"ours", "hf-dynamic"}
    iteration = json.loads((tmp_path / "iteration.json").read_text())
    by = {r["provider"]: r for r in iteration["rows"]}
    assert set(by) == {"ours", "ours-off", "trl-rloo", "planner"}, iteration["rows"]
    assert all("error" not in r and r["iteration_s"] > 0 for r in iteration["rows"]), iteration["rows"]
    assert by["planner"]["peak_gib"] > 0 and by["planner"]["update_s"] > 0  # predicted beside measured
    tiles = json.loads((tmp_path / "tiles.json").read_text())
    assert {r["kernel"] for r in tiles["rows"]} == {"fwd", "sample"} and all(r["status"] == "ok" for r in tiles["rows"])
    assert len(list(tmp_path.iterdir())) <= 8  # the device returns at most 8 files
