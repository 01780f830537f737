"""The +repair arms of `stepforge ablate` and the repair axis of sweeps (configs only, nothing runs)."""

from __future__ import annotations

from pathlib import Path

from stepforge.training import sweep
from stepforge.training.ablate import ARMS, arm_improve_dict, load_ablation_config

REPO = Path(__file__).resolve().parents[2]


def test_repair_arms_share_split_and_budget_with_the_si_arms(tmp_path):
    cfg = load_ablation_config(REPO / "configs" / "ablate_tiny.yaml")
    assert {"base+si+repair", "sft+si+repair"} <= set(cfg.arms) and set(cfg.arms) <= set(ARMS)
    test = ["rope/G_0_3_02"]
    base = {"n": 2, "temperatures": [0.4], "budget": {"samples": 40}, "proposer": {"backend": {"kind": "hf"}}}
    arms = {a: arm_improve_dict(cfg, base, a, test, tmp_path / "adapter", tmp_path / "seed.jsonl") for a in cfg.arms}
    for arm, data in arms.items():
        assert data["tasks"] == test and data["n"] == 2 and data["budget"] == {"samples": 40}
        assert data["repair_turns"] == (cfg.repair_turns if arm.endswith("+repair") else 0)
        assert data["variant"] == ("agent+si" if "+si" in arm else "agent")
        assert (data.get("seed_buffer") is not None) == ("+si" in arm)
        assert (data["proposer"]["backend"]["lora_path"] is not None) == arm.startswith("sft")
    plain = {k: v for k, v in arms["sft+si"].items() if k not in ("name", "repair_turns")}
    assert plain == {k: v for k, v in arms["sft+si+repair"].items() if k not in ("name", "repair_turns")}


def test_sweep_grid_has_a_repair_axis():
    cfg = sweep.load_sweep_config(REPO / "configs" / "sweep_qwen7b.yaml", [], {})
    jobs = sweep.expand(cfg)
    assert len(jobs) == 2 * 3 * 2  # models x variants x repair_turns
    assert sorted({o for j in jobs for o in j.overrides if o.startswith("repair_turns=")}) == \
        ["repair_turns=0", "repair_turns=2"]
    assert all(("repair2" in j.job) == ("repair_turns=2" in j.overrides) for j in jobs)
